from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from qsched.errors import QSchedError
from qsched.generate import sample
from qsched.prepare import ModelOptions, prepare_pipeline
from qsched.ptqd import PTQDStats, estimate_ptqd, fit_step, ptqd_wrap
from qsched.quant import parse_preset
from qsched.scheduler import is_wrapped, unwrap

TWO_STEPS = ModelOptions(steps=2, height=32, width=32)


def test_fit_with_intercept_and_per_channel_bias_by_hand():
    # one image, two channels of two values: channel 0 f = [1, 2], channel 1 f = [3, 4]
    full = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).reshape(1, 2, 1, 2)
    quantized = torch.tensor([2.0, 3.6, 4.2, 6.0], dtype=torch.float64).reshape(1, 2, 1, 2)
    fit = fit_step(quantized, full)
    # deviations from the means 2.5 and 3.95: f [-1.5, -0.5, 0.5, 1.5], q [-1.95, -0.35, 0.25, 2.05]
    # 1 + k = sum(df * dq) / sum(df^2) = 6.3 / 5 = 1.26; intercept 3.95 - 1.26 * 2.5 = 0.8
    assert fit.scale == pytest.approx(1.26, abs=1e-12)
    assert fit.intercept == pytest.approx(0.8, abs=1e-12)
    # residual q - 1.26 f = [0.74, 1.08, 0.42, 0.96]: channel means 0.91 and 0.69 (the bias)
    assert fit.bias == pytest.approx((0.91, 0.69), abs=1e-12)
    # without the bias: [-0.17, 0.17, -0.27, 0.27], mean square 0.0509, over (1 + k)^2
    assert fit.residual_var == pytest.approx(0.0509 / 1.26**2, abs=1e-12)
    # through the origin (the old fit) the scale would be <q, f> / <f, f> = 45.8 / 30
    assert fit.scale != pytest.approx(45.8 / 30, abs=0.1)


def test_fit_recovers_a_known_scale_bias_and_residual_variance():
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(50, 3, 40, 40, generator=generator)
    offset = torch.tensor([0.3, -0.1, 0.05]).reshape(1, 3, 1, 1)
    noise = 0.1 * torch.randn(50, 3, 40, 40, generator=generator)
    fit = fit_step(1.25 * full + offset + noise, full)
    assert fit.scale == pytest.approx(1.25, abs=2e-3)
    assert fit.bias == pytest.approx((0.3, -0.1, 0.05), abs=2e-3)
    assert fit.intercept == pytest.approx(0.25 / 3, abs=2e-3)
    assert fit.residual_var == pytest.approx(0.01 / 1.25**2, rel=0.02)  # the bias is not counted in
    tokens = fit_step((1.25 * full + offset + noise).flatten(2).transpose(1, 2), full.flatten(2).transpose(1, 2))
    assert tokens.bias == pytest.approx(fit.bias, abs=1e-9)  # [B, S, C]: channels last


def test_fit_refuses_degenerate_pairs():
    with pytest.raises(QSchedError, match="constant"):
        fit_step(torch.arange(4.0), torch.zeros(4))
    with pytest.raises(QSchedError, match="anti-correlated"):
        fit_step(-torch.arange(1.0, 5.0), torch.arange(1.0, 5.0))
    with pytest.raises(QSchedError, match="equal, non-empty"):
        fit_step(torch.zeros(2, 3), torch.zeros(3, 2))


def test_partial_noise_reduction_by_hand():
    """LCM re-noises prev = sqrt(a_prev) * denoised + sqrt(1 - a_prev) * z; PTQD takes v off 1 - a_prev."""
    from diffusers import LCMScheduler

    stats = PTQDStats(scale=(1.25, 1.0), bias=((0.2, -0.2, 0.0, 0.1), (0.0,) * 4),
                      residual_var=(0.05, 0.0), sample_var=(0.11, 0.0))
    scheduler = ptqd_wrap(LCMScheduler(), stats)
    scheduler.set_timesteps(2)
    t, t_next = int(scheduler.timesteps[0]), int(scheduler.timesteps[1])
    scheduler.alphas_cumprod[t_next] = 0.64  # noise variance 1 - 0.64 = 0.36; minus 0.11 leaves 0.25
    plain = LCMScheduler()
    plain.set_timesteps(2)
    plain.alphas_cumprod[t_next] = 0.64
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    q = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    corrected = (q - torch.tensor([0.2, -0.2, 0.0, 0.1]).reshape(1, 4, 1, 1)) / 1.25
    prev_plain, denoised = plain.step(corrected, t, x, generator=torch.Generator().manual_seed(2), return_dict=False)
    z = (prev_plain - 0.8 * denoised) / 0.6  # the plain step's noise: sqrt(0.64) = 0.8, sqrt(0.36) = 0.6
    prev, denoised_ptqd = scheduler.step(q, t, x, generator=torch.Generator().manual_seed(2), return_dict=False)
    torch.testing.assert_close(denoised_ptqd, denoised)  # bias subtracted, then divided by 1 + k
    torch.testing.assert_close(prev, 0.8 * denoised + 0.5 * z)  # sqrt(0.36 - 0.11) = 0.5


