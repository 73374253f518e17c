"""Unit tests of the scheduler wrapper on manual sampling loops (pipelines: test_scheduler_contract.py)."""

from __future__ import annotations

import inspect
import json

import diffusers
import pytest
import torch

from qsched.errors import QSchedError
from qsched.schedule import QSchedCoefficients
from qsched.scheduler import is_wrapped, unwrap, wrap

SCHEDULERS = [
    "LCMScheduler",
    "TCDScheduler",
    "EulerAncestralDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "DPMSolverMultistepScheduler",
]
STEPS = 4
RAMPS = QSchedCoefficients.from_ramps(cx_start=1.1, ceps_start=0.85, num_steps=STEPS)


def sample(scheduler, *, manual: QSchedCoefficients | None = None, steps: int = STEPS, seed: int = 0):
    """A deterministic sampling loop with a fake denoiser; ``manual`` scales inputs by hand."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 3, 8, 8, generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        eps = torch.sin(3 * model_input + float(t) / 500.0)
        if manual is not None:
            x, eps = x * manual.c_x[i], eps * manual.c_eps[i]
        kwargs = {"generator": generator} if accepts_generator else {}
        x = scheduler.step(eps, t, x, return_dict=False, **kwargs)[0]
    return x


def plain(name):
    return getattr(diffusers, name)()


@pytest.mark.parametrize("name", SCHEDULERS)
def test_identity_is_bit_identical(name):
    wrapped = wrap(plain(name), QSchedCoefficients.identity(STEPS))
    assert torch.equal(sample(plain(name)), sample(wrapped))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_coefficients_scale_the_step_inputs(name):
    expected = sample(plain(name), manual=RAMPS)
    got = sample(wrap(plain(name), RAMPS))
    assert torch.equal(expected, got)
    assert not torch.equal(got, sample(plain(name)))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_keeps_class_signatures_order_and_config(name):
    base = plain(name)
    wrapped = wrap(base, RAMPS)
    assert isinstance(wrapped, type(base)) and is_wrapped(wrapped) and not is_wrapped(base)
    assert type(wrapped).__name__ == type(base).__name__
    assert wrapped.order == base.order
    assert dict(wrapped.config) == dict(base.config)
    for method in ("step", "set_timesteps"):
        assert inspect.signature(getattr(wrapped, method)) == inspect.signature(getattr(base, method))
    assert wrapped.qsched_coefficients == RAMPS


def test_keyword_call_is_scaled_too():
    wrapped = wrap(plain("DDIMScheduler"), RAMPS)
    ref = plain("DDIMScheduler")
    for s in (wrapped, ref):
        s.set_timesteps(STEPS)
    t = wrapped.timesteps[0]
    x, eps = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    out = wrapped.step(model_output=eps, timestep=t, sample=x).prev_sample
    assert torch.equal(out, ref.step(eps * RAMPS.c_eps[0], t, x * RAMPS.c_x[0]).prev_sample)


def test_wrapping_twice_replaces_and_unwrap_restores():
    base = plain("LCMScheduler")
    other = QSchedCoefficients.from_ramps(cx_start=0.9, ceps_start=1.2, num_steps=STEPS)
    twice = wrap(wrap(base, RAMPS), other)
    assert type(twice).__mro__[1] is type(base)  # one level of subclassing, not two
    assert torch.equal(sample(twice), sample(wrap(base, other)))
    restored = unwrap(twice)
    assert type(restored) is type(base) and not is_wrapped(restored)
    assert torch.equal(sample(restored), sample(plain("LCMScheduler")))
    assert unwrap(base) is base


def test_new_coefficients_apply_from_the_next_run_never_stale():
    wrapped = wrap(plain("EulerAncestralDiscreteScheduler"), RAMPS)
    first = sample(wrapped)
    other = QSchedCoefficients.from_ramps(cx_start=0.95, ceps_start=1.05, num_steps=2)
    wrapped.set_coefficients(other)
    second = sample(wrapped, steps=2)
    assert torch.equal(second, sample(wrap(plain("EulerAncestralDiscreteScheduler"), other), steps=2))
    wrapped.set_coefficients(RAMPS)
    assert torch.equal(sample(wrapped), first)


def test_wrong_number_of_steps_is_refused_at_set_timesteps():
    wrapped = wrap(plain("LCMScheduler"), RAMPS)
    with pytest.raises(QSchedError, match="4 steps but the sampler runs 2"):
        wrapped.set_timesteps(2)


def test_step_before_set_timesteps():
    wrapped = wrap(plain("DDIMScheduler"), RAMPS)
    with pytest.raises(QSchedError, match="before set_timesteps"):
        wrapped.step(torch.zeros(1), 999, torch.zeros(1))


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_higher_order_schedulers_are_refused(name):
    with pytest.raises(QSchedError, match="order 2"):
        wrap(plain(name), RAMPS)


def test_rejects_non_schedulers_and_bad_coefficients():
    with pytest.raises(QSchedError, match="not a diffusers scheduler"):
        wrap(object(), RAMPS)
    with pytest.raises(QSchedError, match="QSchedCoefficients"):
        wrap(plain("DDIMScheduler"), (1.0, 1.0))


def test_saved_config_is_the_plain_scheduler(tmp_path):
    wrapped = wrap(plain("TCDScheduler"), RAMPS)
    wrapped.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert config["_class_name"] == "TCDScheduler"
    assert "c_x" not in json.dumps(config)
    reloaded = diffusers.TCDScheduler.from_pretrained(tmp_path)
    assert not is_wrapped(reloaded)
    assert "QSched[TCDScheduler]" in repr(wrapped)
