from __future__ import annotations

import json

import pytest
from torch import nn

from qsched.quant import QuantRecipe, QuantReport, parse_preset, quantize


def model() -> nn.Sequential:
    # names: 0 conv (skipped), 1 norm (other), 2 flatten, 3 linear, 4 linear (no bias)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.Linear(32, 8, bias=False)
    )


RECIPE = QuantRecipe(weight_bits=4, act_bits=8, skip=("0", "nothing*"))


def test_golden_counts_and_reasons() -> None:
    report = quantize(model(), RECIPE)
    assert report.by_type() == {
        "Linear": {"layers": 2, "quantized": 128 * 32 + 32 * 8, "kept": 32, "kept_by_reason": {"bias (always full precision)": 32}},
        "Conv2d": {"layers": 1, "quantized": 0, "kept": 8 * 4 * 9 + 8, "kept_by_reason": {"skipped by pattern '0'": 296}},
        "other": {"layers": 1, "quantized": 0, "kept": 16, "kept_by_reason": {"not a Linear/Conv2d layer": 16}},
    }
    assert report.quantized_params == 4352 and report.kept_params == 344
    assert report.quantized_fraction == pytest.approx(4352 / 4696)
    assert report.quantized_layers == ("3", "4")
    assert report.act_quantized_layers == ("3", "4")
    assert report.unmatched_skip == ("nothing*",)
    assert report.backend == "fake" and report.recipe == RECIPE


def test_other_reasons() -> None:
    report = quantize(model(), QuantRecipe(weight_bits=16, act_bits=8, module_types=("Linear",), skip=()))
    reasons = {r.name: r.kept_reason for r in report.layers}
    assert reasons == {"0": "Conv2d not in module_types", "1": "not a Linear/Conv2d layer", "3": "weight_bits=16", "4": "weight_bits=16"}
    assert report.quantized_params == 0 and report.act_quantized_layers == ("3", "4")
    assert not report.unmatched_skip


def test_to_dict_is_json_and_complete() -> None:
    report = quantize(model(), RECIPE)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["recipe"] == RECIPE.to_dict()
    assert data["quantized_params"] == 4352 and data["kept_params"] == 344
    assert [layer["name"] for layer in data["layers"]] == ["0", "1", "3", "4"]
    assert data["layers"][2] == {"name": "3", "layer_type": "Linear", "quantized_params": 4096, "kept_params": 32, "kept_reason": "bias (always full precision)", "act_bits": 8}


def test_format_table() -> None:
    text = quantize(model(), RECIPE).format()
    lines = text.splitlines()
    assert lines[0] == f"quantization {RECIPE.name} (backend fake)"
    assert lines[3].split() == ["Linear", "2", "4,352", "32", "99.3"]
    assert lines[4].split() == ["Conv2d", "1", "0", "296", "0.0"]
    assert lines[6].split() == ["total", "4", "4,352", "344", "92.7"]
    assert "skipped by pattern '0'" in text and "skip patterns matching no module: nothing*" in text


def test_frozen_and_empty() -> None:
    report = quantize(nn.Sequential(nn.ReLU()), parse_preset("w8a8"))
    assert isinstance(report, QuantReport) and report.layers == ()
    assert report.quantized_fraction == 0.0 and "total" in report.format()
    with pytest.raises(AttributeError):
        report.backend = "x"  # type: ignore[misc]
