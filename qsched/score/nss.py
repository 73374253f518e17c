"""Natural-scene statistics shared by the BRISQUE and NIQE scorers.

Both measure how far an image's *mean-subtracted, contrast-normalised* (MSCN)
coefficients, and the products of neighbouring coefficients, stray from the
statistics of natural photos: each is fitted with an asymmetric generalised
Gaussian (AGGD) whose shape and spreads become features. This module holds that
math once; :mod:`qsched.score.brisque` and :mod:`qsched.score.niqe` choose the
variants their reference implementations use (precision, window, padding, how the
AGGD shape is solved, whether neighbour products wrap around), because the
published model parameters were fitted to exactly those features.

Pure numpy / scipy: no torch, no qsched imports (a reference script loads it on its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize, signal, special

__all__ = [
    "AGGD",
    "ALPHA_GRID",
    "aggd_ratio",
    "fit_aggd",
    "gaussian_kernel_2d",
    "gaussian_window",
    "half_size_cubic",
    "mscn",
    "paired_products",
]

#: Shape values scanned by the ``"grid"`` solver: 0.2, 0.201, ..., 9.999 (scikit-video's table).
ALPHA_GRID: np.ndarray = np.arange(0.2, 10, 0.001)


def aggd_ratio(alpha: np.ndarray | float) -> np.ndarray | float:
    """``Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a))``: E|x|^2 / E[x^2] of a generalised Gaussian of shape ``a``."""
    g2 = special.gamma(2.0 / alpha)
    return g2 * g2 / (special.gamma(1.0 / alpha) * special.gamma(3.0 / alpha))


_GRID_RATIO: np.ndarray = aggd_ratio(ALPHA_GRID)


def gaussian_window(radius: int, sigma: float, *, dtype: type = np.float64) -> np.ndarray:
    """Normalised 1-D Gaussian weights at ``-radius..radius``, computed in ``dtype`` (scikit-video's window)."""
    k = np.arange(-radius, radius + 1).astype(dtype)
    s = dtype(sigma)
    w = np.exp(dtype(-0.5) * (k * k) / (s * s)).astype(dtype)
    return w / w.sum(dtype=dtype)


def gaussian_kernel_2d(size: int, sigma: float) -> np.ndarray:
    """BRISQUE's ``size x size`` Gaussian: ``exp(-(x^2 + y^2) / 2 sigma^2) / (2 pi sigma^2)`` over its sum."""
    y, x = np.indices((size, size)) - size // 2
    kernel = 1 / (2 * np.pi * sigma**2) * np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def mscn(image: np.ndarray, window: np.ndarray, c: float) -> np.ndarray:
    """MSCN coefficients ``(I - mu) / (sigma + c)`` of a 2-D image, in the image's dtype.

    ``mu`` and ``sigma^2 = |E[I^2] - mu^2|`` are local moments under ``window``,
    zero-padded at the border (as both references do). A 2-D ``window`` is applied with
    ``scipy.signal.convolve2d`` (BRISQUE), a 1-D one separably with
    ``scipy.ndimage.correlate1d``, each pass rounded to the image's dtype (scikit-video,
    float32). The two are equal in exact arithmetic, but the AGGD fits split values by
    sign, and in flat regions the sign of ``I - mu`` is rounding noise: only the
    reference's own filtering reproduces its features there (with the separable filter,
    BRISQUE of JPEG pictures, full of flat blocks, moved by up to 0.37).
    """
    if image.ndim != 2:
        raise ValueError(f"mscn needs a 2-D image, got shape {image.shape}")
    dtype = image.dtype

    def local_mean(x: np.ndarray) -> np.ndarray:
        if window.ndim == 2:
            return signal.convolve2d(x, window, mode="same")
        rows = ndimage.correlate1d(x, window, axis=0, output=dtype, mode="constant")
        return ndimage.correlate1d(rows, window, axis=1, output=dtype, mode="constant")

    mu = local_mean(image)
    sigma = np.sqrt(np.abs(local_mean(image * image) - mu * mu))
    return (image - mu) / (sigma + dtype.type(c))


def paired_products(x: np.ndarray, *, wrap: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Products of each coefficient with its horizontal, vertical, main- and anti-diagonal neighbour.

    ``wrap=False`` (BRISQUE) keeps only pairs inside the image; ``wrap=True``
    (scikit-video's NIQE) pairs across the border with ``np.roll``, so each product
    has the input's shape.
    """
    if wrap:
        down = np.roll(x, 1, axis=0)
        return (np.roll(x, 1, axis=1) * x, down * x, np.roll(down, 1, axis=1) * x, np.roll(down, -1, axis=1) * x)
    return (x[:, :-1] * x[:, 1:], x[:-1, :] * x[1:, :], x[:-1, :-1] * x[1:, 1:], x[1:, :-1] * x[:-1, 1:])


@dataclass(frozen=True)
class AGGD:
    """An asymmetric generalised Gaussian fitted by moments.

    ``left_std`` / ``right_std`` are the root mean squares of the negative / the
    non-negative values; ``alpha`` the shape.
    """

    alpha: float
    left_std: float
    right_std: float

    @property
    def _scale(self) -> float:
        return float(np.sqrt(special.gamma(1.0 / self.alpha) / special.gamma(3.0 / self.alpha)))

    @property
    def left_scale(self) -> float:
        """``beta_l = left_std * sqrt(Gamma(1/a) / Gamma(3/a))``."""
        return self._scale * self.left_std

    @property
    def right_scale(self) -> float:
        """``beta_r = right_std * sqrt(Gamma(1/a) / Gamma(3/a))``."""
        return self._scale * self.right_std

    @property
    def mean(self) -> float:
        """``(beta_r - beta_l) * Gamma(2/a) / Gamma(1/a)``."""
        ratio = special.gamma(2.0 / self.alpha) / special.gamma(1.0 / self.alpha)
        return (self.right_scale - self.left_scale) * float(ratio)


def fit_aggd(x: np.ndarray, *, solver: str) -> AGGD:
    """Moment fit of an AGGD to the values of ``x`` (any shape).

    The shape solves ``aggd_ratio(a) = R``, with ``R = r * (g^3 + 1)(g + 1) / (g^2 + 1)^2``,
    ``r = E|x|^2 / E[x^2]`` and ``g = left_std / right_std``:

    - ``"root"`` (BRISQUE): ``scipy.optimize.root`` from 0.2, as the ``brisque`` package does;
      undefined statistics (a flat image) give NaN.
    - ``"grid"`` (NIQE): the nearest value of :data:`ALPHA_GRID`, as scikit-video does;
      undefined statistics give the first grid value, 0.2 (what its ``argmin`` over NaN returns).

    Means are taken in ``x``'s dtype (scikit-video's are float32), the rest in float64.
    """
    x = x.reshape(-1)
    squares = x * x
    negative = x < 0
    left_sq = squares[negative]
    right_sq = squares[~negative]
    left_std = float(np.sqrt(left_sq.mean())) if left_sq.size else 0.0
    right_std = float(np.sqrt(right_sq.mean())) if right_sq.size else 0.0
    mean_square = float(squares.mean()) if squares.size else 0.0
    mean_abs = float(np.abs(x).mean()) if x.size else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.float64(left_std) / np.float64(right_std)
        r = np.float64(mean_abs) ** 2 / np.float64(mean_square)
        ratio = r * ((g**3 + 1.0) * (g + 1.0)) / (g**2 + 1.0) ** 2
    if solver == "grid":
        alpha = float(ALPHA_GRID[np.argmin((_GRID_RATIO - ratio) ** 2)]) if np.isfinite(ratio) else float(ALPHA_GRID[0])
    elif solver == "root":
        solved = optimize.root(lambda a: aggd_ratio(a) - ratio, [0.2]).x[0] if np.isfinite(ratio) else np.nan
        alpha = float(solved)
    else:
        raise ValueError(f"AGGD solver must be 'grid' or 'root', got {solver!r}")
    return AGGD(alpha=alpha, left_std=left_std, right_std=right_std)


def half_size_cubic(image: np.ndarray) -> np.ndarray:
    """Half-size bicubic resampling of a 2-D image, equal to OpenCV's ``cv2.resize(fx=fy=0.5, INTER_CUBIC)``.

    OpenCV samples output pixel ``i`` at source position ``2i + 0.5`` with Keys'
    cubic (a = -0.75): taps ``-3/32, 19/32, 19/32, -3/32`` on pixels ``2i-1..2i+2``,
    edges replicated, no antialiasing; the output size is ``n / 2`` rounded half to
    even (``cvRound``). Rows first, then columns, each sum taken left to right, as
    OpenCV does. BRISQUE's half-scale features were trained on this resize, and a
    low-pass one (PIL) changes them (see the ``brisque`` docs).
    """
    taps = (-0.09375, 0.59375, 0.59375, -0.09375)
    out = np.asarray(image)
    for axis in (1, 0):
        n = out.shape[axis]
        m = int(np.rint(n / 2))
        start = 2 * np.arange(m)
        picks = [np.take(out, np.clip(start + k, 0, n - 1), axis=axis) for k in (-1, 0, 1, 2)]
        acc = taps[0] * picks[0]
        for weight, pick in zip(taps[1:], picks[1:]):
            acc = acc + weight * pick
        out = acc
    return out
