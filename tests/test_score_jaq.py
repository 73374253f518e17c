"""JAQ: the reference criteria by hand, the per-image variant, z-normalisation, validation, card form."""

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


def test_default_is_the_reference_criterion_new_with_k_2() -> None:
    jaq = JAQ()
    assert (jaq.criterion, jaq.alignment, jaq.quality, jaq.transform, jaq.normalize, jaq.k) == (
        "new", "clip", "clipiqa", "log", "none", 2.0)
    assert jaq.formula == "log(mean(clip)) + 2 * mean(clipiqa)"
    assert jaq.options("alignment") == {"clamp": False}  # torchmetrics clamps the set's mean, not each image
    assert JAQ(criterion="new", alignment="clip", quality="clipiqa", k=2, transform="log") == jaq


def test_new_is_the_log_of_the_sets_clip_score_plus_k_mean_quality_by_hand() -> None:
    """The reference (qsched_optimize.py, criterion new): log(CLIPScore over the set) + k * mean CLIP-IQA.

    torchmetrics' CLIPScore over a set is max(mean_i 100 * cos_i, 0): the mean of the
    unclamped per-image scores, clamped once. Per-image 100*cos: 30, 10, -5 (one image
    points away from its prompt); CLIP-IQA 0.6, 0.2, 0.7.
    """
    clip_100cos = torch.tensor([30.0, 10.0, -5.0], dtype=torch.float64)
    clipiqa = torch.tensor([0.6, 0.2, 0.7], dtype=torch.float64)
    set_score = (30.0 + 10.0 - 5.0) / 3  # 11.666..., no per-image clamp, no floor
    expected = math.log(set_score) + 2.0 * (0.6 + 0.2 + 0.7) / 3
    result = JAQ().evaluate(clip_100cos, clipiqa)
    assert result.value == pytest.approx(expected, abs=1e-12)
    assert result.value == pytest.approx(2.456735772821304 + 1.0, abs=1e-12)
    assert (result.alignment_term, result.quality_term) == pytest.approx((math.log(set_score), 0.5))
    assert result.per_image is None  # the log of a mean is no mean of per-image values
    # not today's-before definition: the mean of per-image log(max(a, 1)) differs
    per_image = (math.log(30.0) + math.log(10.0) + 0.0) / 3 + 2.0 * 0.5
    assert abs(result.value - per_image) > 0.5
    with pytest.raises(QSchedError, match="the calibration set's clip score is 0: its log is undefined"):
        JAQ().evaluate(torch.tensor([5.0, -7.0]), torch.tensor([0.5, 0.5]))


def test_new_without_log_is_the_mean_alignment_plus_k_mean_quality() -> None:
    result = JAQ(transform="none", k=0.5).evaluate(torch.tensor([4.0, 8.0]), torch.tensor([0.2, 0.4]))
    assert result.value == pytest.approx(6.0 + 0.5 * 0.3)
    assert JAQ(transform="none").options("alignment") == {}  # only the log of the set's CLIP score unclamps


def test_kclip2_is_the_mean_quality_map_plus_k_mean_hpsv2_by_hand() -> None:
    """The reference's kclip2: aqmap_mean + k * hpv2_mean, k = 2 (k weighs HPSv2, not the quality map)."""
    jaq = JAQ(criterion="kclip2", quality="test-std", alignment_options={"checkpoint": "/x.pt"})
    assert (jaq.alignment, jaq.k, jaq.transform) == ("hpsv2", 2.0, "none")
    assert jaq.formula == "mean(test-std) + 2 * mean(hpsv2)"
    hps = torch.tensor([0.25, 0.27, 0.30], dtype=torch.float64)
    quality_map = torch.tensor([0.9, 0.5, 0.4], dtype=torch.float64)
    result = jaq.evaluate(hps, quality_map)
    assert result.value == pytest.approx((0.9 + 0.5 + 0.4) / 3 + 2 * (0.25 + 0.27 + 0.30) / 3, abs=1e-12)
    assert result.value == pytest.approx(0.6 + 2 * 0.82 / 3, abs=1e-12)


def test_kclip2_names_what_is_missing() -> None:
    with pytest.raises(QSchedError, match=r"the reference's quality map \(Q-Refine's AQ-Map .* name the quality scorer"):
        JAQ(criterion="kclip2")
    with pytest.raises(QSchedError, match="transform must be 'none'"):
        JAQ(criterion="kclip2", quality="clipiqa", transform="log")
    with pytest.raises(QSchedError, match=r"scorer 'hpsv2' needs an HPSv2 checkpoint file"):
        JAQ(criterion="kclip2", quality="clipiqa").build()


