"""FID of the built-in world: torchmetrics plumbing, reference statistics cache and its guards."""

from __future__ import annotations

import pytest
import torch

from qsched.builtin import fid as FID
from qsched.builtin.effnet import EffNetFeatures
from qsched.errors import QSchedError


class PooledPixels(torch.nn.Module):
    """A cheap 16-d feature extractor (4x4 average pooling) for the plumbing tests."""

    num_features = 16

    def identity(self) -> str:
        return "pooled-pixels-4x4"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 4).flatten(1)


@pytest.fixture(scope="module")
def extractor() -> PooledPixels:
    return PooledPixels()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    from qsched.builtin.data import load_split

    return torch.from_numpy(load_split("test").images[:48]).unsqueeze(1)


def test_effnet_stats_carry_the_extractor_identity(images) -> None:
    effnet = EffNetFeatures(resolution=64)  # small input keeps the test fast; the shipped stats use 128
    ref = FID.compute_stats(effnet, images[:8], progress=False)
    assert ref.mean.shape == (1280,) and ref.cov.shape == (1280, 1280) and ref.count == 8
    assert ref.extractor == effnet.identity() and "res64" in ref.extractor


def test_fid_of_a_set_against_itself_is_zero_and_a_shifted_set_is_not(extractor, images) -> None:
    ref = FID.compute_stats(extractor, images, progress=False)
    assert FID.fid(images, reference=ref, extractor=extractor) == pytest.approx(0.0, abs=1e-2)
    darker = (images.float() * 0.6).round().to(torch.uint8)
    shifted = FID.fid(darker, reference=ref, extractor=extractor)
    other = FID.fid(torch.from_numpy(__import__("numpy").roll(images.numpy(), 8, axis=-1)), reference=ref, extractor=extractor)
    assert shifted > 1e-3 and other > 1e-3


def test_metric_keeps_the_reference_across_reset(extractor, images) -> None:
    ref = FID.compute_stats(extractor, images[:24], progress=False)
    metric = FID.fid_metric(reference=ref, extractor=extractor)
    metric.update(images[24:], real=False)
    first = float(metric.compute())
    metric.reset()
    metric.update(images[24:], real=False)
    assert float(metric.compute()) == pytest.approx(first, rel=1e-6)
    assert int(metric.real_features_num_samples) == 24


def test_stats_round_trip_and_mismatch_detection(extractor, images, tmp_path) -> None:
    ref = FID.compute_stats(extractor, images, progress=False)
    path = FID.save_stats(ref, tmp_path / "ref.safetensors")
    back = FID.load_stats(path, data_hash=ref.data_hash, extractor=extractor.identity())
    assert back.count == ref.count == 48 and back.data_hash == FID.images_hash(images)
    assert torch.equal(back.mean, ref.mean)
    assert torch.allclose(back.cov, ref.cov, rtol=1e-3, atol=1e-7) and torch.equal(back.cov, back.cov.T)
    exact = FID.load_stats(FID.save_stats(ref, tmp_path / "ref64.safetensors", cov_dtype=torch.float64))
    assert torch.equal(exact.cov, ref.cov)
    with pytest.raises(QSchedError, match="other data"):
        FID.load_stats(path, data_hash="0" * 16)
    with pytest.raises(QSchedError, match="another extractor"):
        FID.load_stats(path, extractor="effnet-lite0:other")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(QSchedError, match="bad.safetensors"):
        FID.load_stats(tmp_path / "bad.safetensors")
    with pytest.raises(QSchedError, match="missing"):
        FID.load_stats(tmp_path / "none.safetensors")


