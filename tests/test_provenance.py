from __future__ import annotations

import json
import os
import stat

from qsched.provenance import package_versions, sha256_file, write_json_atomic


def test_write_json_atomic_replaces_whole_file_with_normal_mode(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "a.json", {"x": 1})
    write_json_atomic(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temp file left
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_versions_and_hash(tmp_path):
    versions = package_versions()
    assert {"python", "torch", "diffusers", "qsched"} <= set(versions)
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
