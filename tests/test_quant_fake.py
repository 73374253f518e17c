from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qsched.errors import QSchedError
from qsched.quant import QuantRecipe, is_quantized, parse_preset, quantize
from qsched.quant.fake import (
    SCALE_BUFFER,
    code_range,
    fake_quantize_activation,
    make_activation_quantizer,
    plan_layers,
    quantize_activation,
    quantize_weight,
)


def tiny_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=16,
        norm_num_groups=4,
        sample_size=8,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 3, 16, generator=g)


def mlp_conv() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.GELU(), nn.Linear(32, 8))


NO_SKIP = dict(skip=())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 4])
def test_weights_take_few_values_per_channel_or_group(bits: int, group_size: int | None) -> None:
    model = mlp_conv()
    quantize(model, QuantRecipe(weight_bits=bits, act_bits=16, group_size=group_size, **NO_SKIP))
    for layer in (model[0], model[2], model[4]):
        flat = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        g = group_size or flat.shape[1]
        groups = flat.reshape(flat.shape[0], -1, g)
        scale = getattr(layer, SCALE_BUFFER)
        assert scale.shape == groups.shape[:2] and scale.dtype == torch.float32
        for row in groups.reshape(-1, g):
            assert row.unique().numel() <= 2**bits - 1  # symmetric: 2^b - 1 levels
        codes = groups / scale.unsqueeze(-1)
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.abs().max() <= 2 ** (bits - 1) - 1 + 1e-4


def test_golden_weight_codes() -> None:
    # values chosen to be exact in binary floating point
    w = torch.tensor([[3.5, -1.75, 0.25, 0.0], [7.0, 3.5, -2.5, 0.5]])
    codes, scale = quantize_weight(w, bits=4, group_size=4)
    # scales 0.5 and 1.0; round half to even: -3.5 -> -4, 0.5 -> 0, 3.5 -> 4, -2.5 -> -2
    assert codes.tolist() == [[7, -4, 0, 0], [7, 4, -2, 0]]
    assert scale.tolist() == [[0.5], [1.0]]
    codes, scale = quantize_weight(torch.tensor([[127.0, -63.5, 2.54, 0.0]]), bits=8, group_size=2)
    assert codes.tolist() == [[127, -64, 127, 0]]
    # an all-zero group gets scale 1 (codes 0), never NaN
    codes, scale = quantize_weight(torch.zeros(1, 4), bits=4, group_size=2)
    assert codes.tolist() == [[0, 0, 0, 0]] and scale.tolist() == [[1.0, 1.0]]


def test_error_shrinks_with_more_bits() -> None:
    x, t, e = unet_inputs()
    ref = tiny_unet()(x, t, e).sample
    errs = {}
    for name in ["w4a4", "w4a8", "w8a8"]:
        model = tiny_unet()
        quantize(model, parse_preset(name))
        errs[name] = (model(x, t, e).sample - ref).pow(2).mean().item()
    assert errs["w8a8"] < errs["w4a8"] < errs["w4a4"]
    assert errs["w8a8"] < 1e-3 * ref.pow(2).mean().item()
    w = torch.randn(16, 64)
    werr = {b: (w - quantize_weight(w, bits=b, group_size=64)[0] * quantize_weight(w, bits=b, group_size=64)[1]).abs().mean() for b in (4, 8)}
    assert werr[8] < werr[4] / 8
    gerr = (w - (quantize_weight(w, bits=4, group_size=8)[0].reshape(16, 8, 8) * quantize_weight(w, bits=4, group_size=8)[1].unsqueeze(-1)).reshape(16, 64)).abs().mean()
    assert gerr < werr[4]  # smaller groups, smaller error


def test_activation_hook_per_token_matches_hand_computation() -> None:
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4))
    quantize(lin, QuantRecipe(weight_bits=16, act_bits=4, **NO_SKIP))
    x = torch.tensor([[[0.7, 0.26, -0.05, 0.0], [1.4, -0.1, 0.3, 0.52]]])
    # token 0: scale 0.7/7 = 0.1 -> codes [7, 3, -0 (-0.5 -> even), 0]
    # token 1: scale 1.4/7 = 0.2 -> codes [7, -0 (-0.5), 2 (1.5 -> even), 3 (2.6)]
    expected = torch.tensor([[[0.7, 0.3, 0.0, 0.0], [1.4, 0.0, 0.4, 0.6]]])
    assert torch.allclose(lin(x), expected, atol=1e-6)
    assert torch.equal(lin.weight, torch.eye(4))  # weight_bits=16 leaves weights alone


