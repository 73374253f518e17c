"""What diffusers' own scheduler tests (tests/schedulers) ask of a scheduler, asked of wrapped ones.

Written here, not copied: the cases of diffusers' suite that a wrapper can break. With
all-ones coefficients a wrapped scheduler must behave exactly as the plain one, also
where the plain one is lenient (step before set_timesteps, timesteps outside the
schedule, any number of steps); with real coefficients the strict checks stay. A
wrapped scheduler must survive from_config/from_pretrained of its own class, pickle
and deepcopy, alone and inside a pipeline.
"""

from __future__ import annotations

import copy
import inspect
import pickle

import diffusers
import pytest
import torch

from qsched.errors import QSchedError
from qsched.schedule import QSchedCoefficients
from qsched.scheduler import is_wrapped, wrap, wrapped_class

SCHEDULERS = [
    "LCMScheduler",
    "TCDScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
]
#: Plain schedulers that step on the schedule built in __init__, without set_timesteps.
STEP_WITHOUT_SET_TIMESTEPS = ["DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"]
IDENTITY = QSchedCoefficients.identity(4)
RAMPS = QSchedCoefficients.from_ramps(cx_start=1.1, ceps_start=0.9, num_steps=4)


def plain(name: str) -> object:
    return getattr(diffusers, name)()


