"""FID for the built-in world: torchmetrics ``FrechetInceptionDistance`` with project feature extractors.

Two feature spaces: ``"effnet"`` (ImageNet EfficientNet-Lite0, pooled 1280-d, see
:mod:`qsched.builtin.effnet`) and ``"clip"`` (the built-in CLIP's L2-normalised image
embeddings). The reference set is the Fashion-MNIST test split (10,000 images, 32x32); model
selection uses the last 10,000 training images instead (``reference_set="validation"``).
Its statistics (mean, covariance, count) are computed once and stored as safetensors with a
hash of the data and an identity string of the extractor; a stored file whose hashes do not
match the current data / extractor is refused (and recomputed by :func:`reference_stats`).
The EffNet statistics ship in ``assets/`` (covariance as a float16 upper triangle, 1.6 MB).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qsched.errors import QSchedError

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

ASSET_DIR = Path(__file__).resolve().parent / "assets"
FeatureKind = Literal["effnet", "clip"]
SHIPPED = {"effnet": ASSET_DIR / "fid_effnet_fmnist_test.safetensors", "clip": ASSET_DIR / "fid_clip_fmnist_test.safetensors"}
#: EffNet input size for 32x32 images: 4x bilinear upsampling; 224 (native) costs 4x more on CPU
EFFNET_RESOLUTION = 128


@dataclass(frozen=True)
class ReferenceStats:
    """Feature statistics of a reference image set (float64)."""

    mean: torch.Tensor  # [D]
    cov: torch.Tensor  # [D, D], unbiased (divided by count - 1)
    count: int
    data_hash: str
    extractor: str


def images_hash(images: np.ndarray | torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of an image array's shape, dtype and bytes."""
    a = np.ascontiguousarray(images.cpu().numpy() if isinstance(images, torch.Tensor) else images)
    h = hashlib.sha256(f"{a.shape}{a.dtype}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


class ClipImageFeatures(nn.Module):
    """FID feature extractor on the built-in CLIP: [N, 1|3, H, W] uint8 or [0, 1] float -> unit embeddings."""

    def __init__(self, *, path: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 256) -> None:
        super().__init__()
        from qsched.builtin.clip import ASSET_DIR as CLIP_DIR
        from qsched.builtin.clip import load_builtin_clip

        self.model, _ = load_builtin_clip(path, device=device)
        self.folder = Path(path) if path is not None else CLIP_DIR
        self.model.requires_grad_(False)
        self.num_features = int(self.model.config.projection_dim)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.batch_size = batch_size

    def identity(self) -> str:
        from qsched.provenance import sha256_file

        return f"builtin-clip:{sha256_file(self.folder / 'model.safetensors')[:16]}:res{self.image_size}"

    def train(self, mode: bool = True) -> ClipImageFeatures:
        return super().train(False)  # always inference behaviour

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from qsched.builtin.clip import to_pixel_values

        x = images.to(torch.float32) / 255.0 if images.dtype == torch.uint8 else images.to(torch.float32)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        device = next(self.model.parameters()).device
        out = [
            self.model.get_image_features(to_pixel_values(x[i : i + self.batch_size]).to(device))
            for i in range(0, x.shape[0], self.batch_size)
        ]
        return F.normalize(torch.cat(out), dim=-1)


def feature_extractor(kind: FeatureKind = "effnet", *, device: str | torch.device = "cpu", clip_path: str | Path | None = None) -> nn.Module:
    """The feature module of ``kind`` (EffNet at ``EFFNET_RESOLUTION``, or the built-in CLIP)."""
    if kind == "effnet":
        from qsched.builtin.effnet import EffNetFeatures

        return EffNetFeatures(resolution=EFFNET_RESOLUTION, device=device)
    if kind == "clip":
        return ClipImageFeatures(path=clip_path, device=device)
    raise QSchedError(f"unknown FID features {kind!r}; allowed: 'effnet', 'clip'")


@torch.no_grad()
def compute_stats(extractor: nn.Module, images: torch.Tensor, *, batch_size: int = 500, data_hash: str | None = None, progress: bool = True) -> ReferenceStats:
    """Mean and unbiased covariance (float64) of ``extractor`` features over ``images`` [N, C, H, W]."""
    from tqdm import tqdm

    n = int(images.shape[0])
    if n < 2:
        raise QSchedError(f"need at least 2 images for feature statistics, got {n}")
    total = None
    outer = None
    for i in tqdm(range(0, n, batch_size), desc="FID features", disable=not progress, mininterval=10):
        f = extractor(images[i : i + batch_size]).double()
        total = f.sum(0) if total is None else total + f.sum(0)
        outer = f.T @ f if outer is None else outer + f.T @ f
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    identity = extractor.identity() if hasattr(extractor, "identity") else type(extractor).__name__
    return ReferenceStats(mean=mean, cov=cov, count=n, data_hash=data_hash or images_hash(images), extractor=identity)


def save_stats(stats: ReferenceStats, path: str | Path, *, cov_dtype: torch.dtype = torch.float16) -> Path:
    """Write stats as safetensors: float64 mean, packed upper-triangle covariance, hashes in metadata.

    The covariance is stored in ``cov_dtype`` (float16 by default: 1.6 MB for 1280 features;
    measured on Fashion-MNIST EffNet features it moves FID by < 1e-5 relative).
    """
    from safetensors.torch import save_file

    if cov_dtype not in (torch.float16, torch.float32, torch.float64):
        raise QSchedError(f"cov_dtype must be float16, float32 or float64, got {cov_dtype}")
    d = stats.mean.numel()
    iu = torch.triu_indices(d, d)
    tensors = {"mean": stats.mean.double().contiguous(), "cov_triu": stats.cov[iu[0], iu[1]].to(cov_dtype).contiguous()}
    meta = {"count": str(stats.count), "dim": str(d), "data_hash": stats.data_hash, "extractor": stats.extractor, "format": "qsched-fid-stats-1"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_stats(path: str | Path, *, data_hash: str | None = None, extractor: str | None = None) -> ReferenceStats:
    """Read stats written by :func:`save_stats`; refuse a file made from other data or another extractor."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise QSchedError(f"FID reference statistics missing: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            mean, triu = f.get_tensor("mean"), f.get_tensor("cov_triu")
        d, count = int(meta["dim"]), int(meta["count"])
    except Exception as exc:  # corrupt header, missing tensor or metadata
        raise QSchedError(f"FID reference statistics {path} are corrupt or not qsched stats: {exc}") from exc
    if data_hash is not None and meta.get("data_hash") != data_hash:
        raise QSchedError(f"FID reference statistics {path} were computed on other data (hash {meta.get('data_hash')}, expected {data_hash}); recompute them")
    if extractor is not None and meta.get("extractor") != extractor:
        raise QSchedError(f"FID reference statistics {path} were computed with another extractor ({meta.get('extractor')!r}, expected {extractor!r}); recompute them")
    iu = torch.triu_indices(d, d)
    cov = torch.zeros(d, d, dtype=torch.float64)
    cov[iu[0], iu[1]] = triu.double()
    cov = cov + cov.triu(1).T
    return ReferenceStats(mean=mean.double(), cov=cov, count=count, data_hash=meta["data_hash"], extractor=meta["extractor"])


#: Reference image sets: "test" (the Fashion-MNIST test split: every reported FID) and
#: "validation" (the last 10,000 training images: model selection, which must not look at the test split)
REFERENCE_SETS = ("test", "validation")
VALIDATION_REFERENCE_SIZE = 10_000


def _reference_images(reference_set: str = "test") -> tuple[torch.Tensor, str]:
    from qsched.builtin.data import load_split

    if reference_set not in REFERENCE_SETS:
        raise QSchedError(f"unknown FID reference set {reference_set!r}; allowed: {REFERENCE_SETS}")
    if reference_set == "test":
        images = load_split("test").images
    else:
        images = np.ascontiguousarray(load_split("train").images[-VALIDATION_REFERENCE_SIZE:])
    return torch.from_numpy(images).unsqueeze(1), images_hash(images)


def reference_stats(kind: FeatureKind = "effnet", *, extractor: nn.Module | None = None, cache_dir: str | Path | None = None, device: str | torch.device = "cpu", reference_set: str = "test") -> ReferenceStats:
    """Statistics of a reference set (default the Fashion-MNIST test split) in feature space ``kind``.

    Uses the shipped file (test split only) when its hashes match, else a cached file in ``cache_dir``
    (default ``$QSCHED_CACHE`` or ``~/.cache/qsched``), else computes and caches them.
    """
    extractor = extractor if extractor is not None else feature_extractor(kind, device=device)
    identity = extractor.identity() if hasattr(extractor, "identity") else type(extractor).__name__
    try:
        images, data_hash = _reference_images(reference_set)
    except QSchedError as missing:
        if reference_set != "test":
            raise
        # Without the dataset the shipped statistics are used as they are (their data hash
        # cannot be checked), so that evaluation needs no Debian package.
        images, data_hash, missing_data = None, None, missing
    cache = Path(cache_dir or os.environ.get("QSCHED_CACHE", Path.home() / ".cache" / "qsched")) / "fid"
    shipped = SHIPPED.get(kind) if reference_set == "test" else None
    for path in (shipped, cache / f"{kind}_fmnist_{reference_set}.safetensors"):
        if path is not None and path.is_file():
            try:
                return load_stats(path, data_hash=data_hash, extractor=identity)
            except QSchedError:
                continue
    if images is None:
        raise QSchedError(f"no FID reference statistics match the {kind} extractor ({identity}), and they "
                          f"cannot be computed: {missing_data}")
    stats = compute_stats(extractor, images, data_hash=data_hash)
    save_stats(stats, cache / f"{kind}_fmnist_{reference_set}.safetensors")
    return stats


def fid_metric(kind: FeatureKind = "effnet", *, reference: ReferenceStats | None = None, extractor: nn.Module | None = None, device: str | torch.device = "cpu") -> FrechetInceptionDistance:
    """A torchmetrics FID whose real side is preset to ``reference`` (default: Fashion-MNIST test).

    Feed generated images with ``metric.update(images, real=False)``: [N, 1|3, H, W] uint8 in
    [0, 255] (or float in [0, 1] with the EffNet features). ``reset()`` keeps the reference.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = extractor if extractor is not None else feature_extractor(kind, device=device)
    reference = reference if reference is not None else reference_stats(kind, extractor=extractor, device=device)
    if reference.mean.numel() != extractor.num_features:
        raise QSchedError(f"reference statistics have {reference.mean.numel()} features, the extractor {extractor.num_features}")
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    set_real_stats(metric, reference)
    return metric


def set_real_stats(metric: FrechetInceptionDistance, stats: ReferenceStats) -> None:
    """Overwrite a torchmetrics FID's accumulated real-image states with ``stats``."""
    n = stats.count
    device = metric.real_features_sum.device
    metric.real_features_sum = (stats.mean * n).to(device)
    metric.real_features_cov_sum = (stats.cov * (n - 1) + n * torch.outer(stats.mean, stats.mean)).to(device)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)


def fid(images: torch.Tensor, *, kind: FeatureKind = "effnet", reference: ReferenceStats | None = None, extractor: nn.Module | None = None, batch_size: int = 500, device: str | torch.device = "cpu") -> float:
    """FID of ``images`` against ``reference`` (default: the Fashion-MNIST test split)."""
    if images.shape[0] < 2:
        raise QSchedError(f"FID needs at least 2 images, got {images.shape[0]}")
    metric = fid_metric(kind, reference=reference, extractor=extractor, device=device)
    for i in range(0, images.shape[0], batch_size):
        metric.update(images[i : i + batch_size], real=False)
    return float(metric.compute())


def write_shipped_stats(kind: FeatureKind = "effnet", *, device: str | torch.device = "cpu") -> Path:
    """Recompute the Fashion-MNIST test statistics of ``kind`` and write the shipped asset file."""
    extractor = feature_extractor(kind, device=device)
    images, data_hash = _reference_images("test")
    return save_stats(compute_stats(extractor, images, data_hash=data_hash), SHIPPED[kind])


if __name__ == "__main__":
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="python -m qsched.builtin.fid", description="write the shipped FID reference statistics")
    ap.add_argument("kind", choices=sorted(SHIPPED))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"wrote {write_shipped_stats(args.kind)} in {(time.perf_counter() - t0) / 60:.1f} min")
