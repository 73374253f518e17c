"""The design of a study, as pure functions: questions, sides, assignment, gold questions.

* A **comparison** question is (configuration pair, prompt index): the two images of
  the same prompt and seed. Every pair is asked on every prompt.
* A **gold** question shows an image beside a visibly defective copy of itself (see
  :mod:`qsched.study.gold`); its right answer is known, so it measures attention.
* **Sides** are a function of (annotator, question, the study's secret): random to the
  annotator, but the same on every request and every server process, so the server
  never trusts the client about what was shown.
* **Assignment** gives an annotator the unanswered comparison with the fewest votes so
  far, ties broken by the fewest votes of its pair, then of its prompt, then by an
  order private to the annotator (annotators working at once get different questions).
  Every ``gold_every``-th question is a gold one while any is left.
"""

from __future__ import annotations

import hashlib
import itertools
import zlib
from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

from qsched.errors import QSchedError

ANSWERS: tuple[str, ...] = ("left", "right", "tie")
#: The name stored for the defective side of a gold question.
DEFECT = "defect"


@dataclass(frozen=True)
class Question:
    """One question: configuration ``a`` vs ``b`` on prompt ``index`` (gold: ``b`` is the defect)."""

    id: str
    number: int
    index: int
    a: str
    b: str
    gold: bool = False

    @property
    def pair(self) -> tuple[str, str]:
        return (self.a, self.b)


@dataclass(frozen=True)
class StudyDesign:
    """All questions of a study and how they are handed out."""

    configs: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    questions: tuple[Question, ...]
    per_annotator: int
    gold_every: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {q.id: q for q in self.questions})

    def question(self, question_id: str) -> Question | None:
        return self._by_id.get(question_id)  # type: ignore[attr-defined]

    @property
    def comparisons(self) -> tuple[Question, ...]:
        return tuple(q for q in self.questions if not q.gold)

    @property
    def golds(self) -> tuple[Question, ...]:
        return tuple(q for q in self.questions if q.gold)


def parse_pairs(text: str | None, configs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``"A:B,C:D"`` -> pairs (each configuration known, no self-pair, no repeats); ``None`` -> all pairs."""
    if text is None or not text.strip():
        return tuple(itertools.combinations(configs, 2))
    pairs: list[tuple[str, str]] = []
    for item in text.split(","):
        parts = [p.strip() for p in item.split(":")]
        if len(parts) != 2 or not all(parts):
            raise QSchedError(f"pair {item!r} is not A:B; give e.g. --pairs fp:w4a8,w4a8:w4a8+qsched")
        unknown = [p for p in parts if p not in configs]
        if unknown:
            raise QSchedError(f"unknown configuration {unknown[0]!r} in --pairs; the evaluation has {', '.join(configs)}")
        if parts[0] == parts[1]:
            raise QSchedError(f"pair {item!r} compares a configuration with itself")
        if {tuple(parts), tuple(reversed(parts))} & set(pairs):
            raise QSchedError(f"pair {item!r} is given twice")
        pairs.append((parts[0], parts[1]))
    return tuple(pairs)


def gold_indices(num_prompts: int, count: int) -> tuple[int, ...]:
    """``count`` prompt indices spread evenly over ``num_prompts`` (the gold questions' images)."""
    count = min(count, num_prompts)
    return tuple(sorted({(2 * k + 1) * num_prompts // (2 * count) for k in range(count)})) if count else ()


def build_design(configs: Sequence[str], num_prompts: int, *, pairs: Sequence[tuple[str, str]] | None = None,
                 gold: int = 8, gold_every: int = 10, per_annotator: int = 50) -> StudyDesign:
    """Every pair on every prompt, plus ``gold`` gold questions (cycling through the configurations)."""
    if num_prompts < 1:
        raise QSchedError("the evaluation has no images")
    if per_annotator < 1 or gold < 0 or gold_every < 2:
        raise QSchedError(f"per-annotator must be >= 1, gold >= 0 and gold-every >= 2; got {per_annotator}, {gold}, {gold_every}")
    pairs = tuple(pairs) if pairs is not None else tuple(itertools.combinations(configs, 2))
    questions = [Question(f"q{p}-{i}", p * num_prompts + i, i, a, b)
                 for p, (a, b) in enumerate(pairs) for i in range(num_prompts)]
    for k, index in enumerate(gold_indices(num_prompts, gold)):
        questions.append(Question(f"g{k}", len(questions), index, configs[k % len(configs)], DEFECT, gold=True))
    return StudyDesign(tuple(configs), pairs, tuple(questions), per_annotator, gold_every)


def annotator_seed(annotator: str) -> int:
    return zlib.crc32(annotator.encode("utf-8"))


def _private_order(seed: int, number: int) -> int:
    """A cheap per-annotator shuffle of question numbers (a multiplicative hash)."""
    return ((number + 1) * 0x9E3779B1 ^ seed) * 0x85EBCA6B & 0xFFFFFFFF


def swapped(annotator: str, question_id: str, secret: str) -> bool:
    """Whether configuration ``b`` is shown on the left for this annotator and question."""
    return hashlib.sha256(f"{secret}\x00{annotator}\x00{question_id}".encode()).digest()[0] & 1 == 1


def sides(question: Question, annotator: str, secret: str) -> tuple[str, str]:
    """(left, right) configuration names as shown to ``annotator``."""
    return (question.b, question.a) if swapped(annotator, question.id, secret) else (question.a, question.b)


def winner(answer: str, left: str, right: str) -> str | None:
    """The configuration chosen by ``answer`` (``None`` for a tie)."""
    return {"left": left, "right": right, "tie": None}[answer]


def is_gold_turn(position: int, gold_every: int) -> bool:
    """Gold questions come at positions gold_every//2, that + gold_every, ... (0-based)."""
    return position % gold_every == gold_every // 2


def next_question(design: StudyDesign, *, annotator: str, answered: Collection[str],
                  counts: Mapping[str, int]) -> Question | None:
    """The question to show ``annotator`` next, or ``None`` when their share is done.

    ``answered``: ids this annotator has answered; ``counts``: votes per question id so far
    (all annotators; may lag a little behind when several processes serve a study).
    """
    position = len(answered)
    if position >= design.per_annotator:
        return None
    seed = annotator_seed(annotator)
    if is_gold_turn(position, design.gold_every):
        open_gold = [q for q in design.golds if q.id not in answered]
        if open_gold:
            return min(open_gold, key=lambda q: (counts.get(q.id, 0), _private_order(seed, q.number)))
    pair_votes: dict[tuple[str, str], int] = {}
    prompt_votes: dict[int, int] = {}
    for q in design.comparisons:
        n = counts.get(q.id, 0)
        pair_votes[q.pair] = pair_votes.get(q.pair, 0) + n
        prompt_votes[q.index] = prompt_votes.get(q.index, 0) + n
    open_ = [q for q in design.comparisons if q.id not in answered]
    if not open_:
        return None
    return min(open_, key=lambda q: (counts.get(q.id, 0), pair_votes[q.pair], prompt_votes[q.index],
                                     _private_order(seed, q.number)))


def is_correct(question: Question, winner_config: str | None) -> bool | None:
    """For a gold question: whether the real image (not the defect) was chosen; ``None`` otherwise."""
    return (winner_config == question.a) if question.gold else None
