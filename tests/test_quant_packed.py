from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qsched.errors import QSchedError
from qsched.quant import QuantRecipe, is_quantized, load_packed, packed_size, parse_preset, quantize, read_packed_recipe, save_packed
from qsched.quant.packed import pack_int4, unpack_int4


def tiny_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=16, norm_num_groups=4, sample_size=8,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def big_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Conv2d(128, 64, 2))


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys()
    assert all(torch.equal(ba[k], bb[k]) for k in ba)


def test_int4_packing_round_trip() -> None:
    codes = torch.arange(-7, 8, dtype=torch.int8).repeat(3)  # odd count: 45
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 23
    assert torch.equal(unpack_int4(packed, 45), codes)
    # golden: low nibble first, offset 8
    assert pack_int4(torch.tensor([-7, 7], dtype=torch.int8)).tolist() == [0x01 | (0x0F << 4)]


@pytest.mark.parametrize("preset", ["w4a8", "w8a8", "w4a16", "w4a4", "w4a4-ref"])
def test_unet_round_trip_bit_identical(tmp_path: Path, preset: str) -> None:
    model = tiny_unet()
    report = quantize(model, parse_preset(preset))
    path = save_packed(model, tmp_path / "unet.safetensors")
    fresh = tiny_unet()
    with torch.no_grad():  # the fresh model need not hold the same FP weights
        for p in fresh.parameters():
            p.add_(1.0)
    loaded_report = load_packed(fresh, path)
    assert loaded_report == report
    assert_same_model(model, fresh)
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g)
    t = torch.tensor([3, 700])
    assert torch.equal(fresh(x, t, e).sample, model(x, t, e).sample)
    assert read_packed_recipe(path) == parse_preset(preset)


