"""A running study: the evaluation's images, the design and the vote store, joined.

The web app calls only :meth:`StudyService.next_question` and :meth:`StudyService.submit`
(plus image look-ups by opaque token); every decision lives in :mod:`qsched.study.design`
and every vote in :mod:`qsched.study.store`. Image URLs are HMACs of the study's secret:
they name no configuration and no file, and a request can only pick among the
study's own images (nothing from a request reaches a filesystem path).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qsched.errors import QSchedError
from qsched.study import design as D
from qsched.study.gold import ensure_defect
from qsched.study.source import StudySource, load_source
from qsched.study.store import Vote, VoteStore

ANNOTATOR_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: Longest response time stored (an annotator who left the tab open for an hour).
MAX_RESPONSE_MS = 3_600_000
#: A question shown and not answered counts as half-assigned this long (for balance).
PENDING_S = 60.0


@dataclass(frozen=True)
class StudySettings:
    """What a study is: which evaluation, which pairs, how many questions, where votes go."""

    eval_dir: str
    storage: str | None = None
    pairs: str | None = None
    gold: int = 8
    gold_every: int = 10
    per_annotator: int = 50
    cache_dir: str | None = None
    counts_refresh_s: float = 2.0

    def study_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.eval_dir).resolve() / "study"

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.study_dir() / 'votes.db'}"


class InvalidVote(QSchedError):
    """A submission the server refuses (HTTP status in ``status``)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class StudyService:
    """The study's state in one server process (thread-safe)."""

    def __init__(self, settings: StudySettings, *, store: VoteStore | None = None) -> None:
        self.settings = settings
        self.source: StudySource = load_source(settings.eval_dir)
        pairs = D.parse_pairs(settings.pairs, self.source.configs)
        self.design = D.build_design(self.source.configs, len(self.source.prompts), pairs=pairs, gold=settings.gold,
                                     gold_every=settings.gold_every, per_annotator=settings.per_annotator)
        study_dir = settings.study_dir()
        if settings.storage is None:
            study_dir.mkdir(parents=True, exist_ok=True)
        self.store = store or VoteStore(settings.storage_url())
        self.secret = self.store.bind(self.identity())
        self._images: dict[str, Path] = {}
        self._token_of: dict[tuple[str, int], str] = {}
        for (config, index), image in self.source.images.items():
            self._add_image(config, index, image.path)
        for question in self.design.golds:
            defect = study_dir / "gold" / f"{question.id}.png"
            ensure_defect(self.source.image(question.a, question.index).path, defect, seed=question.index)
            self._add_image(f"{D.DEFECT}:{question.id}", question.index, defect)
        self._lock = threading.Lock()
        self._counts = np.zeros(len(self.design.questions), dtype=np.int64)
        self._counts_at = -1e9
        self._pending: dict[str, tuple[int, float]] = {}  # annotator -> (position of the question shown, when)

    def identity(self) -> dict[str, Any]:
        """What the votes mean: a store is bound to this and refuses another study."""
        return {"configs": list(self.source.configs), "prompts_sha256": hashlib.sha256(
                    "\x00".join(self.source.prompts).encode("utf-8")).hexdigest(),
                "num_prompts": len(self.source.prompts), "pairs": [list(p) for p in self.design.pairs],
                "gold": [[q.id, q.a, q.index] for q in self.design.golds]}

    def _add_image(self, config: str, index: int, path: Path) -> None:
        token = hmac.new(self.secret.encode(), f"{config}\x00{index}".encode(), hashlib.sha256).hexdigest()[:32]
        self._images[token] = path
        self._token_of[(config, index)] = token

    def image_path(self, token: str) -> Path | None:
        """The file behind an image token, or ``None`` (unknown tokens are never looked up on disk)."""
        return self._images.get(token)

    def _image_token(self, config: str, question: D.Question) -> str:
        key = (f"{D.DEFECT}:{question.id}", question.index) if config == D.DEFECT else (config, question.index)
        return self._token_of[key]

    # --- counts (for balanced assignment) ------------------------------------------------

    def counts(self, annotator: str) -> np.ndarray:
        """Votes per question (aligned with ``design.questions``) plus the questions shown to *other*
        annotators in the last ``PENDING_S`` s and not answered yet, so annotators asking at the same
        moment spread over questions. Votes are re-read from the store every ``counts_refresh_s``
        (other processes vote too) and counted here in between."""
        fresh = None
        if time.monotonic() - self._counts_at > self.settings.counts_refresh_s:
            fresh = self.design.count_vector(self.store.counts())
        now = time.monotonic()
        with self._lock:
            if fresh is not None:
                self._counts, self._counts_at = fresh, now
            self._pending = {a: (k, t) for a, (k, t) in self._pending.items() if now - t < PENDING_S}
            counts = self._counts.copy()
            for other, (k, _) in self._pending.items():
                if other != annotator:
                    counts[k] += 1
        return counts

    def _counted(self, annotator: str, question_id: str) -> None:
        k = self.design.position(question_id)
        with self._lock:
            self._counts[k] += 1
            self._pending.pop(annotator, None)

    def _shown(self, annotator: str, question_id: str) -> None:
        with self._lock:
            self._pending[annotator] = (self.design.position(question_id), time.monotonic())

    # --- the two operations --------------------------------------------------------------

    def check_annotator(self, annotator: object) -> str:
        if not isinstance(annotator, str) or not ANNOTATOR_PATTERN.match(annotator):
            raise InvalidVote("annotator must be 1-64 letters, digits, '.', '_' or '-'")
        return annotator

    def target(self) -> int:
        return min(self.design.per_annotator, len(self.design.questions))

    def next_question(self, annotator: str) -> dict[str, Any]:
        """The next question for ``annotator`` (sides as this annotator sees them) and their progress."""
        annotator = self.check_annotator(annotator)
        answered = self.store.answered(annotator)
        progress = {"answered": min(len(answered), self.target()), "target": self.target()}
        question = D.next_question(self.design, annotator=annotator, answered=answered, counts=self.counts(annotator))
        if question is None:
            return {"done": True, "progress": progress}
        self._shown(annotator, question.id)
        left, right = D.sides(question, annotator, self.secret)
        return {"done": False, "progress": progress,
                "question": {"id": question.id, "prompt": self.source.prompts[question.index],
                             "left": f"img/{self._image_token(left, question)}",
                             "right": f"img/{self._image_token(right, question)}"}}

    def submit(self, payload: object) -> dict[str, Any]:
        """Record one answer; a repeat of an answered question stores nothing and says so."""
        if not isinstance(payload, dict):
            raise InvalidVote("the body must be a JSON object", 400)
        unknown = set(payload) - {"annotator", "question", "answer", "response_ms"}
        if unknown:
            raise InvalidVote(f"unknown field(s): {', '.join(sorted(map(str, unknown)))[:200]}")
        annotator = self.check_annotator(payload.get("annotator"))
        question_id = payload.get("question")
        question = self.design.question(question_id) if isinstance(question_id, str) else None
        if question is None:
            raise InvalidVote("unknown question", 404)
        answer = payload.get("answer")
        if answer not in D.ANSWERS:
            raise InvalidVote(f"answer must be one of {', '.join(D.ANSWERS)}")
        response_ms = payload.get("response_ms", 0)
        if isinstance(response_ms, bool) or not isinstance(response_ms, (int, float)) or not 0 <= response_ms < 1e12:
            raise InvalidVote("response_ms must be a non-negative number")
        left, right = D.sides(question, annotator, self.secret)
        chosen = D.winner(answer, left, right)
        vote = Vote(annotator, question.id, question.index, left, right, answer, chosen, question.gold,
                    D.is_correct(question, chosen), int(min(response_ms, MAX_RESPONSE_MS)))
        stored, new = self.store.add(vote)
        if new:
            self._counted(annotator, question.id)
        return {"ok": True, "duplicate": not new, "answer": stored.answer}
