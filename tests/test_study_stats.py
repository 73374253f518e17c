"""Study statistics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qsched.study.stats import (
    accepted_votes,
    agreement_counts,
    annotator_results,
    bootstrap_strengths,
    bradley_terry,
    pair_results,
    wilson,
    win_matrix,
)
from qsched.study.store import Vote


def vote(annotator: str, question: str, left: str, right: str, winner: str | None, *, gold: bool = False,
         correct: bool | None = None) -> Vote:
    answer = "tie" if winner is None else ("left" if winner == left else "right")
    return Vote(annotator, question, 0, left, right, answer, winner, gold, correct, 500)


def test_wilson_interval_by_hand() -> None:
    # p = 0.8, n = 10, z = 1.96: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.71674,
    # half-width z sqrt(0.016 + z^2/400) / (1 + z^2/10) = 0.22658
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-5) and high == pytest.approx(0.94332, abs=1e-5)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(0.27753, abs=1e-5)  # z^2/(n+z^2)
    assert wilson(0, 0) == (0.0, 1.0)


def test_pair_results_count_wins_ties_losses_whatever_the_sides() -> None:
    votes = [vote("a", "q1", "fp", "w4a8", "fp"), vote("b", "q1", "w4a8", "fp", "fp"),
             vote("c", "q1", "w4a8", "fp", "w4a8"), vote("d", "q1", "fp", "w4a8", None),
             vote("e", "q2", "fp", "w4a4", "w4a4")]
    fp_w4a8, fp_w4a4, w4a8_w4a4 = pair_results(votes, [("fp", "w4a8"), ("fp", "w4a4"), ("w4a8", "w4a4")])
    assert (fp_w4a8.wins, fp_w4a8.ties, fp_w4a8.losses, fp_w4a8.n) == (2, 1, 1, 4)
    assert fp_w4a8.to_dict()["win_rate"] == 0.5 and fp_w4a8.to_dict()["win_ci95"] == list(wilson(2, 4))
    assert (fp_w4a4.wins, fp_w4a4.losses) == (0, 1)
    assert w4a8_w4a4.n == 0 and w4a8_w4a4.to_dict()["win_rate"] is None


def test_win_matrix_counts_a_tie_half_for_each() -> None:
    votes = [vote("a", "q", "fp", "w4a8", "fp"), vote("b", "q", "w4a8", "fp", None), vote("c", "q", "w4a8", "fp", "w4a8")]
    w = win_matrix(votes, ["fp", "w4a8"])
    assert w.tolist() == [[0.0, 1.5], [1.5, 0.0]]


def test_bradley_terry_two_items_is_the_log_odds() -> None:
    # A beats B 3 times, B beats A once: the MLE gives s_A - s_B = log 3 (mean 0: +-log(3)/2)
    s = bradley_terry(np.array([[0.0, 3.0], [1.0, 0.0]]), alpha=0.0)
    assert s[0] - s[1] == pytest.approx(math.log(3), abs=1e-5) and s.sum() == pytest.approx(0.0, abs=1e-9)


def test_bradley_terry_recovers_strengths_from_expected_counts() -> None:
    # true strengths (ln 2, 0, -ln 2), 60 games per pair: P(A>B) = P(B>C) = 2/3, P(A>C) = 4/5,
    # so wins 40/20, 40/20 and 48/12; these satisfy the likelihood equations exactly.
    w = np.array([[0, 40, 48], [20, 0, 40], [12, 20, 0]], dtype=float)
    s = bradley_terry(w, alpha=0.0)
    assert s == pytest.approx([math.log(2), 0.0, -math.log(2)], abs=1e-4)


def test_the_prior_keeps_a_clean_sweep_finite() -> None:
    s = bradley_terry(np.array([[0.0, 10.0], [0.0, 0.0]]))
    assert np.isfinite(s).all() and s[0] > 2.0


def test_bootstrap_interval_brackets_the_estimate_and_is_reproducible() -> None:
    votes = [vote(f"u{k}", f"q{k}", "fp", "w4a8", "fp" if k % 4 else "w4a8") for k in range(40)]  # fp wins 30 of 40
    result = bootstrap_strengths(votes, ["fp", "w4a8"], rounds=300, seed=1)
    assert result.strength[0] - result.strength[1] == pytest.approx(math.log(3), abs=0.01)  # alpha 0.01 barely moves it
    assert result.low[0] < result.strength[0] < result.high[0] and result.low[1] < result.strength[1] < result.high[1]
    assert result.to_dict() == bootstrap_strengths(votes, ["fp", "w4a8"], rounds=300, seed=1).to_dict()
    assert bootstrap_strengths([], ["fp", "w4a8"], rounds=10).rounds == 0


def test_agreement_with_the_other_annotators_majority() -> None:
    votes = [
        vote("alice", "q1", "fp", "w4a8", "fp"), vote("bob", "q1", "fp", "w4a8", "fp"), vote("carol", "q1", "w4a8", "fp", "w4a8"),
        vote("alice", "q2", "fp", "w4a8", "fp"), vote("bob", "q2", "w4a8", "fp", "fp"),
        vote("carol", "q3", "fp", "w4a8", None),  # alone on q3: nothing to compare with
    ]
    # q1: alice's others are bob (fp) and carol (w4a8), split evenly -> skipped; same for bob;
    # carol's others both say fp -> she disagrees. q2: alice and bob agree with each other.
    assert agreement_counts(votes) == {"alice": (1, 1), "bob": (1, 1), "carol": (0, 1)}


def test_gold_accuracy_flags_and_accepted_votes() -> None:
    votes = [
        vote("alice", "g0", "fp", "defect", "fp", gold=True, correct=True),
        vote("alice", "g1", "defect", "fp", "fp", gold=True, correct=True),
        vote("alice", "q1", "fp", "w4a8", "fp"),
        vote("bob", "g0", "fp", "defect", "defect", gold=True, correct=False),
        vote("bob", "g1", "fp", "defect", "fp", gold=True, correct=True),
        vote("bob", "q1", "fp", "w4a8", "w4a8"),
        vote("carol", "q1", "w4a8", "fp", None),  # no gold answered yet: not flagged
    ]
    results = {a.annotator: a for a in annotator_results(votes, min_gold_accuracy=0.75)}
    assert (results["alice"].gold_correct, results["alice"].gold_total, results["alice"].flagged) == (2, 2, False)
    assert (results["bob"].gold_accuracy, results["bob"].flagged) == (0.5, True)
    assert results["carol"].gold_accuracy is None and not results["carol"].flagged
    assert [(v.annotator, v.question) for v in accepted_votes(votes, list(results.values()))] == [("alice", "q1"), ("carol", "q1")]