def test_grouped_round_trip_and_header(tmp_path: Path) -> None:
    model = big_mlp()
    recipe = QuantRecipe(weight_bits=4, act_bits=8, group_size=64, skip=())
    quantize(model, recipe)
    path = save_packed(model, tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "qsched.packed" and meta["format_version"] == "1"
        assert QuantRecipe.from_dict(json.loads(meta["recipe"])) == recipe
        assert json.loads(meta["layers"])["0.weight"] == {"bits": 4, "shape": [512, 512], "dtype": "float32"}
        assert f.get_tensor("0.weight.qsched_codes").dtype == torch.uint8
        assert f.get_tensor("0.weight.qsched_scale").shape == (512, 8)
        assert f.get_tensor("0.bias").dtype == torch.float32
        assert "0.weight" not in f.keys()
    fresh = big_mlp(seed=1)
    load_packed(fresh, path)
    assert_same_model(model, fresh)
    x = torch.randn(3, 4, 512)
    assert torch.equal(fresh[:4](x), model[:4](x))


def test_full_range_codes_round_trip(tmp_path: Path) -> None:
    """w4a8-ref's torchao grid uses code -8, which the nibble stores as 0."""
    model = big_mlp()
    quantize(model, parse_preset("w4a8-ref"))
    path = save_packed(model, tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        codes = unpack_int4(f.get_tensor("0.weight.qsched_codes"), 512 * 512)
    assert codes.min().item() == -8 and codes.max().item() == 7
    fresh = big_mlp(seed=1)
    load_packed(fresh, path)
    assert_same_model(model, fresh)
    assert read_packed_recipe(path).name == "w4a8-ref"
    x = torch.randn(3, 4, 512)
    assert torch.equal(fresh[:4](x), model[:4](x))


def test_one_fp_checkpoint_serves_every_bit_width(tmp_path: Path) -> None:
    sizes = {}
    for preset in ["w4a8", "w8a8"]:
        model = big_mlp()  # always re-quantize from the FP weights
        quantize(model, dataclasses.replace(parse_preset(preset), skip=()))
        sizes[preset] = packed_size(save_packed(model, tmp_path / f"{preset}.safetensors"))
    w4, w8 = sizes["w4a8"], sizes["w8a8"]
    n = 2 * (512 * 512 + 512) + 64 * 128 * 4 + 64
    assert w4.fp32_bytes == w8.fp32_bytes == 4 * n and w4.fp16_bytes == 2 * n
    assert w4.ratio_vs_fp32 >= 7.0, w4.format()
    assert 3.5 <= w8.ratio_vs_fp32 < 4.0
    assert w4.ratio_vs_fp16 >= 3.5
    assert w4.to_dict()["file_bytes"] == Path(w4.path).stat().st_size


def test_save_refuses_unquantized_or_modified(tmp_path: Path) -> None:
    with pytest.raises(QSchedError, match="not quantized"):
        save_packed(big_mlp(), tmp_path / "a.safetensors")
    model = big_mlp()
    quantize(model, QuantRecipe(weight_bits=8, act_bits=8, skip=()))
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-3
    with pytest.raises(QSchedError, match=r"layer '0'.*no longer on the quantization grid"):
        save_packed(model, tmp_path / "b.safetensors")
    assert not list(tmp_path.iterdir())  # no partial output


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    model = big_mlp()
    quantize(model, QuantRecipe(weight_bits=4, act_bits=8, skip=()))
    return save_packed(model, tmp_path / "m.safetensors")


def test_truncated_and_corrupt_files(packed: Path, tmp_path: Path) -> None:
    data = packed.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    header_cut = tmp_path / "header.safetensors"
    header_cut.write_bytes(data[:20])
    for bad in (truncated, garbage, header_cut):
        model = big_mlp()
        with pytest.raises(QSchedError, match=rf"{bad.name}.*corrupt or truncated"):
            load_packed(model, bad)
        assert not is_quantized(model)
    with pytest.raises(QSchedError, match="does not exist"):
        load_packed(big_mlp(), tmp_path / "missing.safetensors")


def test_not_a_packed_file_and_unknown_version(packed: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file(big_mlp().state_dict(), str(plain))
    with pytest.raises(QSchedError, match=r"plain.safetensors.*not a qsched packed checkpoint"):
        load_packed(big_mlp(), plain)
    with safe_open(str(packed), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    future = tmp_path / "future.safetensors"
    save_file(tensors, str(future), metadata={**meta, "format_version": "99"})
    with pytest.raises(QSchedError, match=r"future.safetensors.*format version '99'.*reads version 1"):
        load_packed(big_mlp(), future)
    badrecipe = tmp_path / "badrecipe.safetensors"
    save_file(tensors, str(badrecipe), metadata={**meta, "recipe": json.dumps({"weight_bits": 3, "act_bits": 8})})
    with pytest.raises(QSchedError, match=r"badrecipe.safetensors.*bad recipe.*weight_bits=3"):
        load_packed(big_mlp(), badrecipe)


def test_wrong_architecture(packed: Path) -> None:
    fewer = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 512))
    with pytest.raises(QSchedError, match=r"m.safetensors' does not match this model \(unexpected keys '4.bias', '4.weight.qsched_codes'"):
        load_packed(fewer, packed)
    more = nn.Sequential(*big_mlp(), nn.Linear(4, 4))
    with pytest.raises(QSchedError, match=r"missing keys '5.bias', '5.weight.qsched_codes', '5.weight.qsched_scale'"):
        load_packed(more, packed)
    no_bias = nn.Sequential(*list(big_mlp())[:4], nn.Conv2d(128, 64, 2, bias=False))
    with pytest.raises(QSchedError, match=r"unexpected keys '4.bias'"):
        load_packed(no_bias, packed)
    narrower = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Conv2d(128, 64, 2))
    with pytest.raises(QSchedError, match=r"layer '2.weight' does not match the model \(file 4-bit shape \[512, 512\].*model shape \[256, 512\]"):
        load_packed(narrower, packed)
    assert not is_quantized(narrower)
    bias_shape = nn.Sequential(*big_mlp())
    bias_shape[4].bias = nn.Parameter(torch.zeros(65))
    with pytest.raises(QSchedError, match=r"shape mismatch for '4.bias': file \(64,\), model \(65,\)"):
        load_packed(bias_shape, packed)


def test_load_refuses_quantized_model(packed: Path) -> None:
    model = big_mlp()
    quantize(model, parse_preset("w8a8"))
    with pytest.raises(QSchedError, match="already quantized"):
        load_packed(model, packed)
