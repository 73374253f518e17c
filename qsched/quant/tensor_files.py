"""Read safetensors checkpoints one tensor at a time, without mapping whole files.

``safetensors.safe_open`` memory-maps the file: every tensor read leaves its pages
resident in the process until the file is closed, so reading a 24 GB checkpoint
tensor by tensor still shows (and, under pressure, costs) 24 GB of resident memory.
The streaming loader (:mod:`qsched.quant.stream`) needs the opposite: each tensor
read with ``pread`` into its own buffer, quantized, and freed. The format is the
public safetensors layout (8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}`` plus ``__metadata__``, then the data);
this module reads only that layout and checks every offset before reading.

A model folder holds one ``*.safetensors`` file, a variant (``*.fp16.safetensors``),
or shards listed by a ``*.safetensors.index.json`` ``weight_map``, as diffusers and
transformers save them.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qsched.errors import QSchedError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class TensorFile:
    """The parsed header of one safetensors file."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike[str]) -> TensorFile:
    """Parse and check the header of ``path``; reads no tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise QSchedError(f"{str(path)!r} is not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                raise QSchedError(
                    f"{str(path)!r} is corrupt or truncated: header of {length:,} bytes in a file of {size:,}"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise QSchedError(f"cannot read {str(path)!r}: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QSchedError(f"{str(path)!r} is corrupt: its safetensors header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise QSchedError(f"{str(path)!r} is corrupt: its safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    tensors = {name: _tensor_info(path, name, entry, data_start, size) for name, entry in header.items()}
    return TensorFile(path=path, tensors=tensors, metadata=dict(metadata))


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    problem = None
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) + data_start for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise QSchedError(
            f"{str(path)!r} is corrupt: bad header entry for {name!r}: {entry!r}"
        ) from None
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end > size:
        problem = f"tensor {name!r} ends at byte {end:,} but the file has {size:,} (truncated?)"
    elif end - begin != math.prod(shape) * itemsize or begin < data_start:
        problem = f"tensor {name!r} has offsets {begin}..{end} that do not fit shape {shape} of {entry['dtype']}"
    if problem:
        raise QSchedError(f"{str(path)!r} is corrupt: {problem}")
    return TensorInfo(name=name, dtype=dtype, shape=shape, begin=begin, end=end)


def read_tensor(handle: Any, info: TensorInfo) -> torch.Tensor:
    """Read one tensor from an open binary file into memory of its own (CPU)."""
    buffer = bytearray(info.nbytes)
    view = memoryview(buffer)
    done = 0
    while done < info.nbytes:
        got = os.preadv(handle.fileno(), [view[done:]], info.begin + done)
        if got <= 0:
            raise QSchedError(f"{handle.name!r} is truncated: {info.name!r} could not be read whole")
        done += got
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)


def iter_tensors(files: list[TensorFile]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of ``files``, one at a time, in file order."""
    for tensor_file in files:
        try:
            with open(tensor_file.path, "rb") as handle:
                for info in sorted(tensor_file.tensors.values(), key=lambda i: i.begin):
                    yield info.name, read_tensor(handle, info)
        except OSError as exc:
            raise QSchedError(f"cannot read {str(tensor_file.path)!r}: {exc}") from exc


def write_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], *, metadata: dict[str, str]) -> None:
    """Write ``tensors`` as one safetensors file, tensor by tensor (no second copy in memory).

    ``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` copy,
    which doubles the peak memory of saving a model; this writes each tensor's own
    buffer. The file is standard safetensors (header padded to 8 bytes, data in
    header order, no holes) and loads with ``safetensors.safe_open``.
    """
    dtype_names = {v: k for k, v in DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    order = sorted(tensors)
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in dtype_names:
            raise QSchedError(f"cannot store {name!r}: dtype {tensor.dtype} has no safetensors name")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": dtype_names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name in order:
            tensor = tensors[name].detach().to("cpu").contiguous()
            if tensor.numel():
                handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def weight_files(folder: str | os.PathLike[str], *, variant: str | None = None) -> list[TensorFile]:
    """The safetensors files holding a model's weights in ``folder``, headers parsed.

    Shards come from a ``*.safetensors.index*.json`` ``weight_map``. Without
    ``variant`` the plain weights are preferred, else the only variant present.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise QSchedError(f"weights folder {str(folder)!r} does not exist")
    groups: dict[str | None, list[Path]] = {}
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.safetensors.index*.json")):
        groups.setdefault(_variant_of(path), []).append(path)
    if variant is not None:
        paths = groups.get(variant, [])
    elif None in groups or len(groups) != 1:
        paths = groups.get(None, [])
    else:
        paths = next(iter(groups.values()))
    indexes = [p for p in paths if p.name.endswith(".json")]
    if len(indexes) == 1:
        return [read_header(p) for p in _shards(indexes[0])]
    if len(paths) == 1 and not indexes:
        return [read_header(paths[0])]
    found = ", ".join(p.name for p in folder.iterdir()) or "nothing"
    if not paths:
        wanted = f" of variant {variant!r}" if variant else (f" without a variant (variants: {sorted(str(k) for k in groups)})" if groups else "")
        raise QSchedError(f"no safetensors weights{wanted} in {str(folder)!r} (found: {found}); qsched reads safetensors only")
    raise QSchedError(
        f"{str(folder)!r} holds several weight files of one variant ({', '.join(p.name for p in paths[:5])}) "
        "and not exactly one *.safetensors.index.json to say how they fit together"
    )


def _variant_of(path: Path) -> str | None:
    """``fp16`` for ``model.fp16.safetensors`` or ``model.safetensors.index.fp16.json``, else None."""
    parts = path.name.removesuffix(".json").split(".")[1:]
    rest = [p for p in parts if p not in ("safetensors", "index")]
    return rest[-1] if rest else None


def _shards(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise QSchedError(f"cannot read the shard index {str(index_path)!r}: {exc}") from exc
    outside = [name for name in names if not isinstance(name, str) or Path(name).name != name]
    if outside:
        raise QSchedError(f"shard index {str(index_path)!r} names files outside its folder: {outside[:5]}")
    shards = [index_path.parent / name for name in names]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise QSchedError(f"shard index {str(index_path)!r} names missing files: {', '.join(missing[:5])}")
    return shards
