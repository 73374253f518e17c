"""Contract: every supported scheduler, through a real pipeline call with a generator.

With all-ones coefficients the images are bit-identical to the plain scheduler;
other coefficients change them; saving keeps the plain scheduler.
"""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

from qsched.schedule import QSchedCoefficients
from qsched.testing import TINY_CALL_KWARGS, build_tiny_pipeline
from qsched.scheduler import is_wrapped, wrap

STEPS = 2
# (tiny pipeline family, scheduler class swapped in, extra scheduler config)
CASES = [
    ("lcm", "LCMScheduler", {}),
    ("pcm-sd15", "TCDScheduler", {}),
    ("sdxl-turbo", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("flux-schnell", "FlowMatchEulerDiscreteScheduler", {}),
    ("pcm-sd15", "DDIMScheduler", {"timestep_spacing": "trailing"}),
    ("pcm-sd15", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("pcm-sd15", "DPMSolverMultistepScheduler", {}),
]


def make_pipe(family, scheduler, extra):
    pipe = build_tiny_pipeline(family)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, seed=0):
    generator = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    return pipe(["a red shoe", "a blue bag"], num_inference_steps=STEPS, generator=generator,
                output_type="pt", **TINY_CALL_KWARGS).images


@pytest.mark.parametrize("family, scheduler, extra", CASES, ids=[c[1] for c in CASES])
def test_identity_bit_identical_and_ramps_differ(family, scheduler, extra):
    pipe = make_pipe(family, scheduler, extra)
    reference = images(pipe)
    plain_scheduler = pipe.scheduler
    pipe.scheduler = wrap(plain_scheduler, QSchedCoefficients.identity(STEPS))
    assert torch.equal(images(pipe), reference)
    pipe.scheduler = wrap(plain_scheduler, QSchedCoefficients.from_ramps(cx_start=1.2, ceps_start=0.8, num_steps=STEPS))
    corrected = images(pipe)
    assert not torch.equal(corrected, reference)
    assert torch.equal(images(pipe), corrected)  # a second call sees the same coefficients


def test_consecutive_calls_never_see_stale_coefficients():
    pipe = make_pipe("lcm", "LCMScheduler", {})
    a = QSchedCoefficients.from_ramps(cx_start=1.1, ceps_start=0.9, num_steps=STEPS)
    b = QSchedCoefficients.from_ramps(cx_start=0.9, ceps_start=1.1, num_steps=STEPS)
    pipe.scheduler = wrap(pipe.scheduler, a)
    first = images(pipe)
    pipe.scheduler.set_coefficients(b)
    second = images(pipe)
    fresh = make_pipe("lcm", "LCMScheduler", {})
    fresh.scheduler = wrap(fresh.scheduler, b)
    assert torch.equal(second, images(fresh))
    pipe.scheduler.set_coefficients(a)
    assert torch.equal(images(pipe), first)


def test_saved_pipeline_reloads_with_plain_scheduler(tmp_path):
    pipe = make_pipe("lcm", "LCMScheduler", {})
    pipe.scheduler = wrap(pipe.scheduler, QSchedCoefficients.from_ramps(cx_start=1.1, ceps_start=0.9, num_steps=STEPS))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    assert "c_x" not in (tmp_path / "scheduler" / "scheduler_config.json").read_text()
    reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(reloaded.scheduler) is diffusers.LCMScheduler and not is_wrapped(reloaded.scheduler)
