"""calibrate(): selection by JAQ, only the quantized model generates, failures recorded, caches exact."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from qsched.calibrate import cached_text_encoders, calibrate
from qsched.errors import QSchedError
from qsched.prepare import ModelOptions
from qsched.quant import parse_preset
from qsched.score import register_scorer
from qsched.score.jaq import JAQ
from qsched.search import SearchSettings

PROMPTS = ["a shoe", "a red bag", "a coat"]
TINY = {"options": ModelOptions(steps=2, height=32, width=32), "progress": False}


def _mean(**_):
    return lambda images, prompts: images.mean((1, 2, 3))


def _std(**_):
    return lambda images, prompts: images.std((1, 2, 3))


def _picky(**_):
    def score(images, prompts):
        if float(images.mean()) > 0.5:  # fails for some coefficients only
            raise RuntimeError("picky scorer refuses bright images")
        return images.std((1, 2, 3))
    return score


register_scorer("test-mean", _mean, kind="alignment", replace=True)
register_scorer("test-std", _std, replace=True)
register_scorer("test-picky", _picky, replace=True)
JAQ_TEST = JAQ(alignment="test-mean", quality="test-std", transform="none", k=0.5)


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_card_holds_the_argmax_of_jaq_in_trials_csv(tiny_pipeline_path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = calibrate(tiny_pipeline_path("lcm"), recipe=parse_preset("w4a8"), out=out, prompts=PROMPTS,
                       search=SearchSettings(strategy="grid", grid_points=3), jaq=JAQ_TEST, **TINY)
    table = rows(out)
    assert len(table) == 10 and table[0]["role"] == "baseline" and all(r["state"] == "COMPLETE" for r in table)
    # the JAQ column is exactly mean(alignment) + k * mean(quality), and the card is its argmax
    for r in table:
        assert float(r["jaq"]) == pytest.approx(float(r["test-mean"]) + 0.5 * float(r["test-std"]))
    best = max(table, key=lambda r: float(r["jaq"]))
    card = json.loads((out / "card.json").read_text())
    assert card["coefficients"]["c_x"] == pytest.approx([float(v) for v in best["c_x"].split()])
    assert card["coefficients"]["c_eps"] == pytest.approx([float(v) for v in best["c_eps"].split()])
    assert card["objective"]["value"] == pytest.approx(float(best["jaq"]))
    assert card["objective"]["baseline_value"] == pytest.approx(float(table[0]["jaq"]))
    assert card["objective"]["alignment"] == "test-mean" and card["objective"]["k"] == 0.5
    assert card["quant"]["name"] == "w4a8" and card["steps"] == 2 and card["prompts"]["count"] == 3
    assert card["parametrization"]["space"] == "ramp"
    assert result.best.number == int(best["number"])
    for name in ("landscape.png", "compare.png", "run.json", "study.db"):
        assert (out / name).stat().st_size > 0
    assert "baseline JAQ" in result.summary() and "10 evaluated, 0 failed" in result.summary()
    at_bound = [f"{k}={v:g}" for k, v in result.best.params.items() if v in (0.8, 1.2)]
    assert result.on_boundary() == at_bound
    assert ("lies on the search boundary" in result.summary()) == bool(at_bound and not result.best.is_baseline)


def test_only_the_quantized_model_ever_generates(tiny_pipeline_path, tmp_path: Path, monkeypatch) -> None:
    from diffusers import UNet2DConditionModel

    from qsched.quant.fake import is_quantized

    calls: list[bool] = []
    original = UNet2DConditionModel.forward

    def spy(self, *args, **kwargs):
        calls.append(is_quantized(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    calibrate(tiny_pipeline_path("lcm"), recipe=parse_preset("w8a8"), out=tmp_path / "q", prompts=PROMPTS[:2],
              search=SearchSettings(strategy="random", trials=3), jaq=JAQ_TEST, **TINY)
    assert calls and all(calls), f"{calls.count(False)} full-precision denoiser calls during calibration"
    with pytest.raises(QSchedError, match="calibration runs only the quantized model.*--allow-fp"):
        calibrate(tiny_pipeline_path("lcm"), recipe=parse_preset("fp"), out=tmp_path / "fp", prompts=PROMPTS, **TINY)
    assert not (tmp_path / "fp").exists()


def test_failed_scoring_fails_the_candidate_with_its_error(tiny_pipeline_path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # the images of the tiny model are bright for large c_x starts: some candidates fail, others do not
    jaq = JAQ(alignment="test-mean", quality="test-picky", transform="none")
    try:
        calibrate(tiny_pipeline_path("lcm"), recipe=parse_preset("w4a8"), out=out, prompts=PROMPTS,
                  search=SearchSettings(strategy="grid", grid_points=3, low=0.5, high=2.0), jaq=jaq, **TINY)
    except QSchedError as err:  # every candidate failed: still recorded
        assert "every candidate failed" in str(err)
    table = rows(out)
    failed = [r for r in table if r["state"] == "FAIL"]
    assert failed and all(r["jaq"] == "" and "picky scorer refuses bright images" in r["error"] for r in failed)
    assert all(r["error"] == "" and r["jaq"] != "" for r in table if r["state"] == "COMPLETE")


def test_zscore_makes_the_baseline_zero(tiny_pipeline_path, tmp_path: Path) -> None:
    jaq = JAQ(criterion="per-image", alignment="test-mean", quality="test-std", transform="none", normalize="zscore", k=1.0)
    result = calibrate(tiny_pipeline_path("lcm"), recipe=parse_preset("w4a8"), out=tmp_path / "z", prompts=PROMPTS,
                       search=SearchSettings(strategy="random", trials=3), jaq=jaq, **TINY)
    assert result.baseline.value == pytest.approx(0.0, abs=1e-9)
    assert result.card.objective["reference"]["alignment_std"] > 0


@pytest.mark.parametrize("family", ["lcm", "sdxl-turbo", "flux-schnell"])
def test_text_encoder_cache_is_bit_identical(tiny_pipeline_path, family: str) -> None:
    from qsched.generate import sample
    from qsched.prepare import prepare_pipeline

    prepared = prepare_pipeline(tiny_pipeline_path(family), recipe=parse_preset("w4a8"), options=TINY["options"])
    plain = sample(prepared, PROMPTS[:2], [0, 1], seed=5, output_type="pt")
    with cached_text_encoders(prepared.pipe):
        first = sample(prepared, PROMPTS[:2], [0, 1], seed=5, output_type="pt")
        second = sample(prepared, PROMPTS[:2], [0, 1], seed=5, output_type="pt")
    assert torch.equal(plain, first) and torch.equal(first, second)
    assert "forward" not in vars(prepared.pipe.text_encoder)  # restored


def test_sampler_seed_changes_the_proposals_but_not_the_noise(tiny_pipeline_path, tmp_path):
    runs = [
        calibrate(tiny_pipeline_path("lcm"), recipe=parse_preset("w8a8"), out=tmp_path / f"s{s}", prompts=PROMPTS[:2],
                  search=SearchSettings(strategy="random", trials=3, sampler_seed=s), jaq=JAQ_TEST, **TINY)
        for s in (0, 1)
    ]
    assert runs[0].baseline.value == runs[1].baseline.value  # same noise: the uncorrected JAQ is identical
    assert runs[0].candidates[1].params != runs[1].candidates[1].params  # other proposals
    assert json.loads((tmp_path / "s1" / "card.json").read_text())["seed"] == 0
