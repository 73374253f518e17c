"""``qsched train``: train a stage of the built-in models (teacher, student, flow-teacher, flow-student, clip).

A thin forwarder: the stage's own command line (``python -m qsched.builtin.train``
or ``python -m qsched.builtin.clip_train``) parses the rest of the arguments.
"""

from __future__ import annotations

import argparse
from typing import Any

STAGES = ("teacher", "student", "flow-teacher", "flow-student", "ship", "clip")


def add_parser(sub: Any, *, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "train",
        parents=parents,
        help="train a stage of the built-in model (long; run it in the background)",
        description="Train the built-in model: teacher, student (LCM distillation from the teacher), "
        "flow-teacher, flow-student (the rectified-flow transformer and its consistency-distilled "
        "student, family builtin-flow), ship (copy a trained pipeline into the package) or clip "
        "(the JAQ scorer). Every stage "
        "checkpoints and resumes with --resume; see qsched/builtin/MODEL_CARD.md. "
        "Arguments after STAGE go to the stage, e.g. `qsched train student -h`.",
    )
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("stage_args", nargs=argparse.REMAINDER, help="the stage's own options")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.stage == "clip":
        from qsched.builtin.clip_train import main as clip_main

        return clip_main(list(args.stage_args))
    from qsched.builtin.train import main as train_main

    return train_main([args.stage, *args.stage_args])