def test_activation_hook_per_pixel_for_conv() -> None:
    conv = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
    quantize(conv, QuantRecipe(weight_bits=16, act_bits=4, **NO_SKIP))
    x = torch.zeros(1, 3, 1, 2)
    x[0, :, 0, 0] = torch.tensor([0.7, 0.26, -0.05])  # pixel 0: scale 0.1
    x[0, :, 0, 1] = torch.tensor([-1.4, 0.3, 0.52])  # pixel 1: scale 0.2
    expected = torch.zeros(1, 3, 1, 2)
    expected[0, :, 0, 0] = torch.tensor([0.7, 0.3, 0.0])
    expected[0, :, 0, 1] = torch.tensor([-1.4, 0.4, 0.6])
    assert torch.allclose(conv(x), expected, atol=1e-6)


def test_activation_quantizer_levels_and_zero_rows() -> None:
    x = torch.randn(5, 3, 64)
    x[1, 2] = 0.0
    q = fake_quantize_activation(x, bits=8, dim=-1)
    assert not q.isnan().any() and torch.equal(q[1, 2], torch.zeros(64))
    for row in q.reshape(-1, 64):
        assert row.unique().numel() <= 255
    # amax survives exactly (up to fp rounding) and x is not modified
    assert torch.allclose(q.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)
    assert not torch.equal(q, x)


def test_quantized_linear_equals_manual_fake_quant() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    w0 = lin.weight.detach().clone()
    quantize(lin, QuantRecipe(weight_bits=4, act_bits=8, **NO_SKIP))
    codes, scale = quantize_weight(w0, bits=4, group_size=16)
    x = torch.randn(3, 16)
    manual = nn.functional.linear(fake_quantize_activation(x, bits=8, dim=-1), codes * scale, lin.bias)
    assert torch.equal(lin(x), manual)


def test_fp_recipe_and_16_bits_are_exact_noops() -> None:
    x, t, e = unet_inputs()
    ref_model = tiny_unet()
    ref = ref_model(x, t, e).sample
    model = tiny_unet()
    report = quantize(model, parse_preset("fp"))
    assert report.quantized_params == 0 and not is_quantized(model)
    assert torch.equal(model(x, t, e).sample, ref)
    assert all(not m._forward_pre_hooks for m in model.modules())
    # w4a16: no activation hooks; w16a8: no weight change
    model = tiny_unet()
    quantize(model, parse_preset("w4a16"))
    assert all(not m._forward_pre_hooks for m in model.modules())
    model = tiny_unet()
    quantize(model, QuantRecipe(weight_bits=16, act_bits=8))
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_default_skip_list_on_unet() -> None:
    ref = tiny_unet()
    model = tiny_unet()
    report = quantize(model, parse_preset("w4a8"))
    for name in ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]:
        module = model.get_submodule(name)
        assert torch.equal(module.weight, ref.get_submodule(name).weight), name
        assert not hasattr(module, SCALE_BUFFER) and not module._forward_pre_hooks
        assert name not in report.quantized_layers
    # attention projections inside blocks (also called proj_out) are quantized
    inner = "down_blocks.0.attentions.0.proj_out"
    assert inner in report.quantized_layers
    assert not torch.equal(model.get_submodule(inner).weight, ref.get_submodule(inner).weight)


def test_custom_skip_and_module_types() -> None:
    model, ref = mlp_conv(), mlp_conv()
    report = quantize(model, QuantRecipe(weight_bits=4, act_bits=8, skip=("4",), module_types=("Linear",)))
    assert torch.equal(model[0].weight, ref[0].weight)  # Conv2d not targeted
    assert torch.equal(model[4].weight, ref[4].weight)  # skipped by pattern
    assert not torch.equal(model[2].weight, ref[2].weight)
    assert report.quantized_layers == ("2",)
    assert report.act_quantized_layers == ("2",)


