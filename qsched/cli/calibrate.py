"""``qsched calibrate``: search the Q-Sched coefficients of a quantized model; write a schedule card."""

from __future__ import annotations

import argparse
from typing import Any

from qsched.cli.options import PRESET_NAMES, add_model_options, model_options, non_negative_int, output_folder, positive_int

DEFAULT_QUANT = "w4a8"


def add_parser(sub: Any, *, parents: list[argparse.ArgumentParser]) -> None:
    from qsched.search.samplers import DEFAULT_GRID_POINTS, DEFAULT_TRIALS, STRATEGIES
    from qsched.score.jaq import CRITERIA
    from qsched.search.space import DEFAULT_BOUNDS, SPACES

    parser = sub.add_parser(
        "calibrate",
        parents=parents,
        help="find Q-Sched coefficients for a quantized model (JAQ search)",
        description=(
            "Search the per-step coefficients (c_x, c_eps) of a quantized model that maximise "
            "JAQ (by default the reference's: log(CLIP score of the set) + 2 * mean CLIP-IQA) over calibration "
            "prompts, running only the quantized model. "
            "Writes OUT/card.json, trials.csv, landscape.png, compare.png, run.json and the study (study.db)."
        ),
    )
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="calibration prompts: .txt, .json, .yaml, .csv (default: the 16 built-in ones)")
    add_model_options(
        parser, packed=False,
        quant_help=f"{PRESET_NAMES} (default: {DEFAULT_QUANT}; fp needs --allow-fp; see docs/quantization.md)",
    )
    group = parser.add_argument_group("search")
    group.add_argument("--search", default="grid", choices=STRATEGIES, help="strategy (default: %(default)s, the paper's)")
    group.add_argument("--space", default="ramp", choices=SPACES,
                       help="ramp: searched starts ramping to 1 (the paper); ramp-end: also the ends; per-step: free values")
    group.add_argument("--bounds", nargs=2, type=float, default=list(DEFAULT_BOUNDS), metavar=("LOW", "HIGH"),
                       help="range of every searched coefficient; must contain 1 (default: %(default)s)")
    group.add_argument("--grid-points", type=positive_int, default=DEFAULT_GRID_POINTS, metavar="N",
                       help="grid values per parameter, bounds included (default: %(default)s)")
    group.add_argument("--trials", type=positive_int, default=None, metavar="N",
                       help=f"candidates for tpe/cmaes/random, the baseline included (default: {DEFAULT_TRIALS})")
    group.add_argument("--seed", type=non_negative_int, default=0, help="noise and sampler seed (default: %(default)s)")
    group.add_argument("--sampler-seed", type=non_negative_int, default=None, metavar="S",
                       help="another seed for the sampler's proposals only, same noise (default: --seed)")
    group = parser.add_argument_group("objective (JAQ; defaults per --criterion)")
    group.add_argument("--criterion", default="new", choices=CRITERIA,
                       help="new (default, the reference's): log(CLIP score of the set) + k * mean CLIP-IQA, k 2; "
                       "kclip2 (the reference's shipped script): mean(--quality) + k * mean HPSv2, k 2; "
                       "per-image (qsched's earlier one): mean of log(max(CLIP, 1)) + k * CLIP-IQA, k 1")
    group.add_argument("--alignment", default=None, help="alignment scorer (default: clip; hpsv2 for kclip2)")
    group.add_argument("--quality", default=None,
                       help="quality scorer (default: clipiqa; kclip2 has none: the reference's AQ-Map is not in qsched)")
    group.add_argument("--k", type=float, default=None, help="weight k (default: 2 for new and kclip2, 1 for per-image)")
    group.add_argument("--transform", default=None,
                       help="alignment transform: log (default) or none; kclip2 takes none")
    group.add_argument("--normalize", default="none",
                       help="none, or zscore (per-image only): each term in units of the uncorrected model's spread "
                       "(default: %(default)s)")
    group.add_argument("--clip", default=None, metavar="PATH",
                       help="CLIP folder (transformers format) for clip/clipiqa (default: the built-in CLIP)")
    group.add_argument("--iqa-prompts", nargs="+", default=None, metavar="PAIR",
                       help="CLIP-IQA antonym pairs 'positive|negative' or names (default: quality)")
    group.add_argument("--alignment-path", default=None, metavar="PATH",
                       help="local weights of the alignment scorer: a folder for pickscore (and clip), "
                       "the checkpoint file for hpsv2; never downloaded")
    group = parser.add_argument_group("state")
    group.add_argument("--storage", default=None, metavar="URL",
                       help="optuna database URL shared by workers (default: sqlite in OUT/study.db)")
    group.add_argument("--study", default="qsched-calibrate", metavar="NAME", help="study name (default: %(default)s)")
    group.add_argument("--resume", action="store_true",
                       help="continue the study (a killed run, or join as one more worker); settings must match")
    parser.add_argument("--allow-fp", action="store_true",
                        help="calibrate the full-precision model on purpose (a control; never the default)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--out", required=True, type=output_folder, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="start over in an existing --out (deletes its study)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def _scorer_options(name: str, args: argparse.Namespace, *, weights: str | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if name in ("clip", "clipiqa") and args.clip is not None:
        options["path"] = args.clip
    if name == "clipiqa" and args.iqa_prompts is not None:
        options["prompts"] = [p.split("|", 1) if "|" in p else p for p in args.iqa_prompts]
    if weights is not None:
        options[_weights_option(name)] = weights
    return options


def _weights_option(name: str) -> str:
    """The factory option that takes a scorer's weights location: ``path`` or ``checkpoint``."""
    from qsched.errors import QSchedError
    from qsched.score import weights_option

    option = weights_option(name)
    if option is None:
        raise QSchedError(f"--alignment-path: scorer {name!r} takes no weights path (it has no path or checkpoint option)")
    return option


def run(args: argparse.Namespace) -> int:
    import optuna

    from qsched.calibrate import calibrate
    from qsched.quant import parse_preset
    from qsched.score.jaq import CRITERION_DEFAULTS, JAQ
    from qsched.search.samplers import SearchSettings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = SearchSettings(
        strategy=args.search, space=args.space, low=args.bounds[0], high=args.bounds[1],
        trials=args.trials, grid_points=args.grid_points, seed=args.seed,
        sampler_seed=args.sampler_seed,
    )
    default_alignment, default_quality, _, _ = CRITERION_DEFAULTS[args.criterion]
    alignment = args.alignment or default_alignment
    quality = args.quality or default_quality  # None for kclip2: JAQ says why it must be named
    jaq = JAQ(
        criterion=args.criterion, alignment=alignment, quality=quality, k=args.k, transform=args.transform,
        normalize=args.normalize,
        alignment_options=_scorer_options(alignment, args, weights=args.alignment_path),
        quality_options={} if quality is None else _scorer_options(quality, args),
    )
    result = calibrate(
        args.model,
        recipe=parse_preset(args.quant or DEFAULT_QUANT),
        out=args.out,
        search=search,
        jaq=jaq,
        prompts_file=args.prompts,
        storage=args.storage,
        study=args.study,
        resume=args.resume,
        overwrite=args.overwrite,
        allow_full_precision=args.allow_fp,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        options=model_options(args),
    )
    print(result.summary())
    return 0
