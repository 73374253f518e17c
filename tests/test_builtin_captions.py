from __future__ import annotations

import re

import pytest

from qsched.builtin import captions as cap


def _prompt_sets() -> dict[str, set[str]]:
    return {
        "training": {p for p, _ in cap.training_captions()},
        "evaluation": {p for p, _ in cap.evaluation_prompts()},
        "calibration": set(cap.calibration_prompts()),
        "validation": {p for p, _ in cap.validation_prompts()},
    }


def test_template_sets_are_pairwise_disjoint():
    sets = {"train": cap.TRAIN_TEMPLATES, "evaluation": cap.HELDOUT_TEMPLATES, "calibration": cap.CALIBRATION_TEMPLATES,
            "validation": cap.VALIDATION_TEMPLATES}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(sets[a]) & set(sets[b]), (a, b)


@pytest.mark.parametrize("a, b", [("training", "evaluation"), ("training", "calibration"), ("evaluation", "calibration"),
                                  ("validation", "training"), ("validation", "evaluation"),
                                  ("validation", "calibration")])
def test_prompt_sets_share_no_prompt(a, b):
    sets = _prompt_sets()
    assert not sets[a] & sets[b], sorted(sets[a] & sets[b])[:5]


def test_packaged_files_share_no_prompt():
    """The files the CLI reads, not only the functions: any overlap fails."""
    calibration = set(cap.CALIBRATION_FILE.read_text().splitlines())
    evaluation = set(cap.EVALUATION_FILE.read_text().splitlines())
    assert len(calibration) == 16 and not calibration & evaluation
    assert not calibration & _prompt_sets()["training"]


def test_the_overlap_check_catches_a_shared_prompt(monkeypatch):
    """Guard the guard: a calibration template that is also an evaluation template makes the sets overlap."""
    monkeypatch.setattr(cap, "CALIBRATION_TEMPLATES", cap.HELDOUT_TEMPLATES[:3])
    assert _prompt_sets()["calibration"] & _prompt_sets()["evaluation"]


@pytest.mark.parametrize("templates", ["CALIBRATION_TEMPLATES", "VALIDATION_TEMPLATES"])
def test_templates_use_only_words_the_builtin_clip_knows(templates):
    from qsched.builtin.clip import vocabulary_words

    words = set(vocabulary_words())
    assert {w for t in getattr(cap, templates) for w in re.findall(r"[a-z]+", t)} <= words


def test_every_class_covered_and_balanced():
    labels = [label for _, label in cap.training_captions()]
    assert set(labels) == set(range(len(cap.CLASS_NAMES)))
    ev = cap.evaluation_prompts(per_class=30)
    counts = [sum(1 for _, lab in ev if lab == c) for c in range(10)]
    assert counts == [30] * 10
    calibration = cap.calibration_prompts()
    assert len(calibration) == len(set(calibration)) == 16
    va = cap.validation_prompts(per_class=30)
    assert [sum(1 for _, lab in va if lab == c) for c in range(10)] == [30] * 10
    assert len({p for p, _ in va}) == 120  # 10 classes x 3 templates x 4 phrases, each one used
    assert all(any(p.endswith(phrase) for phrase in cap.CLASS_PHRASES[lab]) for p, lab in va)
    assert len({p for p, _ in ev}) > 100  # varied phrasings


def test_packaged_prompt_files_match():
    assert cap.CALIBRATION_FILE.read_text().splitlines() == cap.calibration_prompts()
    assert cap.EVALUATION_FILE.read_text().splitlines() == [p for p, _ in cap.evaluation_prompts()]
    names = cap.EVALUATION_LABELS_FILE.read_text().splitlines()
    assert names == [cap.CLASS_NAMES[lab] for _, lab in cap.evaluation_prompts()]
