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

import numpy as np

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
        # Look-up tables for assignment (a study may hold thousands of questions; /api/next runs per question).
        pair_number = {p: k for k, p in enumerate(self.pairs)}
        tables = {
            "_by_id": {q.id: q for q in self.questions},
            "_position": {q.id: k for k, q in enumerate(self.questions)},
            "_gold": np.array([q.gold for q in self.questions], dtype=bool),
            "_pair": np.array([pair_number.get(q.pair, -1) for q in self.questions], dtype=np.int64),
            "_prompt": np.array([q.index for q in self.questions], dtype=np.int64),
            "_number": np.array([q.number for q in self.questions], dtype=np.uint64),
        }
        for name, value in tables.items():
            object.__setattr__(self, name, value)

    def question(self, question_id: str) -> Question | None:
        return self._by_id.get(question_id)  # type: ignore[attr-defined]

    def position(self, question_id: str) -> int | None:
        """Where ``question_id`` stands in :attr:`questions` (the index of its vote count)."""
        return self._position.get(question_id)  # type: ignore[attr-defined]

    def count_vector(self, counts: Mapping[str, int]) -> np.ndarray:
        """Votes per question as a vector aligned with :attr:`questions`."""
        vector = np.zeros(len(self.questions), dtype=np.int64)
        for question_id, n in counts.items():
            k = self.position(question_id)
            if k is not None:
                vector[k] = n
        return vector

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


def private_order(seed: int, numbers: np.ndarray) -> np.ndarray:
    """A cheap per-annotator shuffle of question numbers (a multiplicative hash, 32 bits)."""
    with np.errstate(over="ignore"):
        mixed = ((numbers + np.uint64(1)) * np.uint64(0x9E3779B1)) & np.uint64(0xFFFFFFFF)
        return ((mixed ^ np.uint64(seed)) * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF)


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


def _first_by(keys: Sequence[np.ndarray], candidates: np.ndarray) -> int:
    """The candidate index with the smallest keys, compared in order (a lexicographic argmin)."""
    for key in keys:
        values = key[candidates]
        candidates = candidates[values == values.min()]
        if len(candidates) == 1:
            break
    return int(candidates[0])


def next_question(design: StudyDesign, *, annotator: str, answered: Collection[str],
                  counts: Mapping[str, int] | np.ndarray) -> Question | None:
    """The question to show ``annotator`` next, or ``None`` when their share is done.

    ``answered``: ids this annotator has answered; ``counts``: votes per question so far (all
    annotators; a mapping by id or a vector aligned with ``design.questions``; it may lag a
    little behind when several processes serve a study).
    """
    position = len(answered)
    if position >= design.per_annotator:
        return None
    votes = counts if isinstance(counts, np.ndarray) else design.count_vector(counts)
    is_open = np.ones(len(design.questions), dtype=bool)
    for question_id in answered:
        k = design.position(question_id)
        if k is not None:
            is_open[k] = False
    gold = design._gold  # type: ignore[attr-defined]
    order = private_order(annotator_seed(annotator), design._number)  # type: ignore[attr-defined]
    if is_gold_turn(position, design.gold_every):
        open_gold = np.flatnonzero(is_open & gold)
        if len(open_gold):
            return design.questions[_first_by([votes, order], open_gold)]
    open_comparisons = np.flatnonzero(is_open & ~gold)
    if not len(open_comparisons):
        return None
    comparison = ~gold
    pair, prompt = design._pair, design._prompt  # type: ignore[attr-defined]
    pair_votes = np.bincount(pair[comparison], weights=votes[comparison], minlength=len(design.pairs))
    prompt_votes = np.bincount(prompt[comparison], weights=votes[comparison], minlength=int(prompt.max()) + 1)
    keys = [votes, pair_votes[np.maximum(pair, 0)], prompt_votes[prompt], order]
    return design.questions[_first_by(keys, open_comparisons)]


def is_correct(question: Question, winner_config: str | None) -> bool | None:
    """For a gold question: whether the real image (not the defect) was chosen; ``None`` otherwise."""
    return (winner_config == question.a) if question.gold else None
