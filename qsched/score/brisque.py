"""BRISQUE (Mittal, Moorthy & Bovik 2012) as a quality scorer, with the ``brisque`` package's model.

The scorer returns the **negated** BRISQUE score, ``-BRISQUE``: BRISQUE is lower-is-better
(about 0 for a pristine photo to 100 for a heavily distorted one; it can leave that range),
and qsched's scorers are higher-is-better.

Parameters come from the installed PyPI package ``brisque`` (0.2.0): its libsvm model
``models/svm.txt`` (epsilon-SVR, RBF kernel) and the feature ranges in
``models/normalize.pickle``. Neither file is copied and nothing is unpickled: the SVR
text is parsed here, and the two float lists are read from the pickle's opcodes.

The 36 features follow the package's code, so that scores match it: grey image
(scikit-image's ``rgb2gray`` of the 8-bit picture, in [0, 1]); at full and half size
(OpenCV bicubic, reproduced by :func:`qsched.score.nss.half_size_cubic`) the MSCN
coefficients (7x7 Gaussian, sigma 7/6, ``scipy.signal.convolve2d`` as the package, C = 1/255)
and their four neighbour products, each fitted with an AGGD (the package fits the MSCN with
an AGGD too, not a symmetric GGD); features ``[alpha, (sl^2 + sr^2) / 2]`` for the MSCN and
``[alpha, mean, sl^2, sr^2]`` per product; scaled to [-1, 1] by the stored ranges; then
``sum_i coef_i exp(-gamma |x - sv_i|^2) - rho``.

The model was trained on natural photos (LIVE database, hundreds of pixels a side). It
runs on any image of at least 16x16 pixels, but its numbers mean what they mean only for
photo-like images of adequate size; on the built-in model's 32x32 images it does not rank
degradations (``qsched/builtin/SCORERS.md``). An all-black image has no BRISQUE (every MSCN
coefficient is 0): its score is NaN, which :func:`qsched.score.check_scores` refuses.
"""

from __future__ import annotations

import pickletools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from qsched.errors import QSchedError
from qsched.score import nss
from qsched.score._iqa import package_file, uint8_images

N_FEATURES = 36
#: Smallest height and width scored (the half-size image is then 8x8).
MIN_SIZE = 16
#: scikit-image's ``rgb2gray`` weights (ITU-R BT.709 luma), which the ``brisque`` package uses.
RGB_TO_GRAY = np.array([0.2125, 0.7154, 0.0721])
_OBJECT_OPCODES = frozenset({
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX",
    "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID",
})


@dataclass(frozen=True, eq=False)
class SVR:
    """An RBF-kernel support-vector regressor: ``sum_i coef_i exp(-gamma |x - sv_i|^2) - rho``."""

    gamma: float
    rho: float
    coefficients: np.ndarray
    support_vectors: np.ndarray

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predictions for ``features`` [N, F] (float64)."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        distances = ((x[:, None, :] - self.support_vectors[None]) ** 2).sum(-1)
        return np.exp(-self.gamma * distances) @ self.coefficients - self.rho


def read_libsvm_svr(path: Path, n_features: int = N_FEATURES) -> SVR:
    """Parse a libsvm text model of an epsilon/nu-SVR with an RBF kernel (1-based sparse ``index:value`` rows)."""
    lines = path.read_text().splitlines()
    header: dict[str, str] = {}
    for number, line in enumerate(lines):
        if line.strip() == "SV":
            rows = lines[number + 1 :]
            break
        key, _, value = line.partition(" ")
        header[key] = value.strip()
    else:
        raise QSchedError(f"{path} is not a libsvm model: no 'SV' line")
    if header.get("svm_type") not in ("epsilon_svr", "nu_svr") or header.get("kernel_type") != "rbf":
        raise QSchedError(
            f"{path} holds a {header.get('svm_type')} model with a {header.get('kernel_type')} kernel; "
            "BRISQUE needs an epsilon_svr or nu_svr with an rbf kernel"
        )
    try:
        gamma, rho, total = float(header["gamma"]), float(header["rho"]), int(header["total_sv"])
    except (KeyError, ValueError) as err:
        raise QSchedError(f"{path}: missing or bad header field ({err})") from None
    rows = [row for row in rows if row.strip()]
    if len(rows) != total:
        raise QSchedError(f"{path} announces {total} support vectors but holds {len(rows)}")
    coefficients = np.zeros(total)
    vectors = np.zeros((total, n_features))
    for i, row in enumerate(rows):
        first, *pairs = row.split()
        try:
            coefficients[i] = float(first)
            for pair in pairs:
                index, value = pair.split(":")
                vectors[i, int(index) - 1] = float(value)
        except (ValueError, IndexError):
            raise QSchedError(
                f"{path}: support vector {i + 1} is not 'coef index:value ...' with indices 1..{n_features}"
            ) from None
    return SVR(gamma=gamma, rho=rho, coefficients=coefficients, support_vectors=vectors)