def test_reference_stats_use_a_matching_cache_and_recompute_a_stale_one(extractor, images, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(FID, "_reference_images", lambda reference_set="test": (images, FID.images_hash(images)))
    monkeypatch.setitem(FID.SHIPPED, "effnet", tmp_path / "shipped.safetensors")
    first = FID.reference_stats("effnet", extractor=extractor, cache_dir=tmp_path)  # computes, caches
    assert (tmp_path / "fid" / "effnet_fmnist_test.safetensors").is_file()

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although a matching cache exists")

    monkeypatch.setattr(FID, "compute_stats", boom)
    again = FID.reference_stats("effnet", extractor=extractor, cache_dir=tmp_path)
    assert torch.equal(first.mean, again.mean)
    stale = FID.ReferenceStats(first.mean, first.cov, first.count, "f" * 16, first.extractor)
    FID.save_stats(stale, tmp_path / "fid" / "effnet_fmnist_test.safetensors")
    with pytest.raises(AssertionError, match="recomputed"):
        FID.reference_stats("effnet", extractor=extractor, cache_dir=tmp_path)


def test_validation_reference_is_its_own_set_and_never_the_shipped_file(extractor, images, tmp_path, monkeypatch) -> None:
    """Model selection's reference (the last 10k training images) is cached under its own name; the
    shipped test-split file is never taken for it."""
    other = images.flip(-1).contiguous()
    sets = {"test": images, "validation": other}
    monkeypatch.setattr(FID, "_reference_images", lambda reference_set="test": (sets[reference_set], FID.images_hash(sets[reference_set])))
    monkeypatch.setitem(FID.SHIPPED, "effnet", tmp_path / "shipped.safetensors")
    FID.save_stats(FID.compute_stats(extractor, images, progress=False), tmp_path / "shipped.safetensors")
    val = FID.reference_stats("effnet", extractor=extractor, cache_dir=tmp_path, reference_set="validation")
    assert (tmp_path / "fid" / "effnet_fmnist_validation.safetensors").is_file()
    assert val.data_hash == FID.images_hash(other)
    assert torch.allclose(val.mean, FID.compute_stats(extractor, other, progress=False).mean)
    test = FID.reference_stats("effnet", extractor=extractor, cache_dir=tmp_path)  # from the "shipped" file
    assert not (tmp_path / "fid" / "effnet_fmnist_test.safetensors").exists()
    assert test.data_hash == FID.images_hash(images) and not torch.allclose(test.mean, val.mean)


def test_validation_reference_images_are_the_last_training_images() -> None:
    from qsched.builtin.data import load_split

    images, data_hash = FID._reference_images("validation")
    train = load_split("train").images
    assert images.shape == (10_000, 1, 32, 32) and torch.equal(images[:, 0], torch.from_numpy(train[-10_000:]))
    assert data_hash != FID._reference_images("test")[1]
    with pytest.raises(QSchedError, match="allowed"):
        FID._reference_images("train")


def test_unknown_feature_kind_is_refused() -> None:
    with pytest.raises(QSchedError, match="allowed"):
        FID.feature_extractor("inception")  # type: ignore[arg-type]


def test_shipped_effnet_reference_matches_the_data_and_the_extractor() -> None:
    from qsched.builtin.effnet import weights_path
    from qsched.provenance import sha256_file

    images, data_hash = FID._reference_images("test")
    identity = f"effnet-lite0:{sha256_file(weights_path())[:16]}:res{FID.EFFNET_RESOLUTION}:bilinear-aa:grey2rgb"
    stats = FID.load_stats(FID.SHIPPED["effnet"], data_hash=data_hash, extractor=identity)
    assert stats.count == images.shape[0] == 10_000 and stats.mean.shape == (1280,)
    assert torch.isfinite(stats.cov).all() and float(torch.linalg.eigvalsh(stats.cov).min()) > -1e-4


def test_shipped_clip_reference_matches_the_shipped_clip() -> None:
    images, data_hash = FID._reference_images("test")
    extractor = FID.ClipImageFeatures()
    stats = FID.load_stats(FID.SHIPPED["clip"], data_hash=data_hash, extractor=extractor.identity())
    assert stats.count == 10_000 and stats.mean.shape == (extractor.num_features,)
    train = torch.from_numpy(__import__("qsched.builtin.data", fromlist=["load_split"]).load_split("train").images[:300]).unsqueeze(1)
    real = FID.fid(train, kind="clip", reference=stats, extractor=extractor)
    noisy = FID.fid((train.float() + 60 * torch.randn(train.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255).to(torch.uint8), kind="clip", reference=stats, extractor=extractor)
    assert 0 < real < noisy


def test_shipped_stats_serve_without_the_dataset(monkeypatch, tmp_path):
    """Evaluation needs no Debian package: without the dataset the shipped statistics are used."""
    from qsched.builtin import fid as FIDMOD
    from qsched.errors import QSchedError

    def missing(reference_set="test"):
        raise QSchedError("Fashion-MNIST not found; apt-get install dataset-fashion-mnist")

    monkeypatch.setattr(FIDMOD, "_reference_images", missing)
    stats = FIDMOD.reference_stats("effnet", cache_dir=tmp_path)
    assert stats.count == 10_000 and stats.mean.shape == (1280,)
    monkeypatch.setitem(FIDMOD.SHIPPED, "effnet", tmp_path / "absent.safetensors")
    with pytest.raises(QSchedError, match="apt-get install dataset-fashion-mnist"):
        FIDMOD.reference_stats("effnet", cache_dir=tmp_path)
