"""``qsched evaluate``: FP vs quantized vs Q-Sched vs PTQD on one prompt set, with metrics and a table."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

from qsched.cli.options import (
    DEFAULT_MODEL,
    add_backend_options,
    model_options,
    non_negative_int,
    output_folder,
    positive_int,
)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_parser(sub: Any, *, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "evaluate",
        parents=parents,
        help="compare configurations (fp, w8a8, w4a8+qsched, w4a8+ptqd, ...) with FID, CLIP score, CLIP-IQA",
        description="Generate a prompt set under several configurations and compare them; resumable, "
        "multi-process (accelerate launch -m qsched evaluate ..., or --num-processes).",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="local pipeline folder or 'builtin' (default: %(default)s)")
    parser.add_argument("--family", default=None, help="model family; detected when omitted")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="prompt file (.txt, .json incl. MJHQ/COCO, .yaml, .csv); default: the built-in evaluation prompts")
    parser.add_argument("--num", type=_int, default=None, help="use the first N prompts (default: all)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated configurations: fp, w8a8, w4a8, w4a4, <preset>+card, <preset>+qsched, "
                        "<preset>+ptqd (default: fp,w8a8,w4a8,w4a8+qsched,w4a4,w4a4+qsched)")
    parser.add_argument("--card", action="append", default=[], metavar="CARD.json",
                        help="schedule card for +card/+qsched configurations of its recipe (repeatable)")
    parser.add_argument("--ptqd-stats", action="append", default=[], metavar="FILE",
                        help="PTQD statistics for +ptqd configurations of their recipe (repeatable; default: estimate)")
    parser.add_argument("--metrics", default="fid,clip,clipiqa,mse,size",
                        help="comma-separated: fid, mse, size, or any scorer (clip, clipiqa, brisque, niqe, pickscore, "
                        "hpsv2; `qsched.score.scorer_names()`) (default: %(default)s)")
    parser.add_argument("--reference", default=None, metavar="DIR|STATS",
                        help="FID reference images folder or statistics file (default: built-in Fashion-MNIST test stats)")
    parser.add_argument("--fid-features", default="auto",
                        help="auto (EffNet for the built-in model), effnet, clip, or a local TorchScript feature network file")
    parser.add_argument("--clip-model", default=None, metavar="DIR", help="CLIP folder for clip/clipiqa (default: built-in CLIP)")
    parser.add_argument("--scorer-weights", action="append", default=[], metavar="SCORER=PATH",
                        help="local weights of a scorer metric, e.g. pickscore=/models/PickScore_v1 or "
                        "hpsv2=/models/HPS_v2.1_compressed.pt (repeatable; never downloaded)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the family's)")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--height", type=positive_int, default=None)
    parser.add_argument("--width", type=positive_int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    add_backend_options(parser)
    parser.add_argument("--num-processes", type=positive_int, default=1,
                        help="split generation and features across P processes (started with torch.distributed.run)")
    parser.add_argument("--keep-going", action="store_true", help="record a metric that cannot load as failed and go on")
    parser.add_argument("--grid-prompts", type=positive_int, default=8, help="prompts shown in grid.png")
    parser.add_argument("--out", required=True, type=output_folder, help="output folder (rerun with the same settings to resume)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qsched.errors import QSchedError

    if args.num is not None and args.num <= 0:
        raise QSchedError(f"--num must be a positive integer, got {args.num}")
    settings = build_settings(args)
    if args.num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _launch(args.num_processes)
    from qsched.evaluate import evaluate
    from qsched.evaluate.parallel import current_workers
    from qsched.evaluate.run import device_threads

    workers = current_workers()
    device_threads(workers)
    result = evaluate(settings, workers=workers)
    if workers.is_main:
        made = ", ".join(f"{k} {v}" for k, v in result.generated.items())
        print(result.table)
        print(f"\nwrote {', '.join(str(p) for p in result.files.values())} (images generated this run: {made})")
    return 0


def build_settings(args: argparse.Namespace) -> Any:
    """Parse and validate the arguments into :class:`qsched.evaluate.EvalSettings` (nothing is written)."""
    from qsched.builtin.captions import EVALUATION_FILE
    from qsched.card import ScheduleCard
    from qsched.errors import QSchedError
    from qsched.evaluate import DEFAULT_CONFIGS, EvalSettings, MetricSettings, parse_configs, parse_metrics
    from qsched.prompts import read_prompts
    from qsched.ptqd import PTQDStats
    from qsched.quant import QuantRecipe

    metrics = parse_metrics(args.metrics)
    source = args.prompts or str(EVALUATION_FILE)
    prompts = read_prompts(source)
    if not prompts:
        raise QSchedError(f"prompt file {source} holds no prompts")
    if args.num is not None:
        if args.num > len(prompts):
            print(f"qsched evaluate: warning: --num {args.num} is more than the {len(prompts)} prompts in {source}; "
                  f"using all {len(prompts)}", file=sys.stderr)
        prompts = prompts[: args.num]
    card_recipes = {str(p): QuantRecipe.from_dict(ScheduleCard.load(p).quant) for p in args.card}
    ptqd = {}
    for path in args.ptqd_stats:
        stats = PTQDStats.load(path)
        ptqd[QuantRecipe.from_dict(stats.quant).name] = path
    configs = parse_configs(args.configs or ",".join(DEFAULT_CONFIGS), cards=args.card,
                            card_recipes=card_recipes, ptqd_stats=ptqd)
    return EvalSettings(
        model=args.model, prompts=tuple(prompts), configs=tuple(configs), out=args.out, metrics=metrics,
        seed=args.seed, batch_size=args.batch_size, options=model_options(args),
        keep_going=args.keep_going, grid_prompts=args.grid_prompts,
        metric_settings=MetricSettings(fid_features=args.fid_features, reference=args.reference, clip_model=args.clip_model,
                                       scorer_weights=_scorer_weights(args.scorer_weights),
                                       batch_size=max(args.batch_size, 32)),
        progress=not args.no_progress,
    )


def _scorer_weights(items: list[str]) -> dict[str, str]:
    """``["pickscore=/models/ps"]`` -> ``{"pickscore": "/models/ps"}``; malformed items are refused."""
    from qsched.errors import QSchedError

    weights = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise QSchedError(f"--scorer-weights takes SCORER=PATH (e.g. pickscore=/models/PickScore_v1), got {item!r}")
        weights[name.strip()] = path
    return weights


def _launch(processes: int) -> int:
    """Run this same command in ``processes`` local processes of one process group.

    Each child gets the environment a launcher would set (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT, ...), which accelerate reads. Launching through
    ``torch.distributed.run`` instead would re-parse qsched's options with its own
    parser (``--num`` is an abbreviation of its ``--numa-binding``). If one process
    fails, the others are stopped, so none waits forever at a barrier.
    """
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    children = []
    for rank in range(processes):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                   LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
        children.append(subprocess.Popen([sys.executable, "-m", "qsched", *sys.argv[1:]], env=env))
    while True:
        codes = [child.poll() for child in children]
        failed = [code for code in codes if code not in (None, 0)]
        if failed:
            for child in children:
                if child.poll() is None:
                    child.terminate()
            for child in children:
                child.wait()
            return failed[0]
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.2)
