"""End-to-end evaluation on a tiny pipeline: resume, mixing refused, metrics, outputs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from qsched.errors import QSchedError
from qsched.evaluate import EvalSettings, MetricSettings, evaluate, parse_configs
from qsched.evaluate.generation import load_images
from qsched.prepare import ModelOptions
from qsched.score import register_scorer

PROMPTS = ("a cat", "a dog", "a red shoe", "an ankle boot")


class PoolFeatures(torch.nn.Module):
    """A stand-in FID feature network: 2x2 average pool of the (0-255) image, 12 features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 2).flatten(1)


@pytest.fixture(scope="module")
def features_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "pool.pt"
    torch.jit.save(torch.jit.script(PoolFeatures()), str(path))
    return path


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def settings(tiny_pipeline_path, out, **overrides):
    base = EvalSettings(
        model=str(tiny_pipeline_path("lcm")), prompts=PROMPTS, configs=tuple(parse_configs("fp,w4a8")), out=str(out),
        metrics=("mse", "size"), seed=0, batch_size=2, options=ModelOptions(steps=2, height=32, width=32),
        progress=False, grid_prompts=2,
    )
    return replace(base, **overrides)


@pytest.fixture(scope="module")
def first_run(tiny_pipeline_path, tmp_path_factory, features_file, reference_dir):
    out = tmp_path_factory.mktemp("eval")
    metric = MetricSettings(fid_features=str(features_file), reference=str(reference_dir), min_reference=4,
                            clip_model=str(out / "no-clip"), cache_dir=str(out / "cache"))
    s = settings(tiny_pipeline_path, out, metrics=("fid", "clip", "mse", "size"), metric_settings=metric, keep_going=True)
    return s, evaluate(s)


def test_outputs_and_numbers(first_run):
    s, result = first_run
    out = result.out
    for name in ("results.json", "results.md", "results.png", "grid.png", "evaluation.json"):
        assert (out / name).is_file()
    assert result.generated == {"fp": 4, "w4a8": 4}
    data = json.loads((out / "results.json").read_text())
    assert data["versions"]["torch"] == torch.__version__.split("+")[0] or data["versions"]["torch"]
    fp, w4 = data["results"]["fp"], data["results"]["w4a8"]
    assert fp["mse"]["value"] == 0.0 and w4["mse"]["value"] > 0
    assert fp["fid"]["status"] == "ok" and w4["fid"]["value"] > 0
    assert w4["size"]["value"] < fp["size"]["value"]
    assert w4["size"]["change_vs_fp_percent"] == pytest.approx(100 * (w4["size"]["value"] / fp["size"]["value"] - 1))
    # a metric whose weights are missing is recorded as failed, never 0
    assert fp["clip"]["status"] == "failed" and fp["clip"]["value"] is None and "no-clip" in fp["clip"]["error"]
    records = json.loads((out / "images" / "w4a8" / "metadata.json").read_text())
    assert [r["index"] for r in records] == [0, 1, 2, 3] and records[2]["prompt"] == PROMPTS[2]


def test_resume_regenerates_nothing(first_run):
    s, result = first_run
    folder = result.out / "images" / "w4a8"
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    (folder / "00001.png").unlink()
    again = evaluate(s)
    assert again.generated == {"fp": 0, "w4a8": 1}
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if p.name != "00001.png"} == \
        {k: v for k, v in stamps.items() if k != "00001.png"}
    # image 1 was remade alone (batch of 1): equal up to last-bit kernel differences
    assert again.results["w4a8"]["mse"]["value"] == pytest.approx(result.results["w4a8"]["mse"]["value"], rel=0.05)


def test_another_evaluation_in_the_folder_is_refused(first_run):
    s, result = first_run
    with pytest.raises(QSchedError, match="different evaluation.*seed 0 there vs 5 now"):
        evaluate(replace(s, seed=5))
    with pytest.raises(QSchedError, match="prompts"):
        evaluate(replace(s, prompts=PROMPTS[::-1]))


