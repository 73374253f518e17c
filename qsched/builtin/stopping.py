"""Pick a distillation's stopping point from its snapshots' validation metrics.

    python -m qsched.builtin.stopping "50 links=runs/builtin/val/student3" runs/builtin/val/student4 \\
        --min-zero-shot 0.93 --steps 4 --plot docs/images/builtin-stopping-point.png

Each argument is a folder of ``quick_eval --split validation`` outputs, one subfolder per
snapshot (``step-NNNNN/metrics.json``; ``pipeline/`` is read as the run's last step). The rule:
the lowest validation FID among the snapshots whose validation zero-shot accuracy reaches
``--min-zero-shot``; if none does, the highest zero-shot accuracy. It prints the table (markdown)
and the pick (its measurement folder, then the measured pipeline on a line of its own, for the
evaluation-split command); the plot shows FID and zero-shot accuracy against the training step per run,
with the teacher's FID (``--reference``) and any other measurement at the same step count (``--line``,
e.g. the teacher's own few-step sampler) as horizontal lines.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from qsched.errors import QSchedError

STEP_DIR = re.compile(r"step-(\d+)$")


@dataclass(frozen=True)
class Snapshot:
    run: str
    step: int
    fid: float
    zero_shot: float
    clean: float  # CLIP-IQA clean/noisy
    folder: Path  # the measurement (quick_eval output)
    source: str  # the measured pipeline or checkpoint folder


def _export_step(record: dict) -> int | None:
    """The step of a run's final export (a ``pipeline/`` measurement), from the training checkpoint
    beside the measured source, if the layout is the usual one."""
    state = Path(record["source"]).parent / "checkpoint" / "state.json"
    return int(json.loads(state.read_text())["step"]) if state.is_file() else None


def parse_run(arg: str) -> tuple[str, Path]:
    """``LABEL=FOLDER`` or ``FOLDER`` (labelled by its name)."""
    label, sep, folder = arg.partition("=")
    return (label, Path(folder)) if sep else (Path(arg).name, Path(arg))


def read_run(folder: str | Path, *, steps: int = 4, label: str | None = None) -> list[Snapshot]:
    """Snapshots of one run folder, ordered by training step."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QSchedError(f"no such folder: {folder}")
    rows = []
    for metrics in sorted(folder.glob("*/metrics.json")):
        name = metrics.parent.name
        match = STEP_DIR.match(name)
        if not match and name != "pipeline":
            continue
        record = json.loads(metrics.read_text())
        step = int(match.group(1)) if match else _export_step(record)
        if step is None:
            continue
        if record.get("split") != "validation":
            raise QSchedError(f"{metrics} is not a validation measurement (split {record.get('split')!r}); "
                              "choose stopping points on --split validation only")
        run = record["runs"].get(str(steps))
        if run is None:
            raise QSchedError(f"{metrics} has no {steps}-step row; measured: {sorted(record['runs'])}")
        rows.append(Snapshot(run=label or folder.name, step=step, fid=run["fid_effnet"], zero_shot=run["zero_shot_accuracy"],
                             clean=run.get("clip_iqa_noisiness", float("nan")), folder=metrics.parent,
                             source=record["source"]))
    if not rows:
        raise QSchedError(f"no snapshot metrics in {folder} (expected step-NNNNN/metrics.json)")
    return sorted(rows, key=lambda r: r.step)


def pick(snapshots: Sequence[Snapshot], *, min_zero_shot: float) -> Snapshot:
    """Lowest FID among snapshots with zero-shot >= ``min_zero_shot``; else the highest zero-shot."""
    if not snapshots:
        raise QSchedError("no snapshots to choose from")
    qualifying = [s for s in snapshots if s.zero_shot >= min_zero_shot]
    if qualifying:
        return min(qualifying, key=lambda s: (s.fid, s.step))
    return max(snapshots, key=lambda s: (s.zero_shot, -s.fid))


def markdown(runs: dict[str, list[Snapshot]], reference_fid: float | None = None) -> str:
    lines = ["| run | step | validation FID | vs reference | zero-shot | CLIP-IQA clean |", "|---|---|---|---|---|---|"]
    for name, rows in runs.items():
        for r in rows:
            rel = _relative(r.fid, reference_fid) if reference_fid else ""
            lines.append(f"| {name} | {r.step} | {r.fid:.1f} | {rel} | {r.zero_shot:.3f} | {r.clean:.3f} |")
    return "\n".join(lines)


