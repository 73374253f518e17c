"""Study design: pairs, questions, sides, balanced assignment, gold turns (pure functions)."""

from __future__ import annotations

from collections import Counter

import pytest

from qsched.errors import QSchedError
from qsched.study import design as D

CONFIGS = ("fp", "w4a8", "w4a8+qsched")


def test_parse_pairs_defaults_to_every_pair_and_validates() -> None:
    assert D.parse_pairs(None, CONFIGS) == (("fp", "w4a8"), ("fp", "w4a8+qsched"), ("w4a8", "w4a8+qsched"))
    assert D.parse_pairs("w4a8:w4a8+qsched, fp:w4a8", CONFIGS) == (("w4a8", "w4a8+qsched"), ("fp", "w4a8"))
    for text, message in [("fp", "is not A:B"), ("fp:w4a4", "unknown configuration 'w4a4'"),
                          ("fp:fp", "with itself"), ("fp:w4a8,w4a8:fp", "given twice")]:
        with pytest.raises(QSchedError, match=message):
            D.parse_pairs(text, CONFIGS)


def test_design_has_every_pair_on_every_prompt_and_spread_gold() -> None:
    design = D.build_design(CONFIGS, 10, gold=4, gold_every=5, per_annotator=20)
    assert len(design.comparisons) == 3 * 10 and len({q.id for q in design.questions}) == len(design.questions)
    assert Counter(q.pair for q in design.comparisons) == {p: 10 for p in design.pairs}
    assert [q.index for q in design.golds] == [1, 3, 6, 8] == list(D.gold_indices(10, 4))
    assert [q.a for q in design.golds] == ["fp", "w4a8", "w4a8+qsched", "fp"]  # cycles through the configurations
    assert all(q.b == D.DEFECT for q in design.golds)
    assert design.question("q1-7") == D.Question("q1-7", 17, 7, "fp", "w4a8+qsched")
    assert design.question("nope") is None
    assert D.gold_indices(3, 8) == (0, 1, 2)  # at most one per prompt


def test_sides_are_stable_per_annotator_and_random_across_them() -> None:
    question = D.Question("q0-0", 0, 0, "fp", "w4a8")
    assert D.sides(question, "alice", "s") == D.sides(question, "alice", "s")  # the same on every request
    left_fp = sum(D.sides(question, f"a{k}", "s")[0] == "fp" for k in range(400))
    assert 160 < left_fp < 240  # about half
    assert set(D.sides(question, "alice", "s")) == {"fp", "w4a8"}


def test_winner_and_gold_correctness() -> None:
    assert D.winner("left", "fp", "w4a8") == "fp" and D.winner("right", "fp", "w4a8") == "w4a8"
    assert D.winner("tie", "fp", "w4a8") is None
    gold = D.Question("g0", 9, 3, "fp", D.DEFECT, gold=True)
    assert D.is_correct(gold, "fp") is True and D.is_correct(gold, D.DEFECT) is False and D.is_correct(gold, None) is False
    assert D.is_correct(D.Question("q0-0", 0, 0, "fp", "w4a8"), "fp") is None


def run_annotators(design: D.StudyDesign, names: list[str]) -> tuple[Counter[str], dict[str, list[D.Question]]]:
    """Annotators taking turns, one question each, until all are done."""
    counts: Counter[str] = Counter()
    seen: dict[str, list[D.Question]] = {n: [] for n in names}
    active = list(names)
    while active:
        for name in list(active):
            q = D.next_question(design, annotator=name, answered={x.id for x in seen[name]}, counts=counts)
            if q is None:
                active.remove(name)
                continue
            seen[name].append(q)
            counts[q.id] += 1
    return counts, seen


def test_assignment_is_balanced_never_repeats_and_stops_at_the_share() -> None:
    design = D.build_design(CONFIGS, 8, gold=2, gold_every=5, per_annotator=12)
    counts, seen = run_annotators(design, [f"a{k}" for k in range(10)])
    for name, questions in seen.items():
        assert len(questions) == 12 and len({q.id for q in questions}) == 12  # its share, never twice
        assert [k for k, q in enumerate(questions) if q.gold] == [2, 7]  # gold at positions 2 and 7 (every 5th)
    comparison = [counts[q.id] for q in design.comparisons]
    assert sum(comparison) == 10 * 10 and max(comparison) - min(comparison) <= 1  # 100 votes over 24 questions
    per_pair = Counter()
    per_prompt = Counter()
    for q in design.comparisons:
        per_pair[q.pair] += counts[q.id]
        per_prompt[q.index] += counts[q.id]
    assert max(per_pair.values()) - min(per_pair.values()) <= 1
    assert max(per_prompt.values()) - min(per_prompt.values()) <= 3
    assert all(counts[q.id] == 10 for q in design.golds)


def test_annotators_at_the_same_moment_get_different_questions() -> None:
    design = D.build_design(CONFIGS, 20, gold=0, per_annotator=5)
    first = {D.next_question(design, annotator=f"a{k}", answered=set(), counts={}).id for k in range(10)}
    assert len(first) >= 8


def test_an_annotator_with_every_question_answered_is_done() -> None:
    design = D.build_design(("a", "b"), 2, gold=1, gold_every=2, per_annotator=50)
    _, seen = run_annotators(design, ["x"])
    assert len(seen["x"]) == len(design.questions) == 3
    with pytest.raises(QSchedError, match="per-annotator must be >= 1"):
        D.build_design(("a", "b"), 2, per_annotator=0)
