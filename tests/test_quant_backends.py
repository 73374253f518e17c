from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from qsched.errors import QSchedError
from qsched.quant import QuantRecipe, is_quantized, parse_preset, quantize, save_packed

LINEAR_ONLY = dict(module_types=("Linear",), skip=())


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 4 * 4, 32)).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("preset", ["w8a8", "w4a8", "w8a16"])
def test_torchao_agrees_with_fake(preset: str) -> None:
    pytest.importorskip("torchao")
    recipe = dataclasses.replace(parse_preset(preset), **LINEAR_ONLY)
    x = torch.randn(2, 5, 64)
    ref, fake, real = mlp(), mlp(), mlp()
    quantize(fake, recipe)
    report = quantize(real, recipe, backend="torchao")
    assert report.backend == "torchao" and report.quantized_layers == ("0", "2")
    assert type(real[0].weight).__name__ != "Parameter" and is_quantized(real)
    with torch.inference_mode():
        y_ref, y_fake, y_real = ref(x), fake(x), real(x)
    # torchao's symmetric grid is amax/(2^b - 1)/2 with codes in [-2^(b-1), 2^(b-1) - 1], ours
    # amax/(2^(b-1) - 1): the rounding differs, the error level must not.
    err_fake, err_real = rel_err(y_fake, y_ref), rel_err(y_real, y_ref)
    assert 1e-4 < err_real < 1.5 * err_fake
    assert rel_err(y_real, y_fake) < 2 * err_fake


def test_torchao_w4a8_ref_agrees_with_fake_to_float_rounding() -> None:
    """w4a8-ref is torchao's Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32)) exactly."""
    pytest.importorskip("torchao")
    recipe = parse_preset("w4a8-ref")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 64, generator=g) * 3 + 0.5  # asymmetric activations: a shifted range
    ref, fake, real = mlp(), mlp(), mlp()
    quantize(fake, recipe)
    quantize(real, recipe, backend="torchao")
    for i in (0, 2):
        torchao_weight = real[i].weight
        assert torchao_weight.qdata.min().item() == -8  # the full-range int4 grid
        assert torch.equal(fake[i].weight, torchao_weight.dequantize())
        assert torch.equal(getattr(fake[i], "qsched_weight_scale"), torchao_weight.scale.reshape(fake[i].qsched_weight_scale.shape))
    with torch.inference_mode():
        y_ref, y_fake, y_real = ref(x), fake(x), real(x)
    assert torch.allclose(y_fake, y_real, rtol=0, atol=1e-6)
    assert rel_err(y_fake, y_ref) > 1e-3  # and it did quantize


def test_torchao_refusals() -> None:
    pytest.importorskip("torchao")
    model = conv_net()
    with pytest.raises(QSchedError, match=r"torchao.*Linear layers only.*1 Conv2d layers \(e.g. '0'\).*module_types=\('Linear',\)"):
        quantize(model, QuantRecipe(weight_bits=8, act_bits=8, skip=()), backend="torchao")
    assert not is_quantized(model)
    with pytest.raises(QSchedError, match=r"'torchao' does not support recipe 'w4a4-Linear-noskip'.*use backend='fake'"):
        quantize(mlp(), dataclasses.replace(parse_preset("w4a4"), **LINEAR_ONLY), backend="torchao")
    with pytest.raises(QSchedError, match=r"Int4WeightOnlyConfig needs a CUDA device, the model is on cpu"):
        quantize(mlp(), dataclasses.replace(parse_preset("w4a16"), **LINEAR_ONLY), backend="torchao")
    with pytest.raises(QSchedError, match="per-channel weights only"):
        quantize(mlp(), QuantRecipe(weight_bits=8, act_bits=8, group_size=32, **LINEAR_ONLY), backend="torchao")
    with pytest.raises(QSchedError, match=r"'w4a4-ref'.*one scale per token, not 4 groups"):
        quantize(mlp(), parse_preset("w4a4-ref"), backend="torchao")
    with pytest.raises(QSchedError, match="activation-only"):
        quantize(mlp(), QuantRecipe(weight_bits=16, act_bits=8, **LINEAR_ONLY), backend="torchao")


def test_torchao_grouped_w4a8_and_no_packed_export(tmp_path: Path) -> None:
    pytest.importorskip("torchao")
    model = mlp()
    quantize(model, QuantRecipe(weight_bits=4, act_bits=8, group_size=32, **LINEAR_ONLY), backend="torchao")
    with torch.inference_mode():
        assert model(torch.randn(3, 64)).shape == (3, 32)
    with pytest.raises(QSchedError, match="already quantized"):
        quantize(model, parse_preset("w8a8"))
    with pytest.raises(QSchedError, match="backend 'packed' or 'fake'"):
        save_packed(model, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("bits", "tol"), [(8, 1e-3), (4, 0.2)])
def test_quanto_weight_only_covers_conv2d(bits: int, tol: float) -> None:
    pytest.importorskip("optimum.quanto")
    recipe = QuantRecipe(weight_bits=bits, act_bits=16, skip=())
    x = torch.randn(2, 4, 4, 4)
    fake, real = conv_net(), conv_net()
    quantize(fake, recipe)
    report = quantize(real, recipe, backend="quanto")
    assert report.by_type()["Conv2d"]["quantized"] == 16 * 4 * 9
    assert report.quantized_layers == ("0", "2")
    assert type(real[0]).__name__ == "QConv2d" and is_quantized(real)
    with torch.no_grad():
        # int8: the same symmetric per-channel grid; int4: quanto's own (asymmetric, grouped) grid
        assert rel_err(real(x), fake(x)) < tol


def test_quanto_refusals() -> None:
    pytest.importorskip("optimum.quanto")
    model = conv_net()
    with pytest.raises(QSchedError, match=r"'quanto' does not support recipe 'w4a8-noskip'.*static per-tensor"):
        quantize(model, QuantRecipe(weight_bits=4, act_bits=8, skip=()), backend="quanto")
    with pytest.raises(QSchedError, match="group_size=None"):
        quantize(model, QuantRecipe(weight_bits=4, act_bits=16, group_size=4, skip=()), backend="quanto")
    assert not is_quantized(model) and type(model[0]) is nn.Conv2d