def test_per_image_keeps_the_earlier_definition_golden_values() -> None:
    jaq = JAQ(criterion="per-image", k=0.5)
    assert (jaq.k, jaq.transform, jaq.options("alignment")) == (0.5, "log", {})
    assert JAQ(criterion="per-image").k == 1.0
    assert jaq.formula == "mean(log(max(clip, 1)) + 0.5 * clipiqa)"
    result = jaq.evaluate(torch.tensor([10.0, 0.5]), torch.tensor([0.2, 0.4]))
    assert result.per_image.tolist() == pytest.approx([math.log(10.0) + 0.1, 0.0 + 0.2])
    assert result.value == pytest.approx((math.log(10.0) + 0.3) / 2)
    assert result.summary()["alignment"] == pytest.approx(5.25)


def test_a_definition_recorded_without_criterion_is_the_per_image_one() -> None:
    """Cards and studies made before criteria existed recorded the per-image JAQ; they read back as it."""
    old = {"name": "JAQ", "formula": "log(max(clip, 1)) + 1 * clipiqa", "alignment": "clip", "quality": "clipiqa",
           "k": 1.0, "transform": "log", "log_floor": 1.0, "normalize": "none", "alignment_options": {},
           "quality_options": {}, "aggregate": "mean over calibration images"}
    jaq = JAQ.from_dict(old)
    assert (jaq.criterion, jaq.k, jaq.formula) == ("per-image", 1.0, "mean(log(max(clip, 1)) + 1 * clipiqa)")
    assert JAQ.from_dict(JAQ().to_dict()) == JAQ()


def test_an_old_card_still_loads_and_says_how_it_was_made(tmp_path) -> None:
    from qsched.card import ScheduleCard
    from qsched.schedule import QSchedCoefficients

    old_objective = {"name": "JAQ", "formula": "log(max(clip, 1)) + 1 * clipiqa", "alignment": "clip",
                     "quality": "clipiqa", "k": 1.0, "transform": "log", "log_floor": 1.0, "normalize": "none",
                     "alignment_options": {}, "quality_options": {}, "value": 3.2283, "baseline_value": 3.1554}
    card = ScheduleCard(coefficients=QSchedCoefficients.from_ramps(cx_start=0.8, ceps_start=1.2, num_steps=4),
                        model="builtin", family="lcm", quant={"name": "w4a8"}, steps=4, objective=old_objective)
    loaded = ScheduleCard.load(card.save(tmp_path / "card.json"))
    assert JAQ.from_dict(loaded.objective).criterion == "per-image"
    new = JAQ().to_dict()
    assert (new["criterion"], new["formula"]) == ("new", "log(mean(clip)) + 2 * mean(clipiqa)")


def test_zscore_uses_the_baselines_spread_and_makes_the_baseline_zero() -> None:
    jaq = JAQ(criterion="per-image", alignment="test-mean", quality="test-std", transform="none", normalize="zscore", k=2.0)
    a0, q0 = torch.tensor([1.0, 3.0]), torch.tensor([0.1, 0.3])
    ref = jaq.reference(a0, q0)
    assert (ref.alignment_mean, ref.alignment_std, ref.quality_std) == pytest.approx((2.0, 1.0, 0.1))
    assert jaq.evaluate(a0, q0, reference=ref).value == pytest.approx(0.0)
    assert jaq.evaluate(torch.tensor([3.0, 3.0]), torch.tensor([0.3, 0.3]), reference=ref).value == pytest.approx(1.0 + 2 * 1.0)
    with pytest.raises(QSchedError, match="no spread"):
        jaq.reference(torch.tensor([1.0, 1.0]), q0)
    with pytest.raises(QSchedError, match="needs the baseline"):
        jaq.evaluate(a0, q0)
    with pytest.raises(QSchedError, match="normalisation 'zscore' needs per-image terms: use criterion 'per-image'"):
        JAQ(normalize="zscore")


@pytest.mark.parametrize("kwargs, message", [
    ({"alignment": "nope"}, "unknown scorer 'nope'"),
    ({"quality": "nope"}, "unknown scorer 'nope'"),
    ({"k": -1}, "k must be a finite number >= 0"),
    ({"k": float("nan")}, "k must be a finite number"),
    ({"transform": "sqrt"}, "unknown alignment transform 'sqrt'"),
    ({"normalize": "minmax"}, "unknown normalisation 'minmax'"),
    ({"criterion": "old"}, "unknown JAQ criterion 'old'; allowed: new, kclip2, per-image"),
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
    result = JAQ(criterion="per-image", alignment="test-mean", quality="test-std", transform="none", k=1.0).build()(
        images, ["a", "b"])
    assert result.per_image.tolist() == pytest.approx([0.25, 0.5 + float(images[1].std())])
    result = JAQ(alignment="test-mean", quality="test-std", transform="none", k=1.0).build()(images, ["a", "b"])
    assert result.value == pytest.approx((0.25 + 0.5) / 2 + (0.0 + float(images[1].std())) / 2)
    with pytest.raises(QSchedError, match="'test-nan' returned non-finite"):
        JAQ(alignment="test-mean", quality="test-nan").build()(images, ["a", "b"])
