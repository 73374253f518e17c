from __future__ import annotations

import json

import pytest
import torch
from flow_helpers import save_tiny_flow

from qsched.builtin.data import write_fake_dataset
from qsched.builtin.diagnose import _real_batch, main, speckle, tone
from qsched.builtin.pipeline import QSchedBuiltinPipeline
from qsched.builtin.unet import SHAPES, make_student_scheduler, make_teacher_scheduler, make_unet


def test_speckle_counts_isolated_pixels_not_edges():
    flat = torch.zeros(1, 1, 8, 8)
    assert speckle(flat) == (0.0, 0.0)
    dot = flat.clone()
    dot[0, 0, 3, 4] = 1.0  # one white pixel on black: its 3x3 median is 0, its neighbours' medians too
    assert speckle(dot) == (1 / 64, 1 / 64)
    half = flat.clone()
    half[..., 4:] = 1.0  # a straight edge: every pixel equals its neighbourhood's median
    assert speckle(half) == (0.0, 0.0)
    faint = flat.clone()
    faint[0, 0, 3, 4] = 0.05  # below the 0.1 threshold: deviation counted, not a speckle pixel
    frac, dev = speckle(faint)
    assert frac == 0.0 and abs(dev - 0.05 / 64) < 1e-9


def test_tone_counts_background_and_saturated_pixels_of_gray():
    images = torch.zeros(2, 3, 2, 2)
    images[0, :, 0, 0] = 1.0  # white in every channel: saturated
    images[0, 0, 0, 1] = 1.0  # white in one channel only: gray 1/3, neither
    images[1, :, 1, 1] = 0.04  # below 0.05: still background
    images[1, :, 1, 0] = 0.5
    stats = tone(images)
    gray = torch.tensor([1.0, 1 / 3, 0, 0, 0, 0, 0.5, 0.04])
    assert stats["background"] == pytest.approx(5 / 8, abs=1e-4)
    assert stats["saturated"] == pytest.approx(1 / 8, abs=1e-4)
    assert stats["mean"] == pytest.approx(float(gray.mean()), abs=1e-4)
    assert stats["std"] == pytest.approx(float(gray.std()), abs=1e-4)


def test_diagnose_reports_both_kinds_of_model(tmp_path):
    data = write_fake_dataset(tmp_path / "data", n=8)
    pixels, prompts = _real_batch(4, data)  # the training resolution: load_split pads 28 -> 32 already
    assert pixels.shape == (4, 1, 32, 32) and len(prompts) == 4 and 0 <= pixels.min() <= pixels.max() <= 1
    sources = []
    for distilled in (True, False):
        torch.manual_seed(0)
        unet = make_unet(SHAPES["tiny"], guidance_embedding=distilled).eval()
        scheduler = make_student_scheduler() if distilled else make_teacher_scheduler()
        folder = tmp_path / ("student" if distilled else "teacher")
        QSchedBuiltinPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder))
        sources.append(str(folder))
    flow = str(save_tiny_flow(tmp_path / "flow-student", distilled=True))
    out = tmp_path / "out"
    assert main([*sources, flow, "--n", "4", "--data-root", str(data), "--out", str(out)]) == 0
    report = json.loads((out / "diagnose.json").read_text())
    student, teacher, flow_student = (report["sources"][s] for s in (*sources, flow))
    assert sorted(student["sampled"], key=int) == ["1", "2", "4", "8"]
    assert sorted(teacher["sampled"], key=int) == ["4", "25"]
    assert sorted(flow_student["sampled"], key=int) == ["1", "2", "4", "8"]
    assert "clean_estimates" not in flow_student  # the probe is the UNet's v-prediction
    for row in (*student["clean_estimates"].values(), *teacher["clean_estimates"].values()):
        assert 0.0 <= row["speckle"] <= 1.0 and row["mse_x0"] > 0.0
    for row in (*student["sampled"].values(), *teacher["sampled"].values(), *flow_student["sampled"].values()):
        assert set(row) == {"speckle", "mean", "std", "background", "saturated"}
        assert all(0.0 <= value <= 1.0 for value in row.values())
    assert 0.0 <= report["real_test_speckle"] <= 1.0
    assert report["real_test_tone"] == tone(pixels)
