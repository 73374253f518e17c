"""What a calibration leaves to read and look at: ``trials.csv``, ``landscape.png``, ``compare.png``.

Every file is written to a temporary name and renamed, so a reader (or another
worker writing the same folder) sees either the old file or the whole new one.
"""

from __future__ import annotations

import csv
import io
import os
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from qsched.search.space import SearchSpace
from qsched.search.study import Candidate, best_candidate


def _replace(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _vector(values: Any) -> str:
    return " ".join(f"{float(v):.6g}" for v in values) if isinstance(values, (list, tuple)) else ""


def trial_rows(candidates: Sequence[Candidate], space: SearchSpace, *, alignment: str, quality: str) -> list[dict[str, Any]]:
    """One row per candidate: number, role, state, parameters, coefficients, scorer means, JAQ, error."""
    rows = []
    for c in candidates:
        attrs = c.user_attrs
        coefficients = space.coefficients(c.params) if set(space.param_names) <= set(c.params) else None
        row: dict[str, Any] = {"number": c.number, "role": c.role, "state": c.state}
        row.update({name: c.params.get(name, "") for name in space.param_names})
        row["c_x"] = _vector(list(coefficients.c_x)) if coefficients else ""
        row["c_eps"] = _vector(list(coefficients.c_eps)) if coefficients else ""
        row[alignment] = attrs.get("alignment", "")
        row[quality] = attrs.get("quality", "")
        row["alignment_term"] = attrs.get("alignment_term", "")
        row["quality_term"] = attrs.get("quality_term", "")
        row["jaq"] = "" if c.value is None else c.value
        row["seconds"] = attrs.get("seconds", "")
        row["error"] = c.error or ""
        row["retry_of"] = "" if c.retry_of is None else c.retry_of
        row["retried_as"] = "" if c.retried_as is None else c.retried_as
        rows.append(row)
    return rows


def write_trials_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` (from :func:`trial_rows`) as CSV."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return _replace(Path(path), buffer.getvalue().encode("utf-8"))


def _figure_bytes(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def plot_landscape(
    path: str | os.PathLike,
    candidates: Sequence[Candidate],
    space: SearchSpace,
    *,
    grid_points: int | None,
    title: str,
) -> Path:
    """JAQ over the (c_x start, c_eps start) plane: a heat map for a grid, else the sampled points.

    Spaces with more than two parameters show, per cell of the grid, the best JAQ
    over the other parameters. The best candidate is a star, the baseline a cross,
    failed candidates grey crosses.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    px, py = space.plane
    complete = [c for c in candidates if c.state == "COMPLETE" and c.value is not None and px in c.params]
    failed = [c for c in candidates if c.state == "FAIL" and c.retried_as is None and px in c.params]
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    pad = 0.03 * (space.high - space.low)
    limits = (space.low - pad, space.high + pad)
    search = [c for c in complete if not c.is_baseline]
    if grid_points is not None and search:
        axis = space.grid(grid_points)[px]
        index = {round(v, 9): i for i, v in enumerate(axis)}
        heat = np.full((len(axis), len(axis)), np.nan)
        for c in search:
            i, j = index.get(round(c.params[py], 9)), index.get(round(c.params[px], 9))
            if i is not None and j is not None:
                heat[i, j] = c.value if np.isnan(heat[i, j]) else max(heat[i, j], c.value)
        edges = _edges(axis)
        mesh = ax.pcolormesh(edges, edges, np.ma.masked_invalid(heat), cmap="viridis", shading="flat")
        fig.colorbar(mesh, ax=ax, format="%.5g",
                     label="JAQ" + (" (best over the other parameters)" if len(space.param_names) > 2 else ""))
        limits = (float(edges[0]), float(edges[-1]))
    elif search:
        points = ax.scatter([c.params[px] for c in search], [c.params[py] for c in search],
                            c=[c.value for c in search], cmap="viridis", s=36, edgecolors="k", linewidths=0.3)
        fig.colorbar(points, ax=ax, format="%.5g", label="JAQ")
    if failed:
        ax.scatter([c.params[px] for c in failed], [c.params[py] for c in failed], marker="x", c="0.5", s=30, label="failed")
    best = best_candidate(candidates)
    baseline = next((c for c in complete if c.is_baseline), None)
    if baseline is not None:
        ax.scatter([1.0], [1.0], marker="X", c="white", edgecolors="k", s=90, label=f"uncorrected {baseline.value:.4g}")
    if best is not None and px in best.params:
        ax.scatter([best.params[px]], [best.params[py]], marker="*", c="red", edgecolors="k", s=220,
                   label=f"best {best.value:.4g}")
    ax.set_xlim(*limits)
    ax.set_ylim(*limits)
    ax.set_xlabel(f"{px} (c_x at the first step)")
    ax.set_ylabel(f"{py} (c_eps at the first step)")
    ax.set_title(title, fontsize=9)
    # below the axes: the best point is often a corner of the box, where a legend inside would hide it
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=7, frameon=False)
    return _replace(Path(path), _figure_bytes(fig))


def _edges(axis: Sequence[float]) -> np.ndarray:
    a = np.asarray(axis, dtype=float)
    mid = (a[1:] + a[:-1]) / 2
    return np.concatenate([[a[0] - (mid[0] - a[0])], mid, [a[-1] + (a[-1] - mid[-1])]])


def plot_compare(
    path: str | os.PathLike,
    prompts: Sequence[str],
    uncorrected: torch.Tensor,
    corrected: torch.Tensor,
    *,
    labels: tuple[str, str] = ("uncorrected", "Q-Sched"),
) -> Path:
    """Two rows of images, one column per prompt: uncorrected quantized above, Q-Sched below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(prompts)
    fig, axes = plt.subplots(2, n, figsize=(max(1.25 * n, 3.0), 3.2), squeeze=False)
    for row, (label, images) in enumerate(zip(labels, (uncorrected, corrected))):
        for col in range(n):
            ax = axes[row][col]
            image = images[col].detach().float().clamp(0, 1).cpu()
            if image.shape[0] == 1:
                ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(image.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("\n".join(textwrap.wrap(prompts[col], 16)[:3]), fontsize=6)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    return _replace(Path(path), _figure_bytes(fig))
