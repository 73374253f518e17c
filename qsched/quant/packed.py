"""Packed checkpoints: real size reduction of a fake-quantized model.

File layout (safetensors):

- every quantized weight ``<layer>.weight`` is replaced by
  ``<layer>.weight.qsched_codes`` (int8 codes for 8 bits; for 4 bits the codes
  ``+8`` as nibbles, two per byte, low nibble first, in a flat uint8 tensor) and
  ``<layer>.weight.qsched_scale`` (fp32 ``[out, n_groups]``);
- every other state-dict tensor is stored as is, in its own dtype;
- the header metadata holds ``format`` (``"qsched.packed"``), ``format_version``,
  the recipe (JSON) and per quantized layer its bits, shape and dtype.

:func:`load_packed` rebuilds the identical fake-quant model (bit-identical
weights, same activation hooks) in a freshly loaded model of the same
architecture.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from qsched.errors import QSchedError
from qsched.quant.fake import (
    _MARKER,
    RECIPE_ATTR,
    SCALE_BUFFER,
    LayerPlan,
    attach,
    build_report,
    code_range,
    dequantize_weight,
    plan_layers,
    refuse_quantized,
)
from qsched.quant.packed_modules import PackedLayer, encode_codes, pack_int4, unpack_int4
from qsched.quant.recipe import QuantRecipe
from qsched.quant.tensor_files import write_tensors
from qsched.quant.report import QuantReport

__all__ = ["pack_int4", "unpack_int4", "save_packed", "load_packed", "read_packed_recipe", "packed_size"]

FORMAT = "qsched.packed"
FORMAT_VERSION = "1"
CODES_SUFFIX = ".qsched_codes"
SCALE_SUFFIX = ".qsched_scale"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_recipe(model: nn.Module) -> QuantRecipe:
    marked = [(n, m) for n, m in model.named_modules() if hasattr(m, _MARKER)]
    if not marked:
        raise QSchedError("the model is not quantized; call qsched.quant.quantize(model, recipe) first")
    backends = {getattr(m, _MARKER).backend for _, m in marked}
    if not backends <= {"fake", "packed"}:
        raise QSchedError(
            f"save_packed needs a model quantized with backend 'packed' or 'fake', this one used {sorted(backends)}"
        )
    recipe = getattr(model, RECIPE_ATTR, None)
    if not isinstance(recipe, QuantRecipe):
        raise QSchedError("the model lacks its quantization recipe; quantize it with qsched.quant.quantize")
    return recipe


def _fake_layer_codes(plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored codes and scale of a fake-quantized layer (its weight must still be on its grid)."""
    weight = plan.module.weight.detach()
    scale = getattr(plan.module, SCALE_BUFFER).detach().float().cpu()
    out, groups = scale.shape
    lo, hi = code_range(plan.weight_bits, full_range=plan.full_range)
    codes = torch.round(weight.float().cpu().reshape(out, groups, -1) / scale.unsqueeze(-1)).clamp_(lo, hi)
    if not torch.equal(dequantize_weight(codes, scale, shape=weight.shape, dtype=weight.dtype), weight.cpu()):
        raise QSchedError(
            f"layer {plan.name!r}: its weight is no longer on the quantization grid "
            "(modified after quantize?); re-quantize from the full-precision model"
        )
    return encode_codes(codes, plan.weight_bits), scale


def _layer_entries(model: nn.Module, recipe: QuantRecipe) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """``{"<layer>.weight": (stored codes, scale, header info)}`` of a fake-quant or packed model."""
    entries: dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, Any]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, PackedLayer):
            info = {"bits": module.weight_bits, "shape": list(module.weight_shape), "dtype": _dtype_name(module.weight_dtype)}
            entries[f"{name}.weight" if name else "weight"] = (module.weight_codes, module.weight_scale, info)
    for plan in plan_layers(model, recipe)[0]:
        if plan.quantizes_weight:
            codes, scale = _fake_layer_codes(plan)
            info = {"bits": plan.weight_bits, "shape": list(plan.module.weight.shape),
                    "dtype": _dtype_name(plan.module.weight.dtype)}
            entries[_layer_key(plan)] = (codes, scale, info)
    return entries


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """Header fields naming the architecture a packed file belongs to (class and config)."""
    config = getattr(model, "config", None)
    fields = {"model_class": type(model).__name__}
    if config is not None:
        items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        fields["model_config"] = json.dumps(
            {k: v for k, v in items.items() if not k.startswith("_")}, sort_keys=True, default=str
        )
    return fields


