"""The statistics of a study, as pure functions (each checked by hand in the tests).

* **Win / tie / loss** of configuration A against B over the votes on that pair, each
  rate with a 95% Wilson score interval (good near 0 and 1, unlike the normal one).
* **Bradley–Terry** strengths: P(i beats j) = sigmoid(s_i - s_j), fitted by maximum
  likelihood (Newton's method) over all pairs at once; a tie counts half a win for each
  side. A weak Gaussian prior (``alpha``) keeps strengths finite when a configuration
  wins every vote. Strengths are log-odds with mean 0; intervals by bootstrap over votes.
* **Annotators**: accuracy on gold questions (flags the inattentive), and agreement: how
  often an annotator's answer matches the majority of the *other* annotators on the
  same question (questions where the others are split evenly are skipped).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qsched.study.store import Vote

Z95 = 1.959963984540054


def wilson(k: float, n: float, *, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (``(0, 1)`` when ``n == 0``)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class PairResult:
    """Votes on configuration ``a`` vs ``b``: wins of a, ties, wins of b, with 95% intervals."""

    a: str
    b: str
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def rate(self, k: int) -> float | None:
        return k / self.n if self.n else None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"a": self.a, "b": self.b, "n": self.n}
        for name, k in (("win", self.wins), ("tie", self.ties), ("loss", self.losses)):
            out[name] = k
            out[f"{name}_rate"] = self.rate(k)
            out[f"{name}_ci95"] = list(wilson(k, self.n))
        return out


def pair_results(votes: Sequence[Vote], pairs: Sequence[tuple[str, str]]) -> list[PairResult]:
    """Win/tie/loss of ``a`` against ``b`` for each pair (sides shown do not matter)."""
    tally: dict[frozenset[str], Counter[str | None]] = {frozenset(p): Counter() for p in pairs}
    for vote in votes:
        key = frozenset((vote.left, vote.right))
        if key in tally:
            tally[key][vote.winner] += 1
    return [PairResult(a, b, tally[frozenset((a, b))][a], tally[frozenset((a, b))][None], tally[frozenset((a, b))][b])
            for a, b in pairs]


def win_matrix(votes: Sequence[Vote], items: Sequence[str]) -> np.ndarray:
    """``W[i, j]``: times item i beat item j (a tie adds 0.5 to both)."""
    position = {name: k for k, name in enumerate(items)}
    w = np.zeros((len(items), len(items)))
    for vote in votes:
        i, j = position.get(vote.left), position.get(vote.right)
        if i is None or j is None:
            continue
        if vote.winner is None:
            w[i, j] += 0.5
            w[j, i] += 0.5
        elif vote.winner == vote.left:
            w[i, j] += 1
        else:
            w[j, i] += 1
    return w


def bradley_terry(wins: np.ndarray, *, alpha: float = 0.01, tol: float = 1e-10, max_iter: int = 200) -> np.ndarray:
    """Maximum-likelihood Bradley–Terry log-strengths (mean 0) from a win matrix.

    Minimises the convex ``f(s) = -sum_ij W_ij log sigmoid(s_i - s_j) + alpha * sum_i s_i^2`` by
    Newton's method with backtracking (a few iterations for the handful of configurations of a
    study; a bootstrap refits it hundreds of times). ``f`` only depends on differences when
    ``alpha`` is 0, so steps are taken in the mean-zero subspace.
    """
    from scipy.special import expit, log_expit

    w = np.asarray(wins, dtype=np.float64)
    k = len(w)
    total = w + w.T

    def objective(s: np.ndarray) -> float:
        return -float((w * log_expit(s[:, None] - s[None, :])).sum()) + alpha * float(s @ s)

    s = np.zeros(k)
    value = objective(s)
    centre = np.eye(k) - 1.0 / k  # projection onto mean-zero vectors
    for _ in range(max_iter):
        d = s[:, None] - s[None, :]
        g = w * expit(-d)  # W_ij (1 - sigmoid(d_ij))
        grad = -(g.sum(axis=1) - g.sum(axis=0)) + 2 * alpha * s
        c = total * expit(d) * expit(-d)  # curvature of each pair
        hess = np.diag(c.sum(axis=1) + 2 * alpha) - c
        step = -np.linalg.lstsq(centre @ hess @ centre + np.ones((k, k)) / k, centre @ grad, rcond=None)[0]
        t = 1.0
        while t > 1e-8:
            candidate = s + t * step
            new_value = objective(candidate)
            if new_value <= value + 1e-4 * t * float(grad @ step):
                break
            t *= 0.5
        s, value = candidate, new_value
        if float(np.abs(t * step).max(initial=0.0)) < tol:
            break
    return s - s.mean()


@dataclass(frozen=True)
class Strengths:
    """Bradley–Terry strengths per configuration with bootstrap percentile intervals."""

    items: tuple[str, ...]
    strength: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    rounds: int

    def to_dict(self) -> dict[str, object]:
        return {"rounds": self.rounds, "items": {name: {"strength": s, "ci95": [lo, hi]} for name, s, lo, hi
                                                  in zip(self.items, self.strength, self.low, self.high)}}


def bootstrap_strengths(votes: Sequence[Vote], items: Sequence[str], *, rounds: int = 1000, seed: int = 0,
                        alpha: float = 0.01) -> Strengths:
    """Strengths and their 95% bootstrap intervals (votes resampled with replacement, ``rounds`` times)."""
    fitted = bradley_terry(win_matrix(votes, items), alpha=alpha)
    # Resampling votes = a multinomial draw over the cells (left, right, outcome) with the same total.
    cells = Counter((v.left, v.right, v.winner) for v in votes if v.left in items and v.right in items)
    keys = list(cells)
    if not keys or rounds < 1:
        return Strengths(tuple(items), tuple(fitted), tuple(fitted), tuple(fitted), 0)
    counts = np.array([cells[k] for k in keys], dtype=np.float64)
    rng = np.random.default_rng(seed)
    position = {name: k for k, name in enumerate(items)}
    rows = np.array([position[k[0]] for k in keys])
    cols = np.array([position[k[1]] for k in keys])
    outcome = np.array([0 if k[2] is None else (1 if k[2] == k[0] else 2) for k in keys])
    draws = np.empty((rounds, len(items)))
    for r in range(rounds):
        n = rng.multinomial(int(counts.sum()), counts / counts.sum())
        w = np.zeros((len(items), len(items)))
        np.add.at(w, (rows[outcome == 1], cols[outcome == 1]), n[outcome == 1])
        np.add.at(w, (cols[outcome == 2], rows[outcome == 2]), n[outcome == 2])
        np.add.at(w, (rows[outcome == 0], cols[outcome == 0]), 0.5 * n[outcome == 0])
        np.add.at(w, (cols[outcome == 0], rows[outcome == 0]), 0.5 * n[outcome == 0])
        draws[r] = bradley_terry(w, alpha=alpha)
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    return Strengths(tuple(items), tuple(float(x) for x in fitted), tuple(float(x) for x in low),
                     tuple(float(x) for x in high), rounds)


@dataclass(frozen=True)
class AnnotatorResult:
    """One annotator: votes, gold answers right / asked, agreement with the others."""

    annotator: str
    votes: int
    gold_correct: int
    gold_total: int
    agree: int
    comparable: int
    flagged: bool

    @property
    def gold_accuracy(self) -> float | None:
        return self.gold_correct / self.gold_total if self.gold_total else None

    @property
    def agreement(self) -> float | None:
        return self.agree / self.comparable if self.comparable else None

    def to_dict(self) -> dict[str, object]:
        return {"annotator": self.annotator, "votes": self.votes, "gold_correct": self.gold_correct,
                "gold_total": self.gold_total, "gold_accuracy": self.gold_accuracy, "agree": self.agree,
                "comparable": self.comparable, "agreement": self.agreement, "flagged": self.flagged}


def agreement_counts(votes: Sequence[Vote]) -> dict[str, tuple[int, int]]:
    """Per annotator: (answers equal to the others' majority, questions where the others have one)."""
    by_question: dict[str, list[Vote]] = defaultdict(list)
    for vote in votes:
        if not vote.gold:
            by_question[vote.question].append(vote)
    result: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for answers in by_question.values():
        for vote in answers:
            others = Counter(o.winner for o in answers if o.annotator != vote.annotator).most_common(2)
            if not others or (len(others) == 2 and others[0][1] == others[1][1]):
                continue
            result[vote.annotator][1] += 1
            result[vote.annotator][0] += int(others[0][0] == vote.winner)
    return {name: (a, c) for name, (a, c) in result.items()}


def annotator_results(votes: Sequence[Vote], *, min_gold_accuracy: float = 0.75) -> list[AnnotatorResult]:
    """Per annotator (sorted by name); flagged when gold accuracy is below ``min_gold_accuracy``."""
    agreement = agreement_counts(votes)
    by_annotator: dict[str, list[Vote]] = defaultdict(list)
    for vote in votes:
        by_annotator[vote.annotator].append(vote)
    out = []
    for name in sorted(by_annotator):
        own = by_annotator[name]
        gold = [v for v in own if v.gold]
        correct = sum(bool(v.correct) for v in gold)
        agree, comparable = agreement.get(name, (0, 0))
        flagged = bool(gold) and correct / len(gold) < min_gold_accuracy
        out.append(AnnotatorResult(name, len(own), correct, len(gold), agree, comparable, flagged))
    return out


def accepted_votes(votes: Sequence[Vote], annotators: Sequence[AnnotatorResult]) -> list[Vote]:
    """Comparison votes (not gold) of annotators who are not flagged."""
    flagged = {a.annotator for a in annotators if a.flagged}
    return [v for v in votes if not v.gold and v.annotator not in flagged]