def read_float_lists(path: Path, keys: Sequence[str], length: int) -> dict[str, np.ndarray]:
    """The float lists stored under ``keys`` of a pickled ``{key: [float, ...]}``, read from its opcodes.

    Nothing is unpickled: a pickle that builds any object (a class, a numpy array)
    is refused, so no code in the file can run.
    """
    values: dict[str, list[float]] = {}
    key: str | None = None
    for opcode, argument, _ in pickletools.genops(path.read_bytes()):
        if opcode.name in _OBJECT_OPCODES:
            raise QSchedError(f"{path} builds objects ({opcode.name}); expected a plain dict of float lists")
        if isinstance(argument, str) and "UNICODE" in opcode.name:
            key = argument
        elif opcode.name in ("BINFLOAT", "FLOAT"):
            if key is None:
                raise QSchedError(f"{path}: a float before any key; expected a dict of float lists")
            values.setdefault(key, []).append(float(argument))
    found = {k: len(v) for k, v in values.items()}
    if any(found.get(k) != length for k in keys):
        raise QSchedError(f"{path}: expected {length} floats under each of {list(keys)}, found {found}")
    return {k: np.array(values[k]) for k in keys}


def gray_image(picture: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 1|3] -> float64 [H, W] in [0, 1], as scikit-image's ``img_as_float`` + ``rgb2gray``.

    A grey picture goes through ``rgb2gray`` as its RGB repeat, as it must with the
    ``brisque`` package (current scikit-image refuses 2-D input): the weights do not sum
    to exactly 1 in float64, and in flat regions that rounding changes the features.
    """
    image = np.multiply(picture, 1.0 / 255, dtype=np.float64)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image @ RGB_TO_GRAY


def _scale_features(gray: np.ndarray, window: np.ndarray) -> list[float]:
    coefficients = nss.mscn(gray, window, 1.0 / 255)
    fit = nss.fit_aggd(coefficients, solver="root")
    features = [fit.alpha, (fit.left_std**2 + fit.right_std**2) / 2]
    for product in nss.paired_products(coefficients, wrap=False):
        fit = nss.fit_aggd(product, solver="root")
        features += [fit.alpha, fit.mean, fit.left_std**2, fit.right_std**2]
    return features


def brisque_features(gray: np.ndarray) -> np.ndarray:
    """The 36 BRISQUE features of a float64 grey image in [0, 1]: 18 at full size, 18 at half size."""
    window = nss.gaussian_kernel_2d(7, 7 / 6)
    return np.array(_scale_features(gray, window) + _scale_features(nss.half_size_cubic(gray), window))


class Brisque:
    """Scorer: ``-BRISQUE`` per image (higher is better). See the module docstring."""

    def __init__(self, svr: SVR, low: np.ndarray, high: np.ndarray) -> None:
        self.svr = svr
        self.low = low
        self.high = high

    def brisque(self, gray: np.ndarray) -> float:
        """The (lower-is-better) BRISQUE score of one grey image, as the ``brisque`` package computes it."""
        features = brisque_features(gray)
        scaled = -1.0 + 2.0 / (self.high - self.low) * (features - self.low)
        return float(self.svr.predict(scaled)[0])

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] = ()) -> torch.Tensor:
        pictures = uint8_images(images, "brisque")
        height, width = pictures.shape[1:3]
        if min(height, width) < MIN_SIZE:
            raise QSchedError(f"brisque needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, got {height}x{width}")
        return torch.tensor([-self.brisque(gray_image(p)) for p in pictures], dtype=torch.float64)


def brisque_factory() -> Brisque:
    """The ``brisque`` scorer, with the model of the installed ``brisque`` package."""
    svm = package_file("brisque", "brisque", "brisque", "models", "svm.txt")
    ranges = read_float_lists(package_file("brisque", "brisque", "brisque", "models", "normalize.pickle"),
                              ("min_", "max_"), N_FEATURES)
    if not bool((ranges["max_"] > ranges["min_"]).all()):
        raise QSchedError(f"{svm.parent / 'normalize.pickle'}: every max_ must exceed its min_")
    return Brisque(read_libsvm_svr(svm), ranges["min_"], ranges["max_"])
