from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qsched.errors import QSchedError
from qsched.quant.tensor_files import iter_tensors, read_header, weight_files, write_tensors


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 3, generator=g),
        "b.weight": torch.randn(4, 2, 3, 3, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(7, generator=g).half(),
        "d.index": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.codes": torch.arange(-8, 8, dtype=torch.int8),
        "g.empty": torch.zeros(0, 4),
    }


def test_reads_every_dtype_like_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(sample_tensors(), str(path), metadata={"format": "pt", "x": "1"})
    header = read_header(path)
    assert header.metadata == {"format": "pt", "x": "1"}
    ours = dict(iter_tensors([header]))
    theirs = load_file(str(path))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


def test_truncated_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(sample_tensors(), str(path))
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(QSchedError, match="truncated"):
        read_header(cut)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(QSchedError, match="shorter than 8 bytes"):
        read_header(tiny)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(QSchedError, match="corrupt or truncated"):
        read_header(huge)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(QSchedError, match="not JSON"):
        read_header(garbage)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    wrong = tmp_path / "wrong.safetensors"
    wrong.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(QSchedError, match="do not fit shape"):
        read_header(wrong)


def test_weight_files_prefers_plain_then_variant_and_reads_shards(tmp_path: Path) -> None:
    tensors = sample_tensors()
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file(tensors, str(plain / "model.safetensors"))
    save_file({k: v for k, v in tensors.items()}, str(plain / "model.fp16.safetensors"))
    assert [f.path.name for f in weight_files(plain)] == ["model.safetensors"]
    assert [f.path.name for f in weight_files(plain, variant="fp16")] == ["model.fp16.safetensors"]
    with pytest.raises(QSchedError, match="variant 'bf16'"):
        weight_files(plain, variant="bf16")

    only_variant = tmp_path / "variant"
    only_variant.mkdir()
    save_file(tensors, str(only_variant / "diffusion_pytorch_model.fp16.safetensors"))
    assert [f.path.name for f in weight_files(only_variant)] == ["diffusion_pytorch_model.fp16.safetensors"]

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[:3], names[3:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(sharded / shard))
        weight_map.update({k: shard for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = dict(iter_tensors(weight_files(sharded)))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)

    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../evil.safetensors"}}))
    with pytest.raises(QSchedError, match="outside its folder"):
        weight_files(sharded)
    (sharded / "model.safetensors.index.json").unlink()
    with pytest.raises(QSchedError, match="several weight files"):
        weight_files(sharded)
    with pytest.raises(QSchedError, match="no safetensors weights"):
        weight_files(tmp_path)
    with pytest.raises(QSchedError, match="does not exist"):
        weight_files(tmp_path / "missing")


def test_written_files_load_with_safetensors(tmp_path: Path) -> None:
    from safetensors import safe_open

    tensors = sample_tensors() | {"h.scalar": torch.tensor(3.5), "i.view": torch.arange(10.0)[2:6]}
    path = tmp_path / "w.safetensors"
    write_tensors(path, tensors, metadata={"format": "pt", "k": "v"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "k": "v"}
        assert set(handle.keys()) == set(tensors)
        for key, value in tensors.items():
            got = handle.get_tensor(key)
            assert got.dtype == value.dtype and torch.equal(got, value), key
    assert (8 + struct.unpack("<Q", path.read_bytes()[:8])[0]) % 8 == 0  # header padded as the format asks
    with pytest.raises(QSchedError, match="no safetensors name"):
        write_tensors(tmp_path / "bad.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)}, metadata={})
