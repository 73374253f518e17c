from __future__ import annotations

import gzip

import numpy as np
import pytest

from qsched.builtin.data import load_split, pad_to, read_idx, to_model_range, write_fake_dataset, write_idx
from qsched.errors import QSchedError


def test_idx_roundtrip_and_padding(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 9, 4]))
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    split = load_split("train", root=tmp_path)
    assert split.images.shape == (3, 32, 32) and split.images.dtype == np.uint8
    assert split.labels.tolist() == [0, 9, 4]
    assert np.array_equal(split.images[:, 2:30, 2:30], images)
    assert split.images[:, :2].sum() == 0 and split.images[:, :, 30:].sum() == 0


def test_value_range():
    x = to_model_range(np.array([[[0, 255], [127, 128]]], dtype=np.uint8))
    assert x.shape == (1, 1, 2, 2)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0


def test_pad_rejects_larger():
    with pytest.raises(QSchedError):
        pad_to(np.zeros((1, 40, 40), dtype=np.uint8))


def test_missing_dataset_names_install_command(tmp_path):
    with pytest.raises(QSchedError, match="apt-get install dataset-fashion-mnist"):
        load_split("train", root=tmp_path / "nowhere")


def test_corrupt_and_unknown_split(tmp_path):
    root = write_fake_dataset(tmp_path, n=4)
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (4).to_bytes(4, "big") * 3 + b"\x01\x02")
    with pytest.raises(QSchedError, match="corrupt"):
        load_split("test", root=root)
    with pytest.raises(QSchedError, match="unknown split"):
        load_split("validation", root=root)