def test_batch_size_does_not_change_images(tiny_pipeline_path, tmp_path):
    a = evaluate(settings(tiny_pipeline_path, tmp_path / "a", batch_size=1, metrics=("mse",)))
    b = evaluate(settings(tiny_pipeline_path, tmp_path / "b", batch_size=3, metrics=("mse",)))
    for config in ("fp", "w4a8"):
        x = load_images(a.out / "images" / config, range(4)).int()
        y = load_images(b.out / "images" / config, range(4)).int()
        # the noise is the same; batched kernels may differ in the last float bit, which a
        # quantizer's rounding can turn into a level or two in a few pixels
        diff = (x - y).abs()
        assert diff.max() <= (1 if config == "fp" else 4) and diff.float().mean() < 0.5


def test_missing_metric_weights_stop_the_run_unless_keep_going(tiny_pipeline_path, tmp_path):
    s = settings(tiny_pipeline_path, tmp_path / "x", metrics=("clip", "mse"),
                 metric_settings=MetricSettings(clip_model=str(tmp_path / "missing-clip")))
    with pytest.raises(QSchedError, match="metric clip: .*missing-clip.*--keep-going"):
        evaluate(s)
    assert not (tmp_path / "x").exists()  # nothing written before inputs are checked


def test_any_registered_scorer_is_a_metric_with_its_weights_option(tiny_pipeline_path, tmp_path):
    seen = {}

    def factory(path: str, device: str = "cpu"):
        seen.update(path=path, device=device)
        return lambda images, prompts: images.mean((1, 2, 3)) * 10  # brightness, per image

    register_scorer("test-brightness", factory, kind="quality", replace=True)
    s = settings(tiny_pipeline_path, tmp_path / "s", metrics=("test-brightness", "brisque", "mse"),
                 metric_settings=MetricSettings(scorer_weights={"test-brightness": "/weights/b"}))
    result = evaluate(s)
    assert seen == {"path": "/weights/b", "device": "cpu"}
    for config in ("fp", "w4a8"):
        images = load_images(tmp_path / "s" / "images" / config, range(len(PROMPTS))).float() / 255
        row = result.results[config]
        assert row["test-brightness"]["value"] == pytest.approx(float(images.mean((1, 2, 3)).mean() * 10), rel=1e-6)
        assert row["brisque"]["status"] == "ok" and row["brisque"]["count"] == len(PROMPTS)
    assert "test-brightness" in result.table and "-BRISQUE" in result.table
    with pytest.raises(QSchedError, match="weights are given for pickscore, which is not among the metrics"):
        settings(tiny_pipeline_path, tmp_path / "t", metrics=("mse",),
                 metric_settings=MetricSettings(scorer_weights={"pickscore": "/w"}))


def test_too_small_reference_names_the_minimum(tiny_pipeline_path, tmp_path, features_file, reference_dir):
    s = settings(tiny_pipeline_path, tmp_path / "y", metrics=("fid",),
                 metric_settings=MetricSettings(fid_features=str(features_file), reference=str(reference_dir), min_reference=10))
    with pytest.raises(QSchedError, match="has 6 images; at least 10 are needed"):
        evaluate(s)


def test_ptqd_configuration_estimates_and_reuses_statistics(tiny_pipeline_path, tmp_path):
    s = settings(tiny_pipeline_path, tmp_path / "p", configs=tuple(parse_configs("fp,w4a4+ptqd")), metrics=("mse",),
                 calibration_prompts=("a cat", "a dog"))
    result = evaluate(s)
    stats = tmp_path / "p" / "ptqd" / "w4a4.json"
    assert stats.is_file() and result.results["w4a4+ptqd"]["mse"]["value"] > 0
    before = stats.stat().st_mtime_ns
    assert evaluate(s).generated == {"fp": 0, "w4a4+ptqd": 0} and stats.stat().st_mtime_ns == before
