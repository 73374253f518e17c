"""A study's results: one dictionary of numbers, written as JSON, Markdown, a plot and raw CSV.

The same :func:`summarize` feeds ``qsched study results`` and the organiser's live page.
``votes`` is the number of *accepted* votes: comparison answers (not gold) of
annotators who were not flagged by the gold questions.
"""

from __future__ import annotations

import csv
import html
import os
from pathlib import Path
from typing import Any, Sequence

from qsched.provenance import package_versions, write_json_atomic
from qsched.study.stats import (
    accepted_votes,
    annotator_results,
    bootstrap_strengths,
    pair_results,
)
from qsched.study.store import Vote


def summarize(votes: Sequence[Vote], *, configs: Sequence[str], pairs: Sequence[tuple[str, str]],
              min_gold_accuracy: float = 0.75, rounds: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every number of the study (JSON-ready)."""
    annotators = annotator_results(votes, min_gold_accuracy=min_gold_accuracy)
    accepted = accepted_votes(votes, annotators)
    gold = [v for v in votes if v.gold]
    in_pairs = {c for p in pairs for c in p}
    items = [c for c in configs if c in in_pairs]
    return {
        "votes": len(accepted),
        "votes_total": len(votes),
        "gold_votes": len(gold),
        "rejected_votes": sum(1 for v in votes if not v.gold) - len(accepted),
        "annotators": len(annotators),
        "flagged_annotators": sum(a.flagged for a in annotators),
        "min_gold_accuracy": min_gold_accuracy,
        "gold_accuracy": (sum(bool(v.correct) for v in gold) / len(gold)) if gold else None,
        "pairs": [p.to_dict() for p in pair_results(accepted, pairs)],
        "bradley_terry": bootstrap_strengths(accepted, items, rounds=rounds, seed=seed).to_dict(),
        "per_annotator": [a.to_dict() for a in annotators],
        "median_response_ms": _median([v.response_ms for v in accepted]),
    }


def _median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ci(pair: Sequence[float]) -> str:
    return f"[{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]"


def table_rows(summary: dict[str, Any]) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    """Rows of the three tables (pairs, strengths, annotators) as strings, for Markdown and HTML."""
    pairs = [[f"{p['a']} vs {p['b']}", str(p["n"]),
              f"{_pct(p['win_rate'])} {_ci(p['win_ci95'])}", f"{_pct(p['tie_rate'])} {_ci(p['tie_ci95'])}",
              f"{_pct(p['loss_rate'])} {_ci(p['loss_ci95'])}"] for p in summary["pairs"]]
    items = summary["bradley_terry"]["items"]
    ranked = sorted(items, key=lambda name: -items[name]["strength"])
    strengths = [[name, f"{items[name]['strength']:+.3f}",
                  f"[{items[name]['ci95'][0]:+.3f}, {items[name]['ci95'][1]:+.3f}]"] for name in ranked]
    annotators = [[a["annotator"], str(a["votes"]), f"{a['gold_correct']}/{a['gold_total']}",
                   _pct(a["gold_accuracy"]), f"{a['agree']}/{a['comparable']}", _pct(a["agreement"]),
                   "yes" if a["flagged"] else ""] for a in summary["per_annotator"]]
    return pairs, strengths, annotators


PAIR_HEAD = ["A vs B", "votes", "A wins [95% CI]", "tie", "B wins"]
STRENGTH_HEAD = ["configuration", "Bradley–Terry strength", "95% bootstrap CI"]
ANNOTATOR_HEAD = ["annotator", "votes", "gold right", "gold accuracy", "agrees", "agreement", "flagged"]


def markdown(summary: dict[str, Any]) -> str:
    pairs, strengths, annotators = table_rows(summary)

    def table(head: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    gold = summary["gold_accuracy"]
    return "\n\n".join([
        "# Study results",
        f"{summary['votes']} accepted votes ({summary['votes_total']} answers in all, {summary['gold_votes']} on gold "
        f"questions, {summary['rejected_votes']} from {summary['flagged_annotators']} flagged annotator(s) of "
        f"{summary['annotators']}); gold accuracy {_pct(gold) if gold is not None else '–'}, an annotator is flagged "
        f"below {_pct(summary['min_gold_accuracy'])}.",
        "## Pairs (rates with 95% Wilson intervals, in %)", table(PAIR_HEAD, pairs),
        f"## Bradley–Terry strengths (log-odds, mean 0; {summary['bradley_terry']['rounds']} bootstrap rounds)",
        table(STRENGTH_HEAD, strengths),
        "## Annotators", table(ANNOTATOR_HEAD, annotators),
    ]) + "\n"


def html_page(summary: dict[str, Any], *, refresh_s: int = 10) -> str:
    """The organiser's live page (reloads itself)."""
    pairs, strengths, annotators = table_rows(summary)

    def table(head: list[str], rows: list[list[str]]) -> str:
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"

    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta http-equiv=refresh content={refresh_s}>"
            "<meta name=viewport content='width=device-width, initial-scale=1'><title>Study results</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:1rem}table{border-collapse:collapse;margin-bottom:1rem}"
            "td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}</style></head><body>"
            f"<h1>Study results (live)</h1><p>{summary['votes']} accepted votes, {summary['votes_total']} answers, "
            f"{summary['annotators']} annotators ({summary['flagged_annotators']} flagged).</p>"
            f"<h2>Pairs</h2>{table(PAIR_HEAD, pairs)}<h2>Bradley–Terry</h2>{table(STRENGTH_HEAD, strengths)}"
            f"<h2>Annotators</h2>{table(ANNOTATOR_HEAD, annotators)}</body></html>")


