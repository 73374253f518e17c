from __future__ import annotations

import math

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


def test_fit_recovers_a_known_scale_and_residual_variance():
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(200_000, generator=generator)
    noise = 0.1 * torch.randn(200_000, generator=generator)
    scale, residual = fit_step(1.25 * full + noise, full)
    assert scale == pytest.approx(1.25, abs=2e-3)
    assert residual == pytest.approx(0.01 / 1.25**2, rel=0.02)


def test_fit_refuses_degenerate_pairs():
    with pytest.raises(QSchedError, match="all zero"):
        fit_step(torch.ones(4), torch.zeros(4))
    with pytest.raises(QSchedError, match="anti-correlated"):
        fit_step(-torch.arange(1.0, 5.0), torch.arange(1.0, 5.0))


def test_stats_round_trip_and_checks(tmp_path):
    stats = PTQDStats(scale=(1.1, 0.95), residual_var=(0.01, 0.02), sample_var=(0.3, 0.0), family="lcm",
                      quant=parse_preset("w4a8").to_dict(), steps=2)
    loaded = PTQDStats.load(stats.save(tmp_path / "ptqd.json"))
    assert loaded == stats
    assert loaded.coefficients().c_eps == pytest.approx((1 / 1.1, 1 / 0.95))
    with pytest.raises(QSchedError, match="for 2 steps, not 4"):
        loaded.check(family="lcm", steps=4)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(QSchedError, match="not a PTQD statistics file"):
        PTQDStats.load(tmp_path / "bad.json")


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
    # Exaggerate the residual so the LCM noise term is removed entirely: the first step's
    # next sample is then its deterministic part sqrt(a_prev) * denoised.
    big = PTQDStats(scale=stats.scale, residual_var=stats.residual_var, sample_var=(10.0, 10.0))
    scheduler = ptqd_wrap(quantized.pipe.scheduler, big)
    scheduler.set_timesteps(2)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    t = scheduler.timesteps[0]
    prev, denoised = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(2), return_dict=False)
    a_prev = float(scheduler.alphas_cumprod[int(scheduler.timesteps[1])])
    torch.testing.assert_close(prev, math.sqrt(a_prev) * denoised)