def _relative(fid: float, reference_fid: float) -> str:
    return f"{100 * (fid / reference_fid - 1):+.1f}%"


def measured_fid(path: str | Path, *, steps: int) -> float:
    """The ``steps``-step FID of one ``quick_eval`` metrics.json."""
    runs = json.loads(Path(path).read_text())["runs"]
    if str(steps) not in runs:
        raise QSchedError(f"{path} has no {steps}-step row; measured: {sorted(runs)}")
    return runs[str(steps)]["fid_effnet"]


def read_line(arg: str, *, steps: int) -> tuple[str, float]:
    """``LABEL=METRICS_JSON``: a horizontal line at that measurement's ``steps``-step FID."""
    label, sep, path = arg.partition("=")
    if not sep:
        raise QSchedError(f"--line takes LABEL=METRICS_JSON, got {arg!r}")
    return label, measured_fid(path, steps=steps)


def plot(runs: dict[str, list[Snapshot]], path: str | Path, *, chosen: Snapshot, min_zero_shot: float,
         reference_fid: float | None = None, lines: Sequence[tuple[str, float]] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fid, ax_zs) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in runs.items():
        ax_fid.plot([r.step for r in rows], [r.fid for r in rows], marker="o", ms=3, label=name)
        ax_zs.plot([r.step for r in rows], [r.zero_shot for r in rows], marker="o", ms=3, label=name)
    if reference_fid:
        for factor, style in ((1.0, "-"), (1.1, "--")):
            ax_fid.axhline(reference_fid * factor, color="gray", ls=style, lw=1,
                           label="teacher" if factor == 1.0 else "teacher +10%")
    for label, fid in lines:
        ax_fid.axhline(fid, color="k", ls=":", lw=1.2, label=label)
    ax_zs.axhline(min_zero_shot, color="gray", ls="--", lw=1, label=f"zero-shot {min_zero_shot}")
    ax_fid.plot([chosen.step], [chosen.fid], marker="*", ms=14, color="k", ls="none", label="chosen")
    ax_fid.set(xlabel="distillation step", ylabel="validation FID-EffNet (N=300)", title="FID (lower is better)")
    ax_zs.set(xlabel="distillation step", ylabel="validation zero-shot accuracy", title="zero-shot accuracy")
    ax_fid.legend(fontsize=7)
    ax_zs.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsched.builtin.stopping", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="[LABEL=]FOLDER",
                   help="folders of quick_eval --split validation outputs, one per run")
    p.add_argument("--steps", type=int, default=4, help="sampling steps of the measurement (default %(default)s)")
    p.add_argument("--min-zero-shot", type=float, default=0.93)
    p.add_argument("--reference", default=None, metavar="METRICS_JSON",
                   help="the teacher's validation metrics.json: FIDs are also shown relative to its FID")
    p.add_argument("--reference-steps", type=int, default=25)
    p.add_argument("--line", action="append", default=[], metavar="LABEL=METRICS_JSON",
                   help="also draw this measurement's FID at --steps as a horizontal line (repeatable)")
    p.add_argument("--plot", default=None, help="write a PNG of FID and zero-shot against the step")
    args = p.parse_args(argv)
    try:
        runs = {}
        for arg in args.runs:
            label, folder = parse_run(arg)
            runs[label] = read_run(folder, steps=args.steps, label=label)
        reference_fid = None
        if args.reference:
            reference_fid = measured_fid(args.reference, steps=args.reference_steps)
        lines = [read_line(arg, steps=args.steps) for arg in args.line]
        chosen = pick([s for rows in runs.values() for s in rows], min_zero_shot=args.min_zero_shot)
        print(markdown(runs, reference_fid))
        for label, fid in lines:
            rel = f" ({_relative(fid, reference_fid)} vs reference)" if reference_fid else ""
            print(f"{label}: FID {fid:.1f}{rel}")
        print(f"\nchosen: {chosen.run} step {chosen.step} (validation FID {chosen.fid:.1f}, zero-shot "
              f"{chosen.zero_shot:.3f}) from {chosen.folder}")
        print(f"pipeline: {chosen.source}")
        if args.plot:
            print(plot(runs, args.plot, chosen=chosen, min_zero_shot=args.min_zero_shot, reference_fid=reference_fid,
                       lines=lines))
    except (QSchedError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
