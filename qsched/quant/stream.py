"""Quantized models that are small in memory from the first byte read.

:func:`pack_model` turns a full-precision model's quantized layers into packed
layers in place (its float weights are freed layer by layer). :func:`load_quantized`
never holds the full-precision model: it builds the model's skeleton from its
config on the meta device, swaps the layers the recipe quantizes for empty packed
layers, then reads the checkpoint one tensor at a time (fp32/fp16/bf16, one file or
shards), quantizing and packing each weight as it arrives. From a packed checkpoint
(:func:`qsched.quant.save_packed`) it reads codes and scales directly. Peak memory
is the packed model plus the largest tensor being converted.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qsched.errors import QSchedError
from qsched.quant.fake import (
    _MARKER,
    RECIPE_ATTR,
    LayerPlan,
    LayerQuantState,
    attach,
    build_report,
    make_activation_quantizer,
    plan_layers,
    refuse_quantized,
)
from qsched.quant.host_memory import available_memory, release_free_memory
from qsched.quant.packed_modules import PackedLayer, packed_layer_for
from qsched.quant.recipe import QuantRecipe
from qsched.quant.report import QuantReport
from qsched.quant.tensor_files import iter_tensors, read_header, weight_files

BACKEND = "packed"
_TRIM_BYTES = 1 << 20  # give freed heap memory back after every tensor at least this large


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _packed_plans(model: nn.Module, recipe: QuantRecipe) -> tuple[list[LayerPlan], QuantReport]:
    refuse_quantized(model)
    plans, unmatched = plan_layers(model, recipe)
    report = build_report(plans, recipe, backend=BACKEND, unmatched=unmatched)
    return plans, report


def _install(model: nn.Module, plan: LayerPlan) -> PackedLayer | None:
    """Put the packed layer of ``plan`` (empty) in place, or hook an input-only plan."""
    if not plan.quantizes_weight:
        if plan.act_bits < 16:
            attach(plan, scale=None, backend=BACKEND)
        return None
    if plan.name == "":
        raise QSchedError("the model itself is a single layer; wrap it in a module to pack it")
    layer = packed_layer_for(
        plan.module, weight_bits=plan.weight_bits, group_size=plan.group_size,
        input_quantizer=make_activation_quantizer(plan), full_range=plan.full_range,
    )
    setattr(layer, _MARKER, LayerQuantState(plan.weight_bits, plan.act_bits, plan.group_size, BACKEND))
    _swap(model, plan.name, layer)
    return layer


def pack_model(model: nn.Module, recipe: QuantRecipe) -> QuantReport:
    """Replace ``model``'s quantized layers by packed layers, in place; returns the report.

    Numerically the same model as ``quantize(model, recipe)`` (the fake-quant
    reference); the float weights of packed layers are released as they are packed.
    """
    plans, report = _packed_plans(model, recipe)
    for plan in plans:
        old = plan.module
        layer = _install(model, plan)
        if layer is None:
            continue
        with torch.no_grad():
            layer.quantize_from(old.weight)
            if old.bias is not None:
                layer.bias.data = old.bias.data
        old.weight = None  # the plan keeps the module alive; its float weight goes now
        release_free_memory()
    if not recipe.is_noop:
        setattr(model, RECIPE_ATTR, recipe)
    return report


# --- loading without the full-precision model ------------------------------------------------


@dataclass(frozen=True)
class ComponentSource:
    """Where a model component lives: its folder (config + weights) and its class."""

    folder: Path
    library: str
    class_name: str


def component_source(pipeline_folder: str | os.PathLike[str], name: str) -> ComponentSource:
    """The component ``name`` (e.g. ``unet``) of a diffusers pipeline folder."""
    folder = Path(pipeline_folder)
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        library, class_name = index[name]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise QSchedError(f"{str(folder)!r} has no component {name!r} in its model_index.json ({exc})") from exc
    if not isinstance(library, str) or not isinstance(class_name, str):
        raise QSchedError(f"component {name!r} of {str(folder)!r} is not stored in the folder ({library}, {class_name})")
    return ComponentSource(folder=folder / name, library=library, class_name=class_name)


def _model_class(source: ComponentSource) -> type[nn.Module]:
    try:
        cls = getattr(importlib.import_module(source.library), source.class_name)
    except (ImportError, AttributeError) as exc:
        raise QSchedError(f"cannot import {source.library}.{source.class_name} for {str(source.folder)!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise QSchedError(f"{source.library}.{source.class_name} is not a torch module class")
    return cls


def empty_model(source: ComponentSource, *, dtype: torch.dtype) -> nn.Module:
    """The component built from its config with every parameter on the meta device."""
    from accelerate import init_empty_weights

    cls = _model_class(source)
    with init_empty_weights():
        if hasattr(cls, "load_config"):  # diffusers ModelMixin
            config = cls.load_config(source.folder)
            model = cls.from_config(config)
        elif hasattr(cls, "config_class"):  # transformers PreTrainedModel
            config = cls.config_class.from_pretrained(source.folder)
            model = cls._from_config(config)
        else:
            raise QSchedError(f"{source.class_name} is neither a diffusers nor a transformers model class")
    # nn.Module.to: diffusers' own .to() warns about fp32-kept modules on every cast
    return nn.Module.to(model, dtype).eval().requires_grad_(False)


def _find_layers(model: nn.Module) -> dict[str, PackedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLayer)}


def _expected_keys(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


class _Filler:
    """Puts tensors read from a checkpoint into a skeleton, checking names, shapes and dtypes."""

    def __init__(self, model: nn.Module, *, dtype: torch.dtype, device: torch.device, where: str) -> None:
        self.model, self.dtype, self.device, self.where = model, dtype, device, where
        self.layers = _find_layers(model)
        self.expected = _expected_keys(model)
        self.done: set[str] = set()
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def put_float(self, key: str, tensor: torch.Tensor) -> None:
        """A full-precision tensor: quantized when it is a packed layer's weight."""
        layer_name, _, leaf = key.rpartition(".")
        layer = self.layers.get(layer_name)
        if layer is not None and leaf == "weight":
            layer.quantize_from(self._cast(key, tensor, layer.weight_shape))
            self.done.update({f"{layer_name}.weight_codes", f"{layer_name}.weight_scale"})
            return
        self.put_plain(key, tensor)

    def put_packed(self, layer_name: str, part: str, tensor: torch.Tensor) -> None:
        """The codes or the scale of a packed layer (from a packed checkpoint)."""
        layer = self.layers.get(layer_name)
        if layer is None:
            raise QSchedError(f"{self.where}: {layer_name!r} is packed in the file but not quantized by the recipe")
        parts = self.pending.setdefault(layer_name, {})
        parts[part] = tensor
        if len(parts) == 2:
            layer.set_weight(parts["codes"].to(self.device), parts["scale"].to(self.device))
            self.done.update({f"{layer_name}.weight_codes", f"{layer_name}.weight_scale"})
            del self.pending[layer_name]

    def put_plain(self, key: str, tensor: torch.Tensor) -> None:
        from accelerate.utils import set_module_tensor_to_device

        ref = self.expected.get(key)
        if ref is None:
            raise QSchedError(
                f"{self.where}: the checkpoint holds {key!r}, which the model (from its config) does not have; "
                "the weights belong to another architecture or configuration"
            )
        value = self._cast(key, tensor, tuple(ref.shape), keep=not ref.is_floating_point())
        set_module_tensor_to_device(self.model, key, self.device, value=value)
        self.done.add(key)

    def _cast(self, key: str, tensor: torch.Tensor, shape: tuple[int, ...], *, keep: bool = False) -> torch.Tensor:
        if tuple(tensor.shape) != tuple(shape):
            raise QSchedError(
                f"{self.where}: shape mismatch for {key!r}: checkpoint {tuple(tensor.shape)}, model {tuple(shape)}"
            )
        if keep or not tensor.is_floating_point():
            return tensor.to(self.device)
        return tensor.to(device=self.device, dtype=self.dtype)

    def finish(self) -> None:
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        missing = [k for k, v in _expected_keys(self.model).items() if k not in self.done and v.device.type == "meta"]
        if missing or self.pending:
            names = missing + [f"{n} (codes or scale)" for n in self.pending]
            raise QSchedError(
                f"{self.where}: the checkpoint lacks {len(names)} tensor(s) the model needs, e.g. "
                f"{', '.join(repr(n) for n in names[:5])}"
            )