def plot(summary: dict[str, Any], path: Path) -> None:
    """Win/tie/loss bars per pair (with Wilson intervals) and strengths with bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = summary["pairs"]
    items = summary["bradley_terry"]["items"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.6 * max(len(pairs), len(items)) + 1.8))
    labels = [f"{p['a']} vs {p['b']}" for p in pairs]
    y = list(range(len(pairs)))
    start = [0.0] * len(pairs)
    for key, colour in (("win", "#2b8a3e"), ("tie", "#adb5bd"), ("loss", "#c92a2a")):
        rates = [p[f"{key}_rate"] or 0.0 for p in pairs]
        left.barh(y, rates, left=start, color=colour, label={"win": "A wins", "tie": "tie", "loss": "B wins"}[key])
        start = [s + r for s, r in zip(start, rates)]
    win = [p["win_rate"] or 0.0 for p in pairs]
    left.errorbar(win, y, xerr=[[max(0.0, w - p["win_ci95"][0]) for w, p in zip(win, pairs)],
                                [max(0.0, p["win_ci95"][1] - w) for w, p in zip(win, pairs)]], fmt="none", ecolor="black", capsize=3)
    left.set_yticks(y, labels)
    left.set_xlim(0, 1)
    left.axvline(0.5, color="black", lw=0.5, ls=":")
    left.set_xlabel("share of votes (A wins with 95% CI)")
    left.legend(loc="lower right", fontsize="small")
    names = sorted(items, key=lambda n: items[n]["strength"])
    s = [items[n]["strength"] for n in names]
    # a percentile interval need not contain the point estimate on few votes: clip the bars at it
    right.errorbar(s, range(len(names)), xerr=[[max(0.0, v - items[n]["ci95"][0]) for v, n in zip(s, names)],
                                              [max(0.0, items[n]["ci95"][1] - v) for v, n in zip(s, names)]],
                   fmt="o", capsize=3)
    right.set_yticks(range(len(names)), names)
    right.axvline(0.0, color="black", lw=0.5, ls=":")
    right.set_xlabel("Bradley–Terry strength (log-odds, 95% bootstrap CI)")
    fig.suptitle(f"{summary['votes']} accepted votes")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


VOTE_FIELDS = ("annotator", "question", "index", "left", "right", "answer", "winner", "gold", "correct", "response_ms", "created")


def write_votes_csv(votes: Sequence[Vote], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=VOTE_FIELDS)
        writer.writeheader()
        for vote in votes:
            writer.writerow(vote.to_dict())
    os.replace(tmp, path)


def write_results(summary: dict[str, Any], votes: Sequence[Vote], out: Path, *, study: dict[str, Any]) -> list[Path]:
    """``results.json``, ``results.md``, ``results.png`` and ``votes.csv`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "results.png", out / "votes.csv"]
    write_json_atomic(paths[0], {**summary, "study": study, "versions": package_versions()})
    tmp = paths[1].with_name(f".results.md.{os.getpid()}.tmp")
    tmp.write_text(markdown(summary), encoding="utf-8")
    os.replace(tmp, paths[1])
    plot(summary, paths[2])
    write_votes_csv(votes, paths[3])
    return paths