def test_keys_classes_and_dtypes_unchanged_and_deepcopy() -> None:
    model, ref = tiny_unet(), tiny_unet()
    quantize(model, parse_preset("w4a8"))
    assert list(model.state_dict()) == list(ref.state_dict())
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x, t, e = unet_inputs()
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x, t, e).sample, model(x, t, e).sample)
    assert ref.load_state_dict(model.state_dict()) is not None  # plain FP model can load it


def test_already_quantized_is_refused() -> None:
    model = mlp_conv()
    quantize(model, parse_preset("w8a8"))
    assert is_quantized(model)
    with pytest.raises(QSchedError, match="already quantized.*freshly loaded"):
        quantize(model, parse_preset("w4a8"))


def test_group_size_not_dividing_names_layer_and_changes_nothing() -> None:
    model, ref = mlp_conv(), mlp_conv()
    with pytest.raises(QSchedError, match=r"group_size=5 does not divide.*'0' \(Conv2d \(8, 4, 3, 3\), input size 36\) and 2 more"):
        quantize(model, QuantRecipe(weight_bits=4, group_size=5, skip=()))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert not is_quantized(model)


def test_bad_arguments() -> None:
    with pytest.raises(QSchedError, match="use qsched.quant.parse_preset"):
        quantize(mlp_conv(), "w4a8")  # type: ignore[arg-type]
    with pytest.raises(QSchedError, match="unknown quantization backend 'tensorrt'"):
        quantize(mlp_conv(), parse_preset("w4a8"), backend="tensorrt")


def test_flux_transformer_default_skip() -> None:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    ).eval()
    report = quantize(model, parse_preset("w4a8"))
    kept = {r.name: r.kept_reason for r in report.layers if r.layer_type == "Linear" and not r.quantized_params}
    assert kept["x_embedder"] == "skipped by pattern 'x_embedder'"
    assert kept["proj_out"] == "skipped by pattern 'proj_out'"
    assert kept["norm_out.linear"] == "skipped by pattern 'norm_out*'"
    assert kept["time_text_embed.timestep_embedder.linear_1"] == "skipped by pattern '*time_text_embed*'"
    assert "transformer_blocks.0.attn.to_q" in report.quantized_layers
    assert "single_transformer_blocks.0.proj_mlp" in report.quantized_layers
    g = torch.Generator().manual_seed(0)
    out = model(
        hidden_states=torch.randn(1, 16, 4, generator=g), encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
        pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(3, 3),
    ).sample
    assert out.shape == (1, 16, 4) and torch.isfinite(out).all()


