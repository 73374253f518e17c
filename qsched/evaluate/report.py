"""Outputs of an evaluation: ``results.json``, ``results.md`` (the paper-style table),
``results.png`` (bar chart) and ``grid.png`` (the same prompts under each configuration)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from qsched.evaluate.metrics import HIGHER_IS_BETTER, UNITS, is_scorer_metric

_LABELS = {"fid": "FID", "clip": "CLIP score", "clipiqa": "CLIP-IQA", "mse": "MSE to fp", "size": "size",
           "brisque": "-BRISQUE", "niqe": "-NIQE", "pickscore": "PickScore", "hpsv2": "HPSv2"}


def relative_change(value: float | None, fp_value: float | None) -> float | None:
    """``(value - fp) / |fp|`` in percent; None where undefined (missing, or fp is 0)."""
    if value is None or fp_value is None or fp_value == 0:
        return None
    return 100.0 * (value - fp_value) / abs(fp_value)


def results_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]], metrics: Sequence[str], *, fp: str = "fp") -> str:
    """Markdown: one row per configuration, per metric its value and change relative to ``fp``."""
    header = ["configuration"] + [f"{_LABELS.get(m, m)}{' (' + UNITS[m] + ')' if UNITS.get(m) else ''} "
                                  f"{'↑' if HIGHER_IS_BETTER.get(m, True) else '↓'}" for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fp_row = results.get(fp, {})
    for name, row in results.items():
        cells = [f"`{name}`"]
        for metric in metrics:
            entry = row.get(metric)
            if entry is None:
                cells.append("–")
                continue
            if entry.get("status") != "ok":
                cells.append("failed")
                continue
            text = _format(entry["value"])
            change = relative_change(entry["value"], (fp_row.get(metric) or {}).get("value")
                                     if (fp_row.get(metric) or {}).get("status") == "ok" else None)
            if name != fp and change is not None:
                text += f" ({change:+.1f}%)"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 0.01:
        return f"{value:.4g}"
    return f"{value:.3g}"


def write_markdown(path: Path, table: str, *, title: str, notes: Sequence[str]) -> Path:
    text = f"# {title}\n\n{table}\n\n" + "".join(f"- {n}\n" for n in notes)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def plot_bars(path: Path, results: Mapping[str, Mapping[str, Mapping[str, Any]]], metrics: Sequence[str], *, title: str) -> Path:
    """One panel per metric, one bar per configuration; failed metrics are marked, never drawn as 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(3.2 * len(metrics), 4), 3.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, metric in zip(axes[0], metrics):
        values = [(results[n].get(metric) or {}) for n in names]
        heights = [v["value"] if v.get("status") == "ok" else 0.0 for v in values]
        errors = [v.get("std") or 0.0 if v.get("status") == "ok" and is_scorer_metric(metric) else 0.0 for v in values]
        bars = ax.bar(range(len(names)), heights, yerr=errors, color=[colours(i % 10) for i in range(len(names))], capsize=2)
        for bar, v in zip(bars, values):
            if v.get("status") != "ok":
                bar.set_hatch("//")
                ax.annotate("failed" if v else "n/a", (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        arrow = "↑" if HIGHER_IS_BETTER.get(metric, True) else "↓"
        ax.set_title(f"{_LABELS.get(metric, metric)} {arrow}", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_grid(path: Path, columns: Mapping[str, torch.Tensor], prompts: Sequence[str], *, max_label: int = 28) -> Path:
    """Rows: prompts; columns: configurations (uint8 ``[N, C, H, W]`` each, same N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    rows = len(prompts)
    size = 1.3
    fig, axes = plt.subplots(rows, len(names), figsize=(size * len(names) + 2.0, size * rows + 0.4), squeeze=False)
    for c, name in enumerate(names):
        for r in range(rows):
            ax = axes[r][c]
            image = columns[name][r]
            if image.shape[0] == 1:
                ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(image.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                text = prompts[r] if len(prompts[r]) <= max_label else prompts[r][: max_label - 1] + "…"
                ax.set_ylabel(text, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
