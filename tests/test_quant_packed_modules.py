"""Packed layers against the fake-quant reference: same weights, same outputs, fewer bytes."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from qsched.errors import QSchedError
from qsched.quant import is_quantized, parse_preset, quantize
from qsched.quant.fake import dequantize_weight, quantize_weight
from qsched.quant.packed_modules import (
    PackedConv2d,
    PackedLayer,
    PackedLinear,
    decode_weight,
    encode_codes,
    pack_int4,
    unpack_int4,
)
from qsched.quant.stream import pack_model

RECIPES = ["w8a8", "w4a8", "w4a4", "w4a16", "w8a16", "w4a8-ref", "w4a4-ref"]


def layers(seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict({
        "lin": nn.Linear(96, 40),
        "nobias": nn.Linear(96, 24, bias=False),
        "conv": nn.Conv2d(12, 16, 3, padding=1),
        "strided": nn.Conv2d(12, 8, 3, stride=2, padding=1, bias=False),
        "grouped": nn.Conv2d(12, 12, 3, padding=1, groups=3),
        "reflect": nn.Conv2d(12, 8, 3, padding=1, padding_mode="reflect"),
    })


def run(model: nn.ModuleDict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, img = torch.randn(3, 7, 96, generator=g), torch.randn(2, 12, 9, 9, generator=g)
    return {name: module(x if isinstance(module, (nn.Linear, PackedLinear)) else img) for name, module in model.items()}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 8])
def test_decode_is_bit_identical_to_the_fake_dequantization(bits: int, group_size: int | None) -> None:
    weight = torch.randn(6, 5, 3, 3) * 3  # 45 inputs per output: odd numel per row
    group = group_size if group_size is not None and 45 % group_size == 0 else 45
    codes, scale = quantize_weight(weight, bits=bits, group_size=group)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        want = dequantize_weight(codes, scale, shape=weight.shape, dtype=dtype)
        got = decode_weight(encode_codes(codes, bits), scale, bits=bits, shape=tuple(weight.shape), dtype=dtype)
        assert got.dtype == dtype and torch.equal(got, want)


def test_int4_codes_two_per_byte() -> None:
    codes = torch.tensor([-8, 7, 0, -1, 3], dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.tolist() == [0x00 | (0x0F << 4), 0x08 | (0x07 << 4), 0x0B]
    assert torch.equal(unpack_int4(packed, 5), codes)


@pytest.mark.parametrize("preset", RECIPES)
def test_packed_layers_compute_exactly_what_fake_quant_computes(preset: str) -> None:
    recipe = parse_preset(preset)
    fake, packed = layers(), layers()
    quantize(fake, recipe)
    pack_model(packed, recipe)
    kinds = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}
    for name, module in packed.items():
        targeted = any(isinstance(layers()[name], kinds[t]) for t in recipe.module_types)
        assert isinstance(module, PackedLayer) == targeted, name
    assert is_quantized(packed)
    with torch.no_grad():
        want, got = run(fake), run(packed)
    for name in want:
        assert torch.equal(got[name], want[name]), name
        assert torch.equal(packed[name].weight, fake[name].weight), name


def test_packed_layers_hold_codes_not_floats() -> None:
    model = layers()
    fp_bytes = {n: sum(p.numel() * 4 for p in m.parameters()) for n, m in model.items()}
    pack_model(model, parse_preset("w4a8"))
    for name, module in model.items():
        floats = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        weight_numel = module.weight_codes.numel() * 2
        # only the bias and the per-channel scales remain in float
        assert sum(t.numel() for t in floats) == module.weight_scale.numel() + (0 if module.bias is None else module.bias.numel())
        assert module.weight_codes.dtype == torch.uint8 and weight_numel >= module.weight.numel()
        assert module.packed_bytes() < fp_bytes[name] / 5, name
    state = model.state_dict()
    assert not any(k.endswith(".weight") for k in state)


def test_packed_layers_run_in_half_precision() -> None:
    fake, packed = layers(), layers()
    recipe = parse_preset("w4a8")
    quantize(fake, recipe)
    pack_model(packed, recipe)
    fake, packed = fake.to(torch.bfloat16), packed.to(torch.bfloat16)
    x = torch.randn(4, 96).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(packed["lin"](x), fake["lin"](x))


def test_wrong_codes_are_refused() -> None:
    layer = PackedLinear(16, 4, weight_bits=4, group_size=16, dtype=torch.float32, bias=False)
    with pytest.raises(QSchedError, match="does not fit"):
        layer.set_weight(torch.zeros(64, dtype=torch.int8), torch.ones(4, 1))
    with pytest.raises(QSchedError, match="does not divide"):
        PackedLinear(10, 4, weight_bits=4, group_size=4, dtype=torch.float32, bias=False)
    with pytest.raises(QSchedError, match="4- or 8-bit"):
        PackedConv2d(nn.Conv2d(2, 2, 1), weight_bits=16, group_size=2, dtype=torch.float32, bias=True)


def test_pack_model_frees_the_float_weights_and_refuses_twice() -> None:
    model = layers()
    original = model["lin"]
    pack_model(model, parse_preset("w8a8"))
    assert original.weight is None
    with pytest.raises(QSchedError, match="already quantized"):
        pack_model(model, parse_preset("w8a8"))
    copy.deepcopy(model)  # packed models copy (worker processes, evaluate configs)


@pytest.mark.parametrize("preset", ["w8a8", "w4a8", "w4a8-ref"])
def test_int8_kernel_matches_fake_quant_to_float_rounding(preset: str) -> None:
    from qsched.quant.packed_modules import use_int8_kernel

    recipe = parse_preset(preset)
    if recipe.group_size is not None:  # grouped weights: _int_mm cannot apply one scale per row
        packed = layers()
        pack_model(packed, recipe)
        assert use_int8_kernel(packed) == 0
        recipe = dataclasses.replace(recipe, group_size=None)
    fake, packed = layers(), layers()
    quantize(fake, recipe)
    pack_model(packed, recipe)
    assert use_int8_kernel(packed) == 2  # the two Linear layers; convolutions keep dequantizing
    for rows in (3, 40):  # fewer and more than _int_mm's 16-row minimum
        x = torch.randn(rows, 96) * 3 + 0.5
        with torch.no_grad():
            for name in ("lin", "nobias"):
                got, want = packed[name](x), fake[name](x)
                assert packed[name].int8_kernel
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