def test_half_precision_model() -> None:
    model = mlp_conv().to(torch.bfloat16)
    quantize(model, QuantRecipe(weight_bits=4, act_bits=8, skip=()))
    assert model[2].weight.dtype == torch.bfloat16
    out = model(torch.randn(2, 4, 4, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_full_range_weight_grid_is_torchaos() -> None:
    # amax 0.75 -> scale 0.75 / 7.5 = 0.1; +-7.5 rounds half to even: +8 (clamped to 7) and -8
    w = torch.tensor([[0.75, -0.75, 0.31, -0.04]])
    codes, scale = quantize_weight(w, bits=4, group_size=4, full_range=True)
    assert torch.allclose(scale, torch.tensor([[0.1]]))
    assert codes.tolist() == [[7.0, -8.0, 3.0, -0.0]]
    assert code_range(4, full_range=True) == (-8, 7) and code_range(4) == (-7, 7)
    assert code_range(8, full_range=True) == (-128, 127)
    narrow, _ = quantize_weight(w, bits=4, group_size=4)  # scale 0.75 / 7
    assert narrow.tolist() == [[7.0, -7.0, 3.0, -0.0]]


def test_asymmetric_activation_matches_hand_computation() -> None:
    x = torch.tensor([[-0.3, 0.1, 0.45, 1.2], [0.2, 0.4, 0.6, 0.0]])
    codes, scale, zero_point = quantize_activation(x, bits=4, dim=-1, symmetric=False)
    # token 0: range [-0.3, 1.2] -> scale 1.5 / 15 = 0.1, zero point -8 - round(-3) = -5
    #          codes round(x / 0.1) - 5: [-8, -4, -1 (4.5 -> 4, half to even), 7]
    # token 1: range [0, 0.6] (always holds 0) -> scale 0.04, zero point -8: codes [-3, 2, 7, -8]
    assert torch.allclose(scale.reshape(-1), torch.tensor([0.1, 0.04]))
    assert zero_point.reshape(-1).tolist() == [-5.0, -8.0]
    assert codes.tolist() == [[-8.0, -4.0, -1.0, 7.0], [-3.0, 2.0, 7.0, -8.0]]
    expected = torch.tensor([[-0.3, 0.1, 0.4, 1.2], [0.2, 0.4, 0.6, 0.0]])
    assert torch.allclose(fake_quantize_activation(x, bits=4, dim=-1, symmetric=False), expected, atol=1e-6)


def test_activation_groups_per_token_and_per_pixel() -> None:
    x = torch.tensor([[0.7, 0.26, 0.014, -0.07]])
    # two groups: scales 0.7/7 = 0.1 and 0.07/7 = 0.01; one group: scale 0.1 for all four
    two = fake_quantize_activation(x, bits=4, dim=-1, groups=2)
    one = fake_quantize_activation(x, bits=4, dim=-1)
    assert torch.allclose(two, torch.tensor([[0.7, 0.3, 0.01, -0.07]]), atol=1e-6)
    assert torch.allclose(one, torch.tensor([[0.7, 0.3, 0.0, -0.1]]), atol=1e-6)
    # Conv2d: groups of channels at each pixel
    image = x.reshape(1, 4, 1, 1).repeat(1, 1, 2, 3)
    assert torch.allclose(fake_quantize_activation(image, bits=4, dim=-3, groups=2), two.reshape(1, 4, 1, 1).expand(1, 4, 2, 3), atol=1e-6)
    with pytest.raises(QSchedError, match="act_groups=3 does not divide the 4 input features"):
        fake_quantize_activation(x, bits=4, dim=-1, groups=3)


def test_plan_carries_the_activation_options_to_the_quantizer() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    recipe = QuantRecipe(weight_bits=4, act_bits=4, act_groups=2, act_symmetric=False, full_range=True, **NO_SKIP)
    plans, _ = plan_layers(model, recipe)
    assert [(p.full_range, p.act_symmetric, p.act_groups) for p in plans] == [(True, False, 2)] * 2
    quantizer = make_activation_quantizer(plans[0])
    assert (quantizer.bits, quantizer.dim, quantizer.symmetric, quantizer.groups, quantizer.full_range) == (4, -1, False, 2, True)
    x = torch.randn(3, 8)
    assert torch.equal(quantizer.quantize(x), fake_quantize_activation(x, bits=4, dim=-1, symmetric=False, groups=2))
    with pytest.raises(QSchedError, match=r"act_groups=3 does not divide the input features of layer '0' \(Linear with 8"):
        quantize(nn.Sequential(nn.Linear(8, 8)), QuantRecipe(weight_bits=4, act_bits=4, act_groups=3, **NO_SKIP))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_half_precision_activations_stay_on_the_int8_grid(dtype: torch.dtype, symmetric: bool) -> None:
    # In bfloat16, 1.328125 / (1.328125 / 127) rounds to 128: outside [-127, 127].
    x = torch.tensor([[1.328125, 0.1, -0.5]], dtype=torch.bfloat16)
    naive_scale = x.abs().amax(-1, keepdim=True) / 127
    assert (x / naive_scale).round().abs().max().item() == 128.0
    g = torch.Generator().manual_seed(0)
    x = torch.cat([x.float(), torch.randn(200, 3, generator=g) * 4]).to(dtype)
    codes, scale, zero_point = quantize_activation(x, bits=8, dim=-1, symmetric=symmetric)
    assert codes.dtype == scale.dtype == torch.float32
    lo, hi = (-127, 127) if symmetric else (-128, 127)
    assert lo <= codes.min().item() and codes.max().item() <= hi
    assert torch.equal(codes, codes.round())
    # the extreme lands on the grid's end: +-amax on +-127, or a token's negative minimum on -128
    assert codes.abs().max().item() == (127 if symmetric else 128)
    # the result is the float32 computation, cast back
    out = fake_quantize_activation(x, bits=8, dim=-1, symmetric=symmetric)
    assert out.dtype == dtype
    assert torch.equal(out, fake_quantize_activation(x.float(), bits=8, dim=-1, symmetric=symmetric).to(dtype))
    assert (out.float() - x.float()).abs().max().item() <= scale.max().item()  # at most a step off
