"""Image degradations with quality captions: what the built-in CLIP learns "quality" from.

Each degradation maps a severity ``u`` in [0, 1] to a parameter (noise sigma, blur sigma,
block size, contrast factor, number of grey levels, ...). ``MILD`` and ``STRONG`` are the
severity ranges used in training; held-out checks use their midpoints. Images are float
tensors ``[N, C, H, W]`` in [0, 1]. A *claim* is a quality statement a caption makes
("noisy", "slightly blurry", "good"); ``claim_holds`` says for which (degradation,
severity level) it is true, so a batch can have many correct captions per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qsched.errors import QSchedError

#: Degradation kinds; index 0 is "none" (a clean image).
KINDS: tuple[str, ...] = ("none", "noise", "saltpepper", "blotch", "blur", "block", "contrast", "posterize")
#: Kinds that read as noise ("a noisy photo").
NOISE_KINDS: frozenset[str] = frozenset({"noise", "saltpepper", "blotch"})
#: Severity ranges of u for level 1 (mild) and level 2 (strong).
MILD: tuple[float, float] = (0.15, 0.4)
STRONG: tuple[float, float] = (0.6, 1.0)
#: Severity level names (index = level).
LEVELS: tuple[str, ...] = ("clean", "mild", "strong")


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma [N]."""
    radius = 5
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None].clamp_min(1e-3)) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # [N, K]
    n, c, h, w = x.shape
    y = x.reshape(1, n * c, h, w)
    kk = k.repeat_interleave(c, dim=0)  # [N*C, K]
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kk[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kk[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def degrade(images: torch.Tensor, kind: str, severity: float | torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply one degradation ``kind`` at ``severity`` in [0, 1] (scalar or per-image [N]); returns [0, 1] images."""
    if kind not in KINDS:
        raise QSchedError(f"unknown degradation {kind!r}; allowed: {', '.join(KINDS)}")
    if images.ndim != 4:
        raise QSchedError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    x = images.to(torch.float32)
    n, c, h, w = x.shape
    u = torch.as_tensor(severity, dtype=torch.float32, device=x.device).reshape(-1)
    if u.numel() == 1:
        u = u.expand(n)
    if u.numel() != n or bool(((u < 0) | (u > 1)).any()):
        raise QSchedError(f"severity must be one value or one per image, each in [0, 1]; got {severity!r}")
    col = u.view(n, 1, 1, 1)
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=x.device)  # noqa: E731
    if kind == "none":
        y = x
    elif kind == "noise":  # additive Gaussian noise, sigma 0.02 .. 0.35
        y = x + (0.02 + 0.33 * col) * torch.randn(x.shape, generator=generator, device=x.device)
    elif kind == "saltpepper":  # a fraction 1% .. 21% of pixels set to black or white
        hit = rand(n, 1, h, w) < (0.01 + 0.2 * col)
        y = torch.where(hit, (rand(n, 1, h, w) < 0.5).to(x.dtype).expand_as(x), x)
    elif kind == "blotch":  # low-frequency random pattern (4x4 or 8x8 grid upsampled), amplitude .05 .. .4
        grid = 4 if bool(rand(1) < 0.5) else 8
        pattern = F.interpolate(torch.randn(n, 1, grid, grid, generator=generator, device=x.device), size=(h, w), mode="bilinear", align_corners=False)
        y = x + (0.05 + 0.35 * col) * pattern
    elif kind == "blur":  # Gaussian blur, sigma 0.4 .. 2.5 pixels
        y = _gaussian_blur(x, 0.4 + 2.1 * u)
    elif kind == "block":  # average over b x b blocks, b = 2 (u < .5), 4 (u < .9) or 8
        y = x.clone()
        for b, lo, hi in ((2, 0.0, 0.5), (4, 0.5, 0.9), (8, 0.9, 1.01)):
            sel = (u >= lo) & (u < hi)
            if bool(sel.any()):
                pooled = F.avg_pool2d(x[sel], b, ceil_mode=True)
                y[sel] = F.interpolate(pooled, scale_factor=b, mode="nearest")[..., :h, :w]
    elif kind == "contrast":  # shrink toward the image mean by a factor 1 .. 0.15
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        y = mean + (x - mean) * (1.0 - 0.85 * col)
    else:  # posterize: 12 .. 2 grey levels (quantization banding)
        levels = torch.round(12.0 - 10.0 * col).clamp_min(2.0)
        y = torch.round(x * (levels - 1)) / (levels - 1)
    return y.clamp(0.0, 1.0)


def sample_severity(level: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Severity u per image for levels [N] (0 clean -> 0, 1 mild, 2 strong: uniform in their range)."""
    r = torch.rand(level.shape, generator=generator)
    lo = torch.where(level == 2, STRONG[0], MILD[0])
    hi = torch.where(level == 2, STRONG[1], MILD[1])
    return torch.where(level == 0, torch.zeros_like(r), lo + (hi - lo) * r)


def level_midpoint(level: int) -> float:
    """The held-out severity of a level (midpoint of its training range)."""
    if level == 0:
        return 0.0
    lo, hi = MILD if level == 1 else STRONG
    return 0.5 * (lo + hi)


def random_degrade(
    images: torch.Tensor, *, p_clean: float = 0.5, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Degrade a random subset: returns (images, kind index [N], level [N] in {0, 1, 2}, severity u [N])."""
    n = images.shape[0]
    clean = torch.rand(n, generator=generator) < p_clean
    kind = torch.randint(1, len(KINDS), (n,), generator=generator)
    level = torch.randint(1, 3, (n,), generator=generator)
    kind = torch.where(clean, torch.zeros_like(kind), kind)
    level = torch.where(clean, torch.zeros_like(level), level)
    u = sample_severity(level, generator=generator)
    out = images.to(torch.float32).clone()
    for k in range(1, len(KINDS)):
        sel = kind == k
        if bool(sel.any()):
            out[sel] = degrade(out[sel], KINDS[k], u[sel], generator=generator)
    return out, kind, level, u


# ----------------------------------------------------------------------------- quality claims

#: claim name -> (words a caption may use, predicate over (kind name, level)).
CLAIMS: dict[str, tuple[tuple[str, ...], object]] = {
    "good": (("good", "high quality", "great", "nice"), lambda k, s: k == "none"),
    "bad": (("bad", "low quality", "degraded", "distorted", "corrupted", "poor quality"), lambda k, s: k != "none"),
    "slightly_bad": (("slightly degraded", "slightly distorted", "mildly degraded"), lambda k, s: s == 1),
    "very_bad": (("heavily degraded", "very bad", "badly distorted", "very low quality"), lambda k, s: s == 2),
    "clean": (("clean", "noise-free", "noiseless"), lambda k, s: k not in NOISE_KINDS),
    "noisy": (("noisy", "grainy", "speckled"), lambda k, s: k in NOISE_KINDS),
    "slightly_noisy": (("slightly noisy", "mildly noisy"), lambda k, s: k in NOISE_KINDS and s == 1),
    "very_noisy": (("very noisy", "extremely noisy"), lambda k, s: k in NOISE_KINDS and s == 2),
    "sharp": (("sharp", "crisp", "in focus"), lambda k, s: k != "blur"),
    "blurry": (("blurry", "blurred", "out of focus"), lambda k, s: k == "blur"),
    "slightly_blurry": (("slightly blurry", "slightly blurred"), lambda k, s: k == "blur" and s == 1),
    "very_blurry": (("very blurry", "heavily blurred"), lambda k, s: k == "blur" and s == 2),
    "high_contrast": (("high contrast", "vivid"), lambda k, s: k != "contrast"),
    "low_contrast": (("low contrast", "faded", "washed out"), lambda k, s: k == "contrast"),
    "slightly_low_contrast": (("slightly faded",), lambda k, s: k == "contrast" and s == 1),
    "very_low_contrast": (("very faded", "very low contrast"), lambda k, s: k == "contrast" and s == 2),
    "smooth": (("smooth",), lambda k, s: k not in NOISE_KINDS and k not in ("block", "posterize")),
    "blocky": (("blocky", "pixelated"), lambda k, s: k == "block"),
    "very_blocky": (("very blocky", "heavily pixelated"), lambda k, s: k == "block" and s == 2),
    "banded": (("posterized", "banded"), lambda k, s: k == "posterize"),
}
CLAIM_NAMES: tuple[str, ...] = ("none",) + tuple(CLAIMS)
#: claims a clean image is described with.
CLEAN_CLAIMS: tuple[str, ...] = ("good", "clean", "sharp", "high_contrast", "smooth")
#: graded antonym claims: (positive claim, negative claim, kinds whose severity moves them)
GRADED: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("good", "bad", frozenset(KINDS[1:])),
    ("clean", "noisy", NOISE_KINDS),
    ("sharp", "blurry", frozenset({"blur"})),
    ("high_contrast", "low_contrast", frozenset({"contrast"})),
    ("smooth", "blocky", frozenset({"block"})),
    ("smooth", "banded", frozenset({"posterize"})),
    ("smooth", "noisy", NOISE_KINDS),
)
#: severity at which a graded claim is fully negative (weight g(u) = min(1, u / FULL_SEVERITY))
FULL_SEVERITY = 0.8


def claim_table() -> torch.Tensor:
    """Bool [num claims, num kinds, 3 levels]: whether claim c holds for kind k at level s ("none" always)."""
    t = torch.zeros(len(CLAIM_NAMES), len(KINDS), 3, dtype=torch.bool)
    t[0] = True
    for ci, name in enumerate(CLAIM_NAMES[1:], start=1):
        pred = CLAIMS[name][1]
        for ki, kind in enumerate(KINDS):
            for s in range(3):
                valid = (kind == "none") == (s == 0)
                t[ci, ki, s] = valid and bool(pred(kind, s))  # type: ignore[operator]
    return t


def claim_weights(kinds: torch.Tensor, levels: torch.Tensor, severity: torch.Tensor) -> torch.Tensor:
    """Float [N, num claims]: how true each claim is of each image, in [0, 1].

    Level-specific claims ("slightly noisy", "heavily degraded") are 0 or 1. Graded antonym
    pairs share the weight: with g = min(1, u / FULL_SEVERITY) for an image of a kind that moves
    the pair, the negative claim ("noisy", "bad") gets g and the positive one ("clean", "good")
    1 - g. Trained against these targets at the metric's logit scale of 100, CLIP-IQA on a pair
    approximates 1 - g: graded with severity rather than a saturated yes/no.
    """
    w = claim_table()[:, kinds, levels].T.to(torch.float32).clone()  # [N, C] binary truth
    g = (severity.to(torch.float32) / FULL_SEVERITY).clamp(0.0, 1.0)
    for positive, negative, moved in GRADED:
        hit = torch.tensor([kind in moved for kind in KINDS], dtype=torch.bool)[kinds]
        pi, ni = CLAIM_NAMES.index(positive), CLAIM_NAMES.index(negative)
        w[:, ni] = torch.where(hit, g, w[:, ni])
        w[:, pi] = torch.where(hit, 1.0 - g, w[:, pi])
    return w


def true_claims(kind: str, level: int) -> list[str]:
    """Claims (besides "none") that hold for an image of ``kind`` at ``level``."""
    return [name for name in CLAIMS if CLAIMS[name][1](kind, level)]  # type: ignore[operator]


def article(word: str) -> str:
    """'a' or 'an' before ``word``."""
    return "an" if word[:1] in "aeiou" else "a"


def quality_prompt(word: str) -> str:
    """The quality-only caption form used for CLIP-IQA anchors, e.g. 'a noisy photo'."""
    return f"{article(word)} {word} photo"