def public(config) -> dict:
    """A config without diffusers' bookkeeping keys (``_use_default_values`` changes on save)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def model(x: torch.Tensor, t: object) -> torch.Tensor:
    """A fake denoiser: deterministic, depends on input and timestep."""
    return torch.sin(3 * x + float(t) / 500.0)


def run(scheduler: object, timesteps, *, x: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Step through ``timesteps`` (no set_timesteps here) from a fixed start, noise from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(model(model_input, t), t, x, **kwargs).prev_sample
    return x


def loop(scheduler: object, steps: int) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    return run(scheduler, scheduler.timesteps)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_identity_is_the_plain_scheduler_for_any_number_of_steps(name):
    wrapped = wrap(plain(name), IDENTITY)  # four ones: still the identity at 10 or 25 steps
    for steps in (10, 25, 4):
        assert torch.equal(loop(wrapped, steps), loop(plain(name), steps))


@pytest.mark.parametrize("name", STEP_WITHOUT_SET_TIMESTEPS)
def test_identity_steps_before_set_timesteps_like_plain(name):
    reference = plain(name)
    timesteps = reference.timesteps[:3]  # the schedule built in __init__
    expected = run(reference, timesteps)
    assert torch.equal(run(wrap(plain(name), IDENTITY), timesteps), expected)
    assert torch.equal(run(wrapped_class(type(reference))(), timesteps), expected)  # no coefficients at all


def test_identity_accepts_timesteps_outside_the_schedule():
    reference = plain("DDIMScheduler")  # DDIM computes the previous timestep from any timestep
    reference.set_timesteps(10)
    outside = [t for t in (998, 501, 37, 1) if t not in reference.timesteps.tolist()]
    assert len(outside) == 4
    expected = run(reference, outside)
    wrapped = wrap(plain("DDIMScheduler"), IDENTITY)
    wrapped.set_timesteps(10)
    assert torch.equal(run(wrapped, outside), expected)


def test_identity_ddpm_steps_any_timesteps_of_its_training_schedule():
    """Without set_timesteps DDPM steps from t to t - 1 for any t (diffusers' time-index tests)."""
    timesteps = [998, 501, 37, 1]
    expected = run(plain("DDPMScheduler"), timesteps)
    assert torch.equal(run(wrap(plain("DDPMScheduler"), IDENTITY), timesteps), expected)


def test_real_coefficients_keep_the_strict_checks():
    # Euler would step on its __init__ schedule, but which coefficient is step 0 of which run?
    with pytest.raises(QSchedError, match="before set_timesteps"):
        run(wrap(plain("EulerDiscreteScheduler"), RAMPS), plain("EulerDiscreteScheduler").timesteps[:1])
    # DDIM finds the step of a timestep in its schedule; one outside it has none
    ddim = wrap(plain("DDIMScheduler"), RAMPS)
    ddim.set_timesteps(4)
    with pytest.raises(QSchedError, match="timestep 37 occurs 0 times in the schedule of DDIMScheduler"):
        run(ddim, [37])
    with pytest.raises(QSchedError, match="4 steps but the sampler runs 10"):
        wrap(plain("DDPMScheduler"), RAMPS).set_timesteps(10)
    # coefficients set without a run yet: still refused before set_timesteps
    fresh = wrapped_class(diffusers.DDPMScheduler)()
    fresh.set_coefficients(RAMPS)
    with pytest.raises(QSchedError, match="before set_timesteps"):
        run(fresh, [999])


@pytest.mark.parametrize("name", SCHEDULERS)
def test_from_config_and_from_pretrained_of_the_wrapped_class(name, tmp_path):
    wrapped = wrap(plain(name), RAMPS)
    again = type(wrapped).from_config(wrapped.config)
    assert is_wrapped(again) and type(again) is type(wrapped)
    assert again.qsched_coefficients is None  # coefficients are not config: identity until set
    assert torch.equal(loop(again, 5), loop(plain(name), 5))
    again.set_coefficients(RAMPS)
    assert torch.equal(loop(again, 4), loop(wrap(plain(name), RAMPS), 4))
    wrapped.save_pretrained(tmp_path)
    reloaded = type(wrapped).from_pretrained(tmp_path)
    assert is_wrapped(reloaded) and public(reloaded.config) == public(wrapped.config)
    assert torch.equal(loop(reloaded, 5), loop(plain(name), 5))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_pickle_and_deepcopy_keep_class_coefficients_and_state(name):
    def started():
        scheduler = wrap(plain(name), RAMPS)
        scheduler.set_timesteps(4)
        return scheduler, run(scheduler, scheduler.timesteps[:1])  # mid-run: step index, solver history

    wrapped, x = started()
    reference, _ = started()
    expected = run(reference, reference.timesteps[1:], x=x)  # the same scheduler, never copied
    for clone in (pickle.loads(pickle.dumps(wrapped)), copy.deepcopy(wrapped)):
        assert type(clone) is type(wrapped) and clone.qsched_coefficients == RAMPS
        assert torch.equal(run(clone, clone.timesteps[1:], x=x), expected)
    identity = pickle.loads(pickle.dumps(wrap(plain(name), IDENTITY)))
    assert is_wrapped(identity) and identity.qsched_coefficients == IDENTITY


@pytest.mark.parametrize("name", SCHEDULERS)
def test_return_dict_and_tuple_outputs_agree(name):
    outputs = []
    for return_dict in (True, False):
        wrapped = wrap(plain(name), RAMPS)
        wrapped.set_timesteps(4)
        t = wrapped.timesteps[0]
        x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        kwargs = {"generator": torch.Generator().manual_seed(0)} if "generator" in inspect.signature(wrapped.step).parameters else {}
        out = wrapped.step(model(x, t), t, x, return_dict=return_dict, **kwargs)
        outputs.append(out.prev_sample if return_dict else out[0])
    assert torch.equal(outputs[0], outputs[1])


def test_pickled_pipeline_keeps_its_wrapped_scheduler():
    from qsched.testing import TINY_CALL_KWARGS, build_tiny_pipeline

    pipe = build_tiny_pipeline("lcm")
    pipe.set_progress_bar_config(disable=True)
    coefficients = QSchedCoefficients.from_ramps(cx_start=1.2, ceps_start=0.8, num_steps=2)
    pipe.scheduler = wrap(pipe.scheduler, coefficients)
    clone = pickle.loads(pickle.dumps(pipe))  # what sending a pipeline to a worker process does
    assert is_wrapped(clone.scheduler) and clone.scheduler.qsched_coefficients == coefficients

    def images(p):
        return p("a red shoe", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="pt", **TINY_CALL_KWARGS).images

    assert torch.equal(images(clone), images(pipe))