def test_stats_round_trip_and_checks(tmp_path):
    stats = PTQDStats(scale=(1.1, 0.95), bias=((0.1, -0.2), (0.0, 0.3)), residual_var=(0.01, 0.02),
                      sample_var=(0.3, 0.0), family="lcm", quant=parse_preset("w4a8").to_dict(), steps=2)
    loaded = PTQDStats.load(stats.save(tmp_path / "ptqd.json"))
    assert loaded == stats
    assert loaded.coefficients().c_eps == pytest.approx((1 / 1.1, 1 / 0.95))
    with pytest.raises(QSchedError, match="for 2 steps, not 4"):
        loaded.check(family="lcm", steps=4)
    # a recipe dict written before the recipe had activation options is the same recipe
    old_dict = {k: v for k, v in parse_preset("w4a8").to_dict().items() if k not in ("full_range", "act_symmetric", "act_groups")}
    loaded.check(family="lcm", steps=2, quant=old_dict)
    with pytest.raises(QSchedError, match="recipe 'w4a8', not 'w4a8-ref'"):
        loaded.check(family="lcm", steps=2, quant=parse_preset("w4a8-ref").to_dict())
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(QSchedError, match="not a PTQD statistics file"):
        PTQDStats.load(tmp_path / "bad.json")
    version1 = {**stats.to_dict(), "version": 1}
    del version1["bias"]
    (tmp_path / "v1.json").write_text(json.dumps(version1))
    with pytest.raises(QSchedError, match="version 1 lacked the bias correction.*estimate them again"):
        PTQDStats.load(tmp_path / "v1.json")
    with pytest.raises(QSchedError, match="one non-empty list"):
        PTQDStats(scale=(1.0,), bias=((),), residual_var=(0.0,), sample_var=(0.0,))


@pytest.fixture(scope="module")
def pipelines(tiny_pipeline_path):
    folder = tiny_pipeline_path("lcm")
    fp = prepare_pipeline(folder, options=TWO_STEPS)
    quantized = prepare_pipeline(folder, recipe=parse_preset("w4a4"), options=TWO_STEPS)
    return fp, quantized


def test_identity_statistics_leave_the_sampler_bit_identical(pipelines):
    _, quantized = pipelines
    plain = sample(quantized, ["a cat", "a dog"], [0, 1], seed=3, output_type="np")
    identity = PTQDStats(scale=(1.0, 1.0), residual_var=(0.0, 0.0), sample_var=(0.0, 0.0))
    quantized.pipe.scheduler = ptqd_wrap(quantized.pipe.scheduler, identity)
    try:
        assert is_wrapped(quantized.pipe.scheduler) and quantized.pipe.scheduler.ptqd_noise_applied
        corrected = sample(quantized, ["a cat", "a dog"], [0, 1], seed=3, output_type="np")
    finally:
        quantized.pipe.scheduler = unwrap(quantized.pipe.scheduler)
    np.testing.assert_array_equal(plain, corrected)


def test_estimate_on_a_tiny_pipeline_and_noise_is_reduced(pipelines):
    fp, quantized = pipelines
    stats = estimate_ptqd(fp, quantized, ["a cat", "a dog", "a shoe"], seed=0, batch_size=2, progress=False)
    assert stats.num_steps == 2 and stats.family == "lcm" and stats.images == 3
    assert all(0.5 < s < 2.0 for s in stats.scale) and all(v > 0 for v in stats.residual_var)
    assert [len(b) for b in stats.bias] == [4, 4]  # one per latent channel
    # Exaggerate the residual so the LCM noise term is removed entirely: the first step's
    # next sample is then its deterministic part sqrt(a_prev) * denoised.
    big = PTQDStats(scale=stats.scale, residual_var=stats.residual_var, sample_var=(10.0, 10.0))  # no bias
    scheduler = ptqd_wrap(quantized.pipe.scheduler, big)
    scheduler.set_timesteps(2)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    t = scheduler.timesteps[0]
    prev, denoised = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(2), return_dict=False)
    a_prev = float(scheduler.alphas_cumprod[int(scheduler.timesteps[1])])
    torch.testing.assert_close(prev, math.sqrt(a_prev) * denoised)


def test_ptqd_scheduler_pickles_with_its_statistics():
    from diffusers import LCMScheduler

    stats = PTQDStats(scale=(1.25, 1.1), bias=((0.2, -0.2, 0.0, 0.1), (0.0,) * 4),
                      residual_var=(0.05, 0.01), sample_var=(0.11, 0.0))
    scheduler = ptqd_wrap(LCMScheduler(), stats)
    clone = pickle.loads(pickle.dumps(scheduler))
    assert type(clone) is type(scheduler) and clone._ptqd_stats == stats
    outputs = []
    for s in (scheduler, clone):
        s.set_timesteps(2)
        x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
        outputs.append(s.step(x, s.timesteps[0], x, generator=torch.Generator().manual_seed(2)).prev_sample)
    assert torch.equal(outputs[0], outputs[1])