def _check_fits(model: nn.Module, largest: int, device: torch.device, where: str) -> None:
    """Refuse, before reading any weight, a model that cannot fit: the OOM killer gives no error message."""
    need = sum(t.numel() * t.element_size() for t in model.state_dict(keep_vars=True).values()) + largest
    free = available_memory(device)
    if free is not None and need > free:
        raise QSchedError(
            f"loading {where} needs about {need / 1e9:.1f} GB on {device} (the quantized model plus its "
            f"largest tensor) but only {free / 1e9:.1f} GB are available; use fewer bits, free memory, "
            "or another device"
        )


@contextlib.contextmanager
def _readable_errors(where: str) -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise QSchedError(f"ran out of accelerator memory while loading {where}: {exc}".splitlines()[0]) from exc
    except MemoryError as exc:
        raise QSchedError(
            f"ran out of memory while loading {where}; use fewer bits (w4), or a machine with more memory"
        ) from exc


def load_quantized(
    source: ComponentSource,
    recipe: QuantRecipe,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    packed: str | os.PathLike[str] | None = None,
    variant: str | None = None,
) -> tuple[nn.Module, QuantReport]:
    """The component of ``source`` quantized by ``recipe`` in packed layers, and the report.

    Reads the full-precision checkpoint in ``source.folder`` tensor by tensor, or
    with ``packed`` the file from :func:`~qsched.quant.save_packed` (then only the
    config is read from the folder, and ``recipe`` must be the file's).
    """
    from qsched.quant.packed import CODES_SUFFIX, SCALE_SUFFIX, check_packed_header

    device = torch.device(device)
    where = str(packed) if packed is not None else str(source.folder)
    with _readable_errors(where):
        model = empty_model(source, dtype=dtype)
        plans, report = _packed_plans(model, recipe)
        for plan in plans:
            _install(model, plan)
        del plans
        filler = _Filler(model, dtype=dtype, device=device, where=where)
        files = weight_files(source.folder, variant=variant) if packed is None else [read_header(packed)]
        if packed is not None:
            check_packed_header(Path(packed), files[0].metadata, recipe, model=model)
        largest = max((4 * math.prod(i.shape) for f in files for i in f.tensors.values()), default=0)
        _check_fits(model, largest, device, where)
        for key, tensor in iter_tensors(files):
            large = tensor.numel() * tensor.element_size() >= _TRIM_BYTES
            if packed is None:
                filler.put_float(key, tensor)
            elif key.endswith(CODES_SUFFIX):
                filler.put_packed(key.removesuffix(CODES_SUFFIX).removesuffix(".weight"), "codes", tensor)
            elif key.endswith(SCALE_SUFFIX):
                filler.put_packed(key.removesuffix(SCALE_SUFFIX).removesuffix(".weight"), "scale", tensor)
            else:
                filler.put_plain(key, tensor)
            del tensor
            if large:
                release_free_memory()
        filler.finish()
    model.to(device)
    if not recipe.is_noop:
        setattr(model, RECIPE_ATTR, recipe)
    return model, report