def save_packed(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the quantized ``model`` (packed or fake-quant) to ``path`` as packed integers + scales.

    The file is written to a temporary name and renamed, so a failure leaves no
    partial file; it gets the permissions of any new file (the umask applies).
    """
    path = Path(path)
    recipe = _model_recipe(model)
    entries = _layer_entries(model, recipe)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for key, (codes, scale, info) in entries.items():
        tensors[key + CODES_SUFFIX] = codes.detach().cpu().contiguous()
        tensors[key + SCALE_SUFFIX] = scale.detach().float().cpu().contiguous()
        layers[key] = info
        for own in (key, key + "_codes", key + "_scale"):
            state.pop(own, None)
    seen: set[tuple[int, int]] = set()
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        tensors[key] = value.clone() if ident in seen else value
        seen.add(ident)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "recipe": json.dumps(recipe.to_dict()),
        "layers": json.dumps(layers),
        **model_fingerprint(model),
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tensors(tmp, tensors, metadata=metadata)  # a plain open(): the umask applies
        os.replace(tmp, path)
    except OSError as exc:
        raise QSchedError(f"cannot write the packed checkpoint {str(path)!r}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def check_packed_header(path: Path, meta: dict[str, str], recipe: QuantRecipe | None = None,
                        model: nn.Module | None = None) -> QuantRecipe:
    """Check a packed file's format, version, recipe (when given) and architecture; returns its recipe."""
    problem = None
    if meta.get("format") != FORMAT:
        problem = (
            f"{str(path)!r} is not a qsched packed checkpoint (metadata format is "
            f"{meta.get('format')!r}, expected {FORMAT!r})"
        )
    elif meta.get("format_version") != FORMAT_VERSION:
        problem = (
            f"packed checkpoint {str(path)!r} has format version {meta.get('format_version')!r}; "
            f"this qsched reads version {FORMAT_VERSION}; use a matching qsched version"
        )
    if problem is not None:
        raise QSchedError(problem)
    found = _recipe_of(path, meta)
    if recipe is not None and found != recipe:
        raise QSchedError(
            f"packed checkpoint {str(path)!r} holds recipe {found.name!r}, not the requested {recipe.name!r}; "
            "omit --quant to use the file's recipe, or quantize again"
        )
    if model is not None:
        _check_fingerprint(path, meta, model)
    return found


def _check_fingerprint(path: Path, meta: dict[str, str], model: nn.Module) -> None:
    """Refuse a packed file made from another architecture (files without the fields pass)."""
    ours = model_fingerprint(model)
    if "model_class" in meta and meta["model_class"] != ours["model_class"]:
        raise QSchedError(
            f"packed checkpoint {str(path)!r} was made from a {meta['model_class']}, not a {ours['model_class']}"
        )
    if "model_config" in meta and "model_config" in ours:
        theirs, mine = json.loads(meta["model_config"]), json.loads(ours["model_config"])
        differ = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        if differ:
            key = differ[0]
            raise QSchedError(
                f"packed checkpoint {str(path)!r} was made from another model configuration "
                f"({key}: file {theirs.get(key)!r}, model {mine.get(key)!r}"
                + (f", and {len(differ) - 1} more" if len(differ) > 1 else "") + ")"
            )


def _read_header(path: Path) -> tuple[dict[str, str], Any]:
    """The header metadata and the open file (a context manager), after format checks."""
    if not path.is_file():
        raise QSchedError(f"packed checkpoint {str(path)!r} does not exist or is not a file")
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise QSchedError(f"packed checkpoint {str(path)!r} is corrupt or truncated: {exc}") from exc
    meta = handle.metadata() or {}
    try:
        check_packed_header(path, meta)
    except QSchedError:
        handle.__exit__(None, None, None)
        raise
    return meta, handle


def _json_meta(path: Path, meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError) as exc:
        raise QSchedError(f"packed checkpoint {str(path)!r}: header field {key!r} missing or not JSON") from exc


def read_packed_recipe(path: str | os.PathLike[str]) -> QuantRecipe:
    """The recipe stored in a packed checkpoint's header."""
    path = Path(path)
    meta, handle = _read_header(path)
    with handle:
        return _recipe_of(path, meta)


def _recipe_of(path: Path, meta: dict[str, str]) -> QuantRecipe:
    try:
        return QuantRecipe.from_dict(_json_meta(path, meta, "recipe"))
    except QSchedError as exc:
        raise QSchedError(f"packed checkpoint {str(path)!r}: bad recipe: {exc}") from exc


def _list(keys: list[str]) -> str:
    return ", ".join(repr(k) for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _layer_key(plan: LayerPlan) -> str:
    return f"{plan.name}.weight" if plan.name else "weight"


def _read_tensors(
    path: Path, handle: Any, state: dict[str, torch.Tensor], plans: dict[str, LayerPlan], layers: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Check the file's keys against the model's, then read every tensor."""
    expected = [k for k in state if k not in plans]
    expected += [k + s for k in plans for s in (CODES_SUFFIX, SCALE_SUFFIX)]
    found = set(handle.keys())
    missing = [k for k in expected if k not in found]
    unexpected = sorted(found - set(expected))
    if missing or unexpected or set(layers) != set(plans):
        problems = []
        if missing:
            problems.append(f"missing keys {_list(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_list(unexpected)}")
        if not problems:
            problems.append("its quantized-layer list does not match the model")
        raise QSchedError(
            f"packed checkpoint {str(path)!r} does not match this model ({'; '.join(problems)}); "
            "load it into the architecture it was saved from"
        )
    try:
        return {k: handle.get_tensor(k) for k in expected}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise QSchedError(f"packed checkpoint {str(path)!r} is corrupt or truncated: {exc}") from exc


def _rebuild_state(
    path: Path,
    state: dict[str, torch.Tensor],
    plans: dict[str, LayerPlan],
    layers: dict[str, Any],
    loaded: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's new state dict (quantized weights dequantized) and the weight scales."""
    new_state: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for key, ref in state.items():
        if key not in plans:
            if loaded[key].shape != ref.shape:
                raise QSchedError(
                    f"packed checkpoint {str(path)!r}: shape mismatch for {key!r}: file "
                    f"{tuple(loaded[key].shape)}, model {tuple(ref.shape)}"
                )
            new_state[key] = loaded[key]
            continue
        plan, info = plans[key], layers[key]
        shape = tuple(ref.shape)
        numel = math.prod(shape)
        out, groups = shape[0], numel // (shape[0] * plan.group_size)
        codes, scale = loaded[key + CODES_SUFFIX], loaded[key + SCALE_SUFFIX]
        want_codes = (numel + 1) // 2 if plan.weight_bits == 4 else numel
        if (
            list(shape) != info.get("shape")
            or info.get("bits") != plan.weight_bits
            or tuple(scale.shape) != (out, groups)
            or scale.dtype != torch.float32
            or codes.dim() != 1
            or codes.numel() != want_codes
            or codes.dtype != (torch.uint8 if plan.weight_bits == 4 else torch.int8)
        ):
            raise QSchedError(
                f"packed checkpoint {str(path)!r}: layer {key!r} does not match the model "
                f"(file {info.get('bits')}-bit shape {info.get('shape')}, scale {tuple(scale.shape)}; "
                f"model shape {list(shape)}, {plan.weight_bits}-bit, scale {(out, groups)})"
            )
        if plan.weight_bits == 4:
            codes = unpack_int4(codes, numel)
        new_state[key] = dequantize_weight(codes, scale, shape=shape, dtype=ref.dtype)
        scales[key] = scale
    return new_state, scales


def load_packed(model: nn.Module, path: str | os.PathLike[str]) -> QuantReport:
    """Load a packed checkpoint into a full-precision ``model`` of the same architecture.

    The result is the identical fake-quant model :func:`save_packed` saw
    (weights are dequantized into the model's own dtype). All checks run before
    the model is touched.
    """
    path = Path(path)
    meta, handle = _read_header(path)
    with handle:
        recipe = _recipe_of(path, meta)
        layers = _json_meta(path, meta, "layers")
        refuse_quantized(model)
        _check_fingerprint(path, meta, model)
        all_plans, unmatched = plan_layers(model, recipe)
        plans = {_layer_key(p): p for p in all_plans if p.quantizes_weight}
        state = model.state_dict()
        loaded = _read_tensors(path, handle, state, plans, layers)
    new_state, scales = _rebuild_state(path, state, plans, layers, loaded)
    model.load_state_dict(new_state, strict=True)
    for plan in all_plans:
        if plan.quantizes_weight or plan.act_bits < 16:
            attach(plan, scale=scales.get(_layer_key(plan)), backend="fake")
    setattr(model, RECIPE_ATTR, recipe)
    return build_report(all_plans, recipe, backend="fake", unmatched=unmatched)


@dataclass(frozen=True)
class PackedSize:
    """Bytes of a packed checkpoint vs the same tensors stored densely."""

    path: str
    file_bytes: int
    fp32_bytes: int
    fp16_bytes: int

    @property
    def ratio_vs_fp32(self) -> float:
        return self.fp32_bytes / self.file_bytes

    @property
    def ratio_vs_fp16(self) -> float:
        return self.fp16_bytes / self.file_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "file_bytes": self.file_bytes,
            "fp32_bytes": self.fp32_bytes,
            "fp16_bytes": self.fp16_bytes,
            "ratio_vs_fp32": self.ratio_vs_fp32,
            "ratio_vs_fp16": self.ratio_vs_fp16,
        }

    def format(self) -> str:
        return (
            f"{self.path}: {self.file_bytes:,} bytes on disk; "
            f"FP32 {self.fp32_bytes:,} ({self.ratio_vs_fp32:.2f}x smaller), "
            f"FP16 {self.fp16_bytes:,} ({self.ratio_vs_fp16:.2f}x smaller)"
        )


def packed_size(path: str | os.PathLike[str]) -> PackedSize:
    """Size on disk of a packed checkpoint vs the tensor bytes of the same model in FP32 and FP16.

    The dense baselines count tensor data only (no header): floating tensors at 4
    or 2 bytes per value, other tensors at their own size.
    """
    path = Path(path)
    meta, handle = _read_header(path)
    layers = _json_meta(path, meta, "layers")
    with handle:
        keys = list(handle.keys())
        dense = {k: (math.prod(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype()) for k in keys}
    fp32 = fp16 = 0
    for key in keys:
        if key.endswith(SCALE_SUFFIX):
            continue
        if key.endswith(CODES_SUFFIX):
            numel = math.prod(layers[key.removesuffix(CODES_SUFFIX)]["shape"])
            fp32, fp16 = fp32 + 4 * numel, fp16 + 2 * numel
            continue
        numel, dtype = dense[key]
        if dtype.startswith(("F", "BF")):
            fp32, fp16 = fp32 + 4 * numel, fp16 + 2 * numel
        else:
            size = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2}.get(dtype, 1) * numel
            fp32, fp16 = fp32 + size, fp16 + size
    return PackedSize(str(path), path.stat().st_size, fp32, fp16)
