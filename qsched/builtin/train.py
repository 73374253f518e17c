"""Training commands of the built-in model, one per stage.

    python -m qsched.builtin.train teacher [--steps N] [--batch-size B] [--threads T] [--out DIR] [--resume]
    python -m qsched.builtin.train student [--teacher DIR] [...same options]
    python -m qsched.builtin.train flow-teacher [...same options]    # rectified-flow transformer (builtin-flow)
    python -m qsched.builtin.train flow-student [--teacher DIR] [...same options]
    python -m qsched.builtin.train trajectories [--teacher DIR] [--count N] [--out DIR]  # the student's direct targets
    python -m qsched.builtin.train ship SRC DST [--fp32]     # pipeline folder -> package assets

Each stage checkpoints to ``OUT/checkpoint`` every few minutes, logs to ``OUT/train.log``
and writes its final weights as a pipeline folder ``OUT/pipeline``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from qsched.errors import QSchedError

DEFAULTS = {
    "teacher": dict(out="runs/builtin/teacher", steps=4000, batch_size=64, lr=3e-4),
    "student": dict(out="runs/builtin/student", steps=75, batch_size=32, lr=2e-4),  # the shipped student's
    "flow-teacher": dict(out="runs/builtin/flow-teacher", steps=1800, batch_size=64, lr=3e-4),
    "flow-student": dict(out="runs/builtin/flow-student", steps=100, batch_size=32, lr=1e-4),  # the shipped student's
}
FLOW_STAGES = ("flow-teacher", "flow-student")
#: the shipped LCM teacher, from which the shipped student was distilled
SHIPPED_TEACHER = Path(__file__).resolve().parent / "assets" / "teacher"


def shapes_of(stage: str) -> dict[str, Any]:
    """The denoiser shapes a stage accepts (``--shape``)."""
    if stage in FLOW_STAGES:
        from qsched.builtin.flow import SHAPES
    else:
        from qsched.builtin.unet import SHAPES
    return SHAPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qsched.builtin.train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for stage, d in DEFAULTS.items():
        p = sub.add_parser(stage, help=f"train the {stage}")
        p.add_argument("--steps", type=int, default=d["steps"], help="total optimizer steps (default %(default)s)")
        p.add_argument("--batch-size", type=int, default=d["batch_size"])
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
        p.add_argument("--out", default=d["out"], help="run folder (default %(default)s)")
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
        p.add_argument("--lr", type=float, default=d["lr"])
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder")
        p.add_argument("--shape", default="default", help="denoiser shape name (qsched.builtin."
                       f"{'flow' if stage in FLOW_STAGES else 'unet'}.SHAPES)")
        p.add_argument("--max-templates", type=int, default=None, help=argparse.SUPPRESS)
        p.add_argument("--checkpoint-minutes", type=float, default=5.0)
        p.add_argument("--log-every", type=int, default=25)
        p.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                       help="also export the EMA/target weights every N steps to OUT/snapshots/step-NNNNN "
                            "(pipeline folders, to pick a stopping point; default: never)")
        if stage in ("student", "flow-student"):
            p.add_argument("--target-ema-decay", type=float, default=0.95,
                           help="EMA decay of the consistency target, which is also what is exported (default %(default)s)")
        if stage == "student":
            from qsched.builtin.train_student import HUBER_REDUCTIONS, StudentConfig

            recipe = StudentConfig()  # the shipped student's recipe
            p.add_argument("--teacher", default=str(SHIPPED_TEACHER),
                           help="teacher pipeline folder (default: the shipped teacher; with every other option "
                                "at its default, the run reproduces the shipped student)")
            p.add_argument("--guidance-range", type=float, nargs=2, default=(recipe.guidance_min, recipe.guidance_max),
                           metavar=("MIN", "MAX"),
                           help="the teacher's CFG scale is drawn from U[MIN, MAX] per image and embedded "
                                "(default %(default)s; MIN = MAX trains one scale)")
            p.add_argument("--ddim-timesteps", type=int, default=recipe.num_ddim_timesteps,
                           help="distillation grid: N DDIM timesteps, one teacher step = 1000/N timesteps "
                                "(default %(default)s; must divide 1000)")
            p.add_argument("--teacher-steps", type=int, default=recipe.teacher_steps, metavar="K",
                           help="guided teacher DDIM steps of the grid per consistency target (default %(default)s; "
                                "K shortens the chain from t = 999 to 0 to about N/K links)")
            p.add_argument("--huber-c", type=float, default=None,
                           help="pseudo-Huber constant of the consistency loss (default: iCT's 0.00054*sqrt(d))")
            p.add_argument("--huber-reduction", choices=HUBER_REDUCTIONS, default=recipe.huber_reduction,
                           help="norm of the pseudo-Huber loss per image (iCT, default) or per pixel "
                           "(diffusers' LCM script; the first student's recipe, with --huber-c 0.001)")
            p.add_argument("--consistency-weight", type=float, default=recipe.consistency_weight,
                           help="weight of the consistency-distillation term (default %(default)s; 0: none)")
            p.add_argument("--trajectory-weight", type=float, default=recipe.trajectory_weight,
                           help="weight of the direct term on stored teacher trajectories (default %(default)s; "
                                "needs --trajectories)")
            p.add_argument("--trajectories", default=None, metavar="DIR",
                           help="folder written by 'python -m qsched.builtin.train trajectories'")
        if stage == "flow-teacher":
            p.add_argument("--sigma-sampling", choices=("uniform", "logit-normal"), default="uniform",
                           help="noise-level distribution of the flow-matching loss (default %(default)s)")
        if stage == "flow-student":
            p.add_argument("--teacher", default="runs/builtin/flow-teacher/pipeline", help="flow teacher pipeline folder")
            p.add_argument("--loss", choices=("pseudo-huber", "mse"), default="pseudo-huber",
                           help="consistency loss (default %(default)s, per-image, iCT's c = 0.00054 * sqrt(1024))")
            p.add_argument("--huber-c", type=float, default=None, help="pseudo-Huber constant (default: iCT's)")
            p.add_argument("--guidance-scale", type=float, default=3.0,
                           help="the teacher's CFG scale, baked into the student (default %(default)s)")
            p.add_argument("--phases", type=int, default=40,
                           help="phased consistency (PCM): P equal phases of the 40-link grid, each distilled to "
                                "its lower edge (1: consistency to sigma 0, the first recipe; 4: one phase per "
                                "4-step FlowMatchEuler jump; default %(default)s, the shipped: guidance distillation)")
    traj = sub.add_parser("trajectories", help="store the teacher's 25-step sampling trajectories "
                          "(direct targets for the student's --trajectory-weight)")
    traj.add_argument("--teacher", default=str(SHIPPED_TEACHER), help="teacher pipeline folder (default: the shipped one)")
    traj.add_argument("--count", type=int, default=2048, help="trajectories (default %(default)s)")
    traj.add_argument("--steps", type=int, default=25, help="the teacher's DDIM steps (default %(default)s)")
    traj.add_argument("--guidance-scale", type=float, default=3.0, help="CFG scale (default %(default)s)")
    traj.add_argument("--shard-size", type=int, default=128, help="trajectories per file (default %(default)s)")
    traj.add_argument("--seed", type=int, default=0)
    traj.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    traj.add_argument("--max-templates", type=int, default=None, help=argparse.SUPPRESS)
    traj.add_argument("--out", default="runs/builtin/trajectories",
                      help="folder (default %(default)s); rerun the same command to complete an interrupted one")
    ship = sub.add_parser("ship", help="copy a trained pipeline folder into the package assets (fp16 weights)")
    ship.add_argument("src", help="pipeline folder, e.g. runs/builtin/student/pipeline")
    ship.add_argument("dst", help="destination, e.g. qsched/builtin/assets/student")
    ship.add_argument("--fp32", action="store_true", help="keep float32 weights")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qsched.builtin import train_common as tc
    from qsched.builtin.data import DEFAULT_ROOT

    try:
        if args.stage == "ship":
            print(tc.ship_pipeline(args.src, args.dst, fp16=not args.fp32))
            return 0
        if args.stage == "trajectories":
            from qsched.builtin.trajectories import TrajectorySpec, generate

            if args.threads < 1:
                raise QSchedError(f"--threads must be positive, got {args.threads}")
            spec = TrajectorySpec(count=args.count, steps=args.steps, guidance_scale=args.guidance_scale,
                                  shard_size=args.shard_size, seed=args.seed, max_templates=args.max_templates)
            print(generate(args.teacher, args.out, spec, threads=args.threads))
            return 0
        shapes = shapes_of(args.stage)
        if args.shape not in shapes:
            raise QSchedError(f"unknown --shape {args.shape!r}; allowed: {sorted(shapes)}")
        if args.steps < 1 or args.batch_size < 1 or args.threads < 1:
            raise QSchedError("--steps, --batch-size and --threads must be positive")
        if args.snapshot_every < 0:
            raise QSchedError(f"--snapshot-every must be 0 (never) or a positive step count, got {args.snapshot_every}")
        opts = tc.RunOptions(
            out=args.out, steps=args.steps, batch_size=args.batch_size, threads=args.threads, lr=args.lr,
            seed=args.seed, shape=args.shape, data_root=args.data_root or str(DEFAULT_ROOT),
            max_templates=args.max_templates, checkpoint_minutes=args.checkpoint_minutes,
            log_every=args.log_every, resume=args.resume, snapshot_every=args.snapshot_every,
        )
        if args.stage == "teacher":
            from qsched.builtin.train_teacher import train_teacher

            folder = train_teacher(opts)
        elif args.stage == "flow-teacher":
            from qsched.builtin.train_flow_teacher import FlowTeacherConfig, train_flow_teacher

            folder = train_flow_teacher(opts, FlowTeacherConfig(sigma_sampling=args.sigma_sampling))
        elif args.stage == "flow-student":
            from qsched.builtin.train_flow_student import FlowStudentConfig, train_flow_student

            cfg = FlowStudentConfig(loss=args.loss, huber_c=args.huber_c, guidance_scale=args.guidance_scale,
                                    target_ema_decay=args.target_ema_decay, phases=args.phases)
            folder = train_flow_student(opts, teacher=args.teacher, cfg=cfg)
        else:
            from qsched.builtin.train_student import StudentConfig, train_student

            cfg = StudentConfig(huber_c=args.huber_c, huber_reduction=args.huber_reduction,
                                num_ddim_timesteps=args.ddim_timesteps, teacher_steps=args.teacher_steps,
                                target_ema_decay=args.target_ema_decay,
                                guidance_min=args.guidance_range[0], guidance_max=args.guidance_range[1],
                                consistency_weight=args.consistency_weight,
                                trajectory_weight=args.trajectory_weight)
            folder = train_student(opts, teacher=args.teacher, cfg=cfg, trajectories=args.trajectories)
    except QSchedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
