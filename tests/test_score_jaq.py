"""JAQ: golden values, z-normalisation against the baseline, validation, card form."""

from __future__ import annotations

import math

import pytest
import torch

from qsched.errors import QSchedError
from qsched.score import register_scorer
from qsched.score.jaq import JAQ

register_scorer("test-mean", lambda **_: (lambda images, prompts: images.mean((1, 2, 3))), kind="alignment", replace=True)
register_scorer("test-std", lambda **_: (lambda images, prompts: images.std((1, 2, 3))), replace=True)
register_scorer("test-nan", lambda **_: (lambda images, prompts: torch.full((images.shape[0],), float("nan"))), replace=True)


def test_default_is_the_papers_log_clip_plus_k_clipiqa() -> None:
    jaq = JAQ()
    assert (jaq.alignment, jaq.quality, jaq.transform, jaq.normalize, jaq.k) == ("clip", "clipiqa", "log", "none", 1.0)
    assert jaq.formula == "log(max(clip, 1)) + 1 * clipiqa"


def test_golden_values_with_log_transform_and_floor() -> None:
    result = JAQ(k=0.5).evaluate(torch.tensor([10.0, 0.5]), torch.tensor([0.2, 0.4]))
    assert result.per_image.tolist() == pytest.approx([math.log(10.0) + 0.1, 0.0 + 0.2])
    assert result.value == pytest.approx((math.log(10.0) + 0.3) / 2)
    assert result.summary()["alignment"] == pytest.approx(5.25)


def test_zscore_uses_the_baselines_spread_and_makes_the_baseline_zero() -> None:
    jaq = JAQ(alignment="test-mean", quality="test-std", transform="none", normalize="zscore", k=2.0)
    a0, q0 = torch.tensor([1.0, 3.0]), torch.tensor([0.1, 0.3])
    ref = jaq.reference(a0, q0)
    assert (ref.alignment_mean, ref.alignment_std, ref.quality_std) == pytest.approx((2.0, 1.0, 0.1))
    assert jaq.evaluate(a0, q0, reference=ref).value == pytest.approx(0.0)
    assert jaq.evaluate(torch.tensor([3.0, 3.0]), torch.tensor([0.3, 0.3]), reference=ref).value == pytest.approx(1.0 + 2 * 1.0)
    with pytest.raises(QSchedError, match="no spread"):
        jaq.reference(torch.tensor([1.0, 1.0]), q0)
    with pytest.raises(QSchedError, match="needs the baseline"):
        jaq.evaluate(a0, q0)


@pytest.mark.parametrize("kwargs, message", [
    ({"alignment": "nope"}, "unknown scorer 'nope'"),
    ({"quality": "nope"}, "unknown scorer 'nope'"),
    ({"k": -1}, "k must be a finite number >= 0"),
    ({"k": float("nan")}, "k must be a finite number"),
    ({"transform": "sqrt"}, "unknown alignment transform 'sqrt'"),
    ({"normalize": "minmax"}, "unknown normalisation 'minmax'"),
])
def test_bad_definitions_are_refused(kwargs, message) -> None:
    with pytest.raises(QSchedError, match=message):
        JAQ(**kwargs)


def test_to_dict_round_trips_and_the_definition_is_hashable() -> None:
    jaq = JAQ(k=0.25, quality_options={"prompts": [["a good photo", "a bad photo"]], "path": "/x"})
    data = jaq.to_dict()
    assert data["quality_options"] == {"path": "/x", "prompts": [["a good photo", "a bad photo"]]}
    assert JAQ.from_dict(data) == jaq and hash(JAQ.from_dict(data)) == hash(jaq)


def test_evaluator_scores_images_and_refuses_nan() -> None:
    images = torch.stack([torch.full((3, 4, 4), 0.25), torch.linspace(0, 1, 48).reshape(3, 4, 4)])
    result = JAQ(alignment="test-mean", quality="test-std", transform="none", k=1.0).build()(images, ["a", "b"])
    assert result.per_image.tolist() == pytest.approx([0.25, 0.5 + float(images[1].std())])
    with pytest.raises(QSchedError, match="'test-nan' returned non-finite"):
        JAQ(alignment="test-mean", quality="test-nan").build()(images, ["a", "b"])
