"""The ``brisque`` scorer: golden values of the ``brisque`` package, ordering, parameter files, errors."""

from __future__ import annotations

import math

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from iqa_images import as_tensor, negated_scores, picture

from qsched.errors import QSchedError
from qsched.score import build_scorer, check_scores, scorer_info, scorer_names
from qsched.score import brisque as B

# BRISQUE of the ``brisque`` package 0.2.0 itself (BRISQUE(url=False).score on the RGB picture;
# OpenCV 5.0.0, scikit-image 0.26.0, numpy 2.3.5, scipy 1.17.1, libsvm-official 3.37.0), made in a
# scratch venv (recipe in the script's docstring) by
#     python benchmarks/iqa_reference.py reference --set tests --out /tmp/iqa_ref_tests.json
# spec (tests/iqa_images.py): (CRC-32 of the picture, BRISQUE, lower is better).
GOLDEN = {
    "coffee/4": (3793048530, 9.980920017293187),
    "coffee/4+blur1": (4071034036, 41.20559635772301),
    "coffee/4+blur2": (3262083303, 64.6869779667746),
    "coffee/4+noise10": (1481549460, 18.498763200229263),
    "camera/4": (1770691173, 5.642845693953262),  # grey: the package gets its RGB repeat
    "camera/4+blur1": (2148233348, 27.66752503974007),
    "camera/4+blur2": (1632562540, 64.90636960372328),
    "camera/4+noise10": (822762537, 48.202499328379616),
    "astronaut/4": (3061445938, 25.819248589080274),
    "astronaut/4+noise10": (1436552986, 18.3545599173643),  # mild noise at 128 px scores *better*
    "chelsea/2+crop97x131": (1010327589, 18.307717364390754),  # odd sizes: OpenCV's half size rounds
}
# Measured: these 11 agree to 3.3e-11, and with 36 full-size ones (clean, blur, noise, JPEG) to
# 3.9e-11 (`compare` mode of the same script); the tolerance leaves room only for summation order.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def scorer() -> B.Brisque:
    return build_scorer("brisque")


@pytest.fixture(scope="module")
def scores(scorer: B.Brisque) -> dict[str, float]:
    """qsched's BRISQUE (the scorer's value negated back) of each golden picture."""
    return negated_scores(scorer, GOLDEN)


def test_scores_equal_the_brisque_package(scores: dict[str, float]) -> None:
    for spec, (_, reference) in GOLDEN.items():
        assert scores[spec] == pytest.approx(reference, abs=TOLERANCE), spec


def test_blur_and_noise_score_worse(scores: dict[str, float]) -> None:
    for photo in ("coffee/4", "camera/4"):
        quality = {k.removeprefix(photo): -v for k, v in scores.items() if k.startswith(photo)}
        assert quality[""] > quality["+blur1"] > quality["+blur2"], photo
        assert quality[""] > quality["+noise10"], photo


def test_grey_images_score_like_their_rgb_repeat(scorer: B.Brisque) -> None:
    grey = as_tensor(picture("camera/4"))[..., :40, :48]
    assert torch.equal(scorer(grey, [""]), scorer(grey.expand(-1, 3, -1, -1), [""]))


def test_registry_builds_it_and_check_scores_accepts_it() -> None:
    assert "brisque" in scorer_names() and scorer_info("brisque").kind == "quality"
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = build_scorer("brisque")(images, ["a", "b"])
    assert check_scores("brisque", scores, 2).shape == (2,)
    with pytest.raises(QSchedError, match="has no option\\(s\\) path; allowed: none"):
        build_scorer("brisque", path="/x")


def test_jaq_uses_it_as_its_quality_term() -> None:
    from qsched.score.jaq import JAQ

    evaluator = JAQ(quality="brisque", k=0.01).build()
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    alignment, quality = evaluator.scores(images, ["a coat", "a bag"])
    assert torch.equal(quality, build_scorer("brisque")(images, [""] * 2))
    assert evaluator(images, ["a coat", "a bag"]).value == pytest.approx(
        math.log(float(alignment.mean())) + 0.01 * float(quality.mean()))


def test_a_flat_black_image_has_no_score_and_fails_the_candidate(scorer: B.Brisque) -> None:
    scores = scorer(torch.zeros(1, 3, 32, 32), [""])  # all MSCN coefficients are 0: no AGGD to fit
    with pytest.raises(QSchedError, match="non-finite"):
        check_scores("brisque", scores, 1)


def test_bad_images_are_refused(scorer: B.Brisque) -> None:
    with pytest.raises(QSchedError, match=r"needs images as a tensor \[N, 1 or 3, H, W\] in \[0, 1\], got \(3, 32, 32\)"):
        scorer(torch.rand(3, 32, 32), [""])
    with pytest.raises(QSchedError, match=r"got \(1, 2, 32, 32\)"):
        scorer(torch.rand(1, 2, 32, 32), [""])
    with pytest.raises(QSchedError, match="brisque needs images of at least 16x16 pixels, got 12x40"):
        scorer(torch.rand(1, 3, 12, 40), [""])


def test_a_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "brisque" else find_spec(name, *a))
    with pytest.raises(QSchedError, match="scorer 'brisque' reads its parameters from the PyPI package brisque, "
                                          "which is not installed: pip install brisque"):
        build_scorer("brisque")


def test_libsvm_text_is_parsed_and_predicts(tmp_path: Path) -> None:
    model = tmp_path / "svm.txt"
    model.write_text("svm_type epsilon_svr\nkernel_type rbf\ngamma 0.5\nnr_class 2\ntotal_sv 2\nrho 0.25\n"
                     "SV\n2 1:1 3:-1\n-1 2:0.5\n")
    svr = B.read_libsvm_svr(model, n_features=3)
    x = np.array([0.5, 0.0, -1.0])
    expected = 2 * np.exp(-0.5 * 0.25) - np.exp(-0.5 * (0.25 + 0.25 + 1.0)) - 0.25
    assert svr.predict(x)[0] == pytest.approx(expected)
    model.write_text(model.read_text().replace("total_sv 2", "total_sv 3"))
    with pytest.raises(QSchedError, match="announces 3 support vectors but holds 2"):
        B.read_libsvm_svr(model, n_features=3)
    model.write_text(model.read_text().replace("kernel_type rbf", "kernel_type linear"))
    with pytest.raises(QSchedError, match="linear kernel"):
        B.read_libsvm_svr(model, n_features=3)


def test_feature_ranges_are_read_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "normalize.pickle"
    path.write_bytes(pickle.dumps({"min_": [0.0, 1.5], "max_": [2.0, 3.5]}))
    ranges = B.read_float_lists(path, ("min_", "max_"), 2)
    assert ranges["min_"].tolist() == [0.0, 1.5] and ranges["max_"].tolist() == [2.0, 3.5]
    expected = r"expected 3 floats under each of \['min_', 'max_'\], found \{'min_': 2, 'max_': 2\}"
    with pytest.raises(QSchedError, match=expected):
        B.read_float_lists(path, ("min_", "max_"), 3)
    path.write_bytes(pickle.dumps({"min_": np.zeros(2), "max_": np.ones(2)}))
    with pytest.raises(QSchedError, match="builds objects"):
        B.read_float_lists(path, ("min_", "max_"), 2)
