from __future__ import annotations

from qsched.builtin import captions as cap


def test_heldout_templates_disjoint():
    assert not set(cap.TRAIN_TEMPLATES) & set(cap.HELDOUT_TEMPLATES)
    train = {p for p, _ in cap.training_captions()}
    assert not train & {p for p, _ in cap.evaluation_prompts()}
    assert not train & set(cap.calibration_prompts())


def test_every_class_covered_and_balanced():
    labels = [label for _, label in cap.training_captions()]
    assert set(labels) == set(range(len(cap.CLASS_NAMES)))
    ev = cap.evaluation_prompts(per_class=30)
    counts = [sum(1 for _, lab in ev if lab == c) for c in range(10)]
    assert counts == [30] * 10
    assert len(cap.calibration_prompts()) == 16
    assert len({p for p, _ in ev}) > 100  # varied phrasings


def test_packaged_prompt_files_match():
    assert cap.CALIBRATION_FILE.read_text().splitlines() == cap.calibration_prompts()
    assert cap.EVALUATION_FILE.read_text().splitlines() == [p for p, _ in cap.evaluation_prompts()]
    names = cap.EVALUATION_LABELS_FILE.read_text().splitlines()
    assert names == [cap.CLASS_NAMES[lab] for _, lab in cap.evaluation_prompts()]
