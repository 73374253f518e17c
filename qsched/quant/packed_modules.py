"""Packed execution: quantized layers that hold integer codes, not float weights.

A :class:`PackedLinear` / :class:`PackedConv2d` keeps its weight as integer codes
(int8, or int4 two per byte: ``code + 8`` in a nibble, low nibble first) and fp32
scales ``[out, n_groups]``, and dequantizes them per call into the input's dtype.
The weight grid and the input quantization are those of the fake-quant reference
(:func:`qsched.quant.fake.quantize_weight`, :func:`~qsched.quant.fake.make_activation_quantizer`),
and the dequantized weight is bit-identical to the fake-quant weight, so a packed
model computes exactly what the fake-quant model computes while holding about a
quarter (W8) or an eighth (W4) of the FP32 weight bytes.

Why dequantize rather than an integer kernel: on CPU (torch 2.13) ``torch._int_mm``
is ~15x slower than an FP32 matmul and the int4 weight-only kernel with FP32 inputs
70-100x slower (BENCHMARKS.md, "Memory"), while dequantizing costs ~3 ns per weight.
On CUDA the same layers dequantize into fp16/bf16, or multiply int8 codes with
``torch._int_mm`` after :func:`use_int8_kernel`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qsched.errors import QSchedError
from qsched.quant.recipe import ALLOWED_MODULE_TYPES


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes in [-8, 7] -> flat uint8, two per byte (low nibble first)."""
    flat = (codes.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes, flat, ``numel`` long."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=1).reshape(-1)[:numel]


def encode_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer-valued codes (any dtype) as stored: int4 nibbles in uint8, or flat int8."""
    return pack_int4(codes) if bits == 4 else codes.reshape(-1).to(torch.int8)


def stored_codes_numel(numel: int, bits: int) -> int:
    """How many stored elements hold ``numel`` codes of ``bits`` bits."""
    return (numel + 1) // 2 if bits == 4 else numel


def codes_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits == 4 else torch.int8


def decode_weight(
    codes: torch.Tensor, scale: torch.Tensor, *, bits: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Stored codes + fp32 scales -> the weight in ``dtype``.

    Bit-identical to :func:`qsched.quant.fake.dequantize_weight` of the same codes
    (codes and scales meet in fp32, then one cast), with one pass fewer for int4.
    """
    out, groups = scale.shape
    numel = math.prod(shape)
    if bits == 4:
        flat = torch.empty(codes.numel(), 2, dtype=torch.float32, device=codes.device)
        flat[:, 0] = codes & 0x0F
        flat[:, 1] = codes >> 4
        values = flat.view(-1)[:numel].sub_(8)
    else:
        values = codes.to(torch.float32)
    values = values.view(out, groups, -1).mul_(scale.unsqueeze(-1))
    return values.view(shape).to(dtype)


class PackedLayer(nn.Module):
    """What packed Linear and Conv2d layers share: codes, scales, bias, input quantizer.

    Buffers ``weight_codes`` (flat) and ``weight_scale`` (fp32 ``[out, n_groups]``)
    are part of the state dict; ``weight`` is a read-only property that dequantizes
    (for code that inspects ``layer.weight``; the forward pass does not use it).
    """

    def __init__(
        self,
        *,
        weight_shape: tuple[int, ...],
        weight_bits: int,
        group_size: int,
        dtype: torch.dtype,
        bias: bool,
        input_quantizer: Any = None,
        full_range: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if weight_bits not in (4, 8):
            raise QSchedError(f"packed layers hold 4- or 8-bit weights, got {weight_bits}")
        numel = math.prod(weight_shape)
        out = weight_shape[0]
        if (numel // out) % group_size:
            raise QSchedError(f"group size {group_size} does not divide the input size {numel // out}")
        self.weight_shape = tuple(int(d) for d in weight_shape)
        self.weight_bits = weight_bits
        self.group_size = group_size
        self.weight_dtype = dtype
        self.full_range = full_range
        self.input_quantizer = input_quantizer
        groups = numel // (out * group_size)
        self.register_buffer(
            "weight_codes",
            torch.empty(stored_codes_numel(numel, weight_bits), dtype=codes_dtype(weight_bits), device=device),
        )
        self.register_buffer("weight_scale", torch.empty(out, groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out, dtype=dtype, device=device), requires_grad=False) if bias else None

    def _apply(self, fn: Any, recurse: bool = True) -> PackedLayer:
        """``.to(dtype)`` casts the bias and the compute dtype but never the fp32 scales."""
        scale = self.weight_scale
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=scale.device))
        super()._apply(fn, recurse)
        self.weight_scale = scale.to(probe.device)
        self.weight_dtype = probe.dtype
        return self

    def set_weight(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Install stored codes and scales (checked against this layer's shape)."""
        want_codes = (stored_codes_numel(math.prod(self.weight_shape), self.weight_bits),)
        want_scale = tuple(self.weight_scale.shape)
        if (
            tuple(codes.shape) != want_codes
            or codes.dtype != codes_dtype(self.weight_bits)
            or tuple(scale.shape) != want_scale
            or scale.dtype != torch.float32
        ):
            raise QSchedError(
                f"packed weight of shape {tuple(codes.shape)} {codes.dtype} / scale {tuple(scale.shape)} "
                f"{scale.dtype} does not fit a {self.weight_bits}-bit layer of weight shape "
                f"{self.weight_shape} (codes {want_codes}, scale {want_scale} float32)"
            )
        device = self.weight_scale.device if self.weight_scale.device.type != "meta" else codes.device
        self.weight_codes = codes.to(device)
        self.weight_scale = scale.to(device)

    def quantize_from(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision weight onto the fake-quant grid and keep only its codes."""
        from qsched.quant.fake import quantize_weight

        if tuple(weight.shape) != self.weight_shape:
            raise QSchedError(f"weight of shape {tuple(weight.shape)} given for a layer of shape {self.weight_shape}")
        codes, scale = quantize_weight(
            weight.to(self.weight_dtype), bits=self.weight_bits, group_size=self.group_size, full_range=self.full_range
        )
        self.set_weight(encode_codes(codes, self.weight_bits), scale)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return decode_weight(
            self.weight_codes, self.weight_scale, bits=self.weight_bits, shape=self.weight_shape,
            dtype=dtype or self.weight_dtype,
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a new tensor on every access; not a parameter)."""
        return self.dequantized_weight()

    def _quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is None:
            return x
        return self.input_quantizer(self, (x,))[0]

    def packed_bytes(self) -> int:
        """Bytes this layer holds: codes, scales, bias."""
        return sum(t.numel() * t.element_size() for t in (*self.buffers(recurse=False), *self.parameters(recurse=False)))

    def _quant_repr(self) -> str:
        groups = self.weight_scale.shape[1]
        act = "" if self.input_quantizer is None else f", input={self.input_quantizer!r}"
        return f"w{self.weight_bits}, groups={groups}{act}"


class PackedLinear(PackedLayer):
    """A Linear layer computing from int4/int8 codes (see :class:`PackedLayer`).

    With ``int8_kernel`` on (see :func:`use_int8_kernel`) it multiplies the integer
    codes of inputs and weights with ``torch._int_mm`` instead of dequantizing.
    """

    def __init__(self, in_features: int, out_features: int, **kwargs: Any) -> None:
        super().__init__(weight_shape=(out_features, in_features), **kwargs)
        self.in_features = in_features
        self.out_features = out_features
        self.int8_kernel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_kernel:
            return self._int8_forward(x)
        x = self._quantized_input(x)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def supports_int8_kernel(self) -> bool:
        """Per-channel weights and one int8 scale (and zero point) per token: what ``_int_mm`` can compute."""
        q = self.input_quantizer
        return (
            q is not None and q.bits == 8 and q.groups == 1 and q.dim == -1 and self.weight_scale.shape[1] == 1
        )

    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(s_x (c_x - z_x)) @ (s_w c_w)^T + b`` with the integer product in int32: the fake-quant
        result up to float rounding (the products are exact, only the final scaling rounds)."""
        from qsched.quant.fake import quantize_activation

        q = self.input_quantizer
        rows = x.reshape(-1, self.in_features)
        codes, scale, zero_point = quantize_activation(
            rows, bits=8, dim=-1, symmetric=q.symmetric, groups=1, full_range=q.full_range
        )
        count = rows.shape[0]
        codes = codes.to(torch.int8)
        if count <= 16:  # _int_mm needs more than 16 rows on CUDA
            codes = torch.cat([codes, codes.new_zeros(17 - count, self.in_features)])
        weight = self._weight_codes_int8()
        acc = torch._int_mm(codes, weight.t())[:count]
        if zero_point is not None:
            acc = acc - zero_point.reshape(-1, 1).to(torch.int32) * weight.sum(dim=1, dtype=torch.int32)
        out = acc.to(torch.float32) * scale.reshape(-1, 1) * self.weight_scale.reshape(1, -1)
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _weight_codes_int8(self) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        if self.weight_bits == 8:
            return self.weight_codes.view(shape)
        return unpack_int4(self.weight_codes, math.prod(shape)).view(shape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._quant_repr()}"


class PackedConv2d(PackedLayer):
    """A Conv2d layer computing from int4/int8 codes (see :class:`PackedLayer`)."""

    def __init__(self, conv: nn.Conv2d, **kwargs: Any) -> None:
        super().__init__(weight_shape=tuple(conv.weight.shape), **kwargs)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantized_input(x)
        weight = self.dequantized_weight(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, {self._quant_repr()}"
        )


def packed_layer_for(
    module: nn.Module, *, weight_bits: int, group_size: int, input_quantizer: Any, full_range: bool = False
) -> PackedLayer:
    """An empty packed layer shaped like ``module`` (Linear or Conv2d; may live on the meta device)."""
    weight = module.weight
    dtype = weight.dtype
    device = weight.device
    common = dict(weight_bits=weight_bits, group_size=group_size, dtype=dtype, bias=module.bias is not None,
                  input_quantizer=input_quantizer, full_range=full_range, device=device)
    if isinstance(module, nn.Linear):
        layer: PackedLayer = PackedLinear(module.in_features, module.out_features, **common)
    elif isinstance(module, nn.Conv2d):
        layer = PackedConv2d(module, **common)
    else:
        raise QSchedError(f"cannot pack a {type(module).__name__}; packed layers replace {ALLOWED_MODULE_TYPES}")
    return layer


def use_int8_kernel(model: nn.Module, enabled: bool = True) -> int:
    """Switch the packed Linear layers of ``model`` that support it to ``torch._int_mm``; returns how many.

    Off by default: on CPU (torch 2.13) ``_int_mm`` is ~15x slower than dequantizing
    and an FP32 matmul. Meant for CUDA, where int8 tensor cores apply (``_int_mm``
    there wants the input and output sizes to be multiples of 8); not yet measured on
    a GPU by this project.
    """
    layers = [m for m in model.modules() if isinstance(m, PackedLinear) and m.supports_int8_kernel()]
    for layer in layers:
        layer.int8_kernel = enabled
    return len(layers)
