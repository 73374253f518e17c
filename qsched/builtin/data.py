"""Fashion-MNIST loader: gzipped IDX files -> tensors in [-1, 1], padded to 32x32.

No torchvision: the IDX format is a small header plus raw bytes, read with numpy.
The dataset comes from the Debian package ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qsched.errors import QSchedError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu)"
IMAGE_SIZE = 32

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class Split:
    """One split: ``images`` uint8 [N, 32, 32] (padded), ``labels`` int64 [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_idx(path: str | Path) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise QSchedError(f"cannot read IDX file {path}: {exc}; reinstall the dataset ({INSTALL_HINT})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise QSchedError(f"{path} is not an IDX file (bad magic number); reinstall the dataset ({INSTALL_HINT})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset != count * dtype.itemsize:
        raise QSchedError(
            f"{path} is truncated or corrupt: header says {dims}, found {len(raw) - offset} data bytes; "
            f"reinstall the dataset ({INSTALL_HINT})"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)


def pad_to(images: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Zero-pad [N, H, W] images symmetrically to ``size`` x ``size`` (28 -> 32: 2 pixels each side)."""
    n, h, w = images.shape
    if h > size or w > size:
        raise QSchedError(f"images of {h}x{w} are larger than the target size {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((n, size, size), dtype=images.dtype)
    out[:, top : top + h, left : left + w] = images
    return out


def load_split(split: str = "train", *, root: str | Path = DEFAULT_ROOT) -> Split:
    """Load ``"train"`` (60k) or ``"test"`` (10k) Fashion-MNIST, padded to 32x32, uint8."""
    if split not in _FILES:
        raise QSchedError(f"unknown split {split!r}; allowed: {sorted(_FILES)}")
    root = Path(root)
    paths = [root / name for name in _FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise QSchedError(f"Fashion-MNIST not found: missing {', '.join(missing)}; {INSTALL_HINT}, or pass its folder as root")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise QSchedError(f"inconsistent Fashion-MNIST files in {root}: images {images.shape}, labels {labels.shape}")
    return Split(images=pad_to(np.ascontiguousarray(images, dtype=np.uint8)), labels=labels.astype(np.int64))


def to_model_range(images: np.ndarray | "torch.Tensor") -> "torch.Tensor":
    """uint8 [N, H, W] -> float32 [N, 1, H, W] in [-1, 1]."""
    import torch

    t = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    return (t.to(torch.float32) / 127.5 - 1.0).unsqueeze(1)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8) as a gzipped IDX file: tiny stand-in datasets for tests and smoke runs."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def write_fake_dataset(root: str | Path, *, n: int = 32, seed: int = 0) -> Path:
    """A random Fashion-MNIST-shaped dataset (both splits) under ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for images_name, labels_name in _FILES.values():
        write_idx(root / images_name, rng.integers(0, 256, size=(n, 28, 28)))
        write_idx(root / labels_name, np.arange(n) % 10)
    return root
