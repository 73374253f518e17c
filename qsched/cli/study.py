"""``qsched study serve|results|simulate``: the pairwise user study over an evaluation's images."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from qsched.cli.options import non_negative_int, positive_int
from qsched.errors import QSchedError

TOKEN_ENV = "QSCHED_STUDY_TOKEN"
ORGANISER_ENV = "QSCHED_STUDY_ORGANISER_TOKEN"


def _study_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("eval_dir", metavar="EVAL_DIR", help="output folder of `qsched evaluate` (read only)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="votes database (SQLAlchemy URL): default sqlite:///EVAL_DIR/study/votes.db; "
                             "postgresql://user@host/db when several server processes share a study")
    parser.add_argument("--pairs", default=None, metavar="A:B,...",
                        help="configuration pairs to compare (default: every pair)")
    parser.add_argument("--gold", type=non_negative_int, default=8, metavar="N",
                        help="gold questions (an image vs a visibly defective copy; default 8)")
    parser.add_argument("--gold-every", type=positive_int, default=10, metavar="K",
                        help="every K-th question of an annotator is a gold one (default 10)")
    parser.add_argument("--per-annotator", type=positive_int, default=50, metavar="N",
                        help="questions per annotator (default 50)")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="where the gold images (and the default SQLite file) go (default EVAL_DIR/study)")


def add_parser(sub: Any, *, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("study", parents=parents, help="a pairwise user study of an evaluation's images",
                            description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="study_command", metavar="ACTION", parser_class=type(parser))
    actions.required = True

    serve = actions.add_parser("serve", parents=parents, help="serve the study's web page")
    _study_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=non_negative_int, default=8000, help="port (default 8000)")
    serve.add_argument("--annotator-token", default=os.environ.get(TOKEN_ENV), metavar="TOKEN",
                       help=f"require this token from annotators (put it in their link as &t=...; env {TOKEN_ENV})")
    serve.add_argument("--organiser-token", default=os.environ.get(ORGANISER_ENV), metavar="TOKEN",
                       help=f"token of the live results page (env {ORGANISER_ENV}; default: a random one, printed)")
    serve.set_defaults(run=run_serve)

    results = actions.add_parser("results", parents=parents, help="write results.json/.md/.png and votes.csv")
    results.add_argument("eval_dir", metavar="EVAL_DIR", help="output folder of `qsched evaluate`")
    results.add_argument("--storage", default=None, metavar="URL", help="votes database (default: the study's SQLite file)")
    results.add_argument("--cache", default=None, metavar="DIR", help="the study folder given to serve (default EVAL_DIR/study)")
    results.add_argument("--out", required=True, metavar="DIR", help="output folder")
    results.add_argument("--min-gold-accuracy", type=float, default=0.75, metavar="P",
                         help="annotators below this accuracy on gold questions are flagged and their votes dropped (default 0.75)")
    results.add_argument("--bootstrap", type=positive_int, default=1000, metavar="N", help="bootstrap rounds (default 1000)")
    results.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    results.set_defaults(run=run_results)

    simulate = actions.add_parser("simulate", parents=parents, help="cast votes with a model as annotator, over HTTP")
    _study_options(simulate)
    simulate.add_argument("--judge", required=True, metavar="NAME",
                          help="clip, clipiqa, pickscore, hpsv2 (any registered scorer), or random (load generation)")
    simulate.add_argument("--votes", type=positive_int, required=True, metavar="N", help="votes to cast in all")
    simulate.add_argument("--annotators", type=positive_int, default=4, metavar="K", help="simulated annotators (default 4)")
    simulate.add_argument("--url", default=None, metavar="URL",
                          help="a running study (http://127.0.0.1:8000/); default: serve EVAL_DIR on a free loopback port")
    simulate.add_argument("--token", default=os.environ.get(TOKEN_ENV), metavar="TOKEN", help="the annotator token, if any")
    simulate.add_argument("--tie-margin", type=float, default=0.0, metavar="D", help="answer tie when scores differ by <= D")
    simulate.add_argument("--scorer-weights", action="append", default=[], metavar="NAME=PATH",
                          help="local weights of a scorer, e.g. pickscore=/models/PickScore_v1")
    simulate.add_argument("--name", default="sim", help="annotator id prefix (default sim: sim-0, sim-1, ...)")
    simulate.add_argument("--resubmit", action="store_true", help="send every vote twice (tests idempotency under load)")
    simulate.set_defaults(run=run_simulate)


def _settings(args: argparse.Namespace) -> Any:
    from qsched.study.service import StudySettings

    return StudySettings(eval_dir=args.eval_dir, storage=args.storage, pairs=args.pairs, gold=args.gold,
                         gold_every=args.gold_every, per_annotator=args.per_annotator, cache_dir=args.cache)


def run_serve(args: argparse.Namespace) -> int:
    from qsched.study.app import create_app
    from qsched.study.server import LOOPBACK, bind, run_forever
    from qsched.study.service import StudyService

    sock = bind(args.host, args.port)
    service = StudyService(_settings(args))
    organiser = args.organiser_token or secrets.token_urlsafe(16)
    app = create_app(service, annotator_token=args.annotator_token, organiser_token=organiser)
    port = sock.getsockname()[1]
    base = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{port}/"
    link = base + "?a=NAME" + (f"&t={args.annotator_token}" if args.annotator_token else "")
    print(f"study of {len(service.design.comparisons)} comparisons and {len(service.design.golds)} gold questions "
          f"({len(service.design.pairs)} pairs x {len(service.source.prompts)} prompts), votes in "
          f"{service.store.engine.url.render_as_string(hide_password=True)}")
    print(f"annotators: {link}   (or {base} and a name)")
    print(f"organiser:  {base}results?token={organiser}")
    if args.host not in LOOPBACK:
        print(f"note: listening on {args.host}, reachable from other machines", file=sys.stderr)
    sys.stdout.flush()
    run_forever(app, sock)
    return 0


def run_results(args: argparse.Namespace) -> int:
    from qsched.study.results import summarize, write_results
    from qsched.study.service import StudySettings
    from qsched.study.store import VoteStore

    settings = StudySettings(eval_dir=args.eval_dir, storage=args.storage, cache_dir=args.cache)
    if args.storage is None and not (settings.study_dir() / "votes.db").is_file():
        raise QSchedError(f"no votes at {settings.study_dir() / 'votes.db'}; serve the study first or pass --storage")
    if not 0.0 <= args.min_gold_accuracy <= 1.0:
        raise QSchedError(f"--min-gold-accuracy must be in [0, 1], got {args.min_gold_accuracy}")
    store = VoteStore(settings.storage_url())
    identity = store.identity()
    if identity is None:
        raise QSchedError(f"storage {settings.storage_url()} holds no study; serve the study first")
    votes = store.all_votes()
    pairs = [tuple(p) for p in identity["pairs"]]
    summary = summarize(votes, configs=identity["configs"], pairs=pairs, min_gold_accuracy=args.min_gold_accuracy,
                        rounds=args.bootstrap, seed=args.seed)
    paths = write_results(summary, votes, Path(args.out), study={"eval_dir": str(Path(args.eval_dir).resolve()), **identity})
    print(f"{summary['votes']} accepted votes of {summary['votes_total']}; wrote {', '.join(str(p) for p in paths)}")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    import contextlib

    from qsched.study.simulate import JUDGES_WITHOUT_IMAGES, make_judge, percentile, simulate

    from qsched.cli.evaluate import _scorer_weights

    weights = _scorer_weights(args.scorer_weights)
    judge = make_judge(args.judge, tie_margin=args.tie_margin, weights=weights.get(args.judge))
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            from qsched.study.app import create_app
            from qsched.study.server import serve_in_thread
            from qsched.study.service import StudyService

            app = create_app(StudyService(_settings(args)), annotator_token=args.token, organiser_token=secrets.token_urlsafe(16))
            url = stack.enter_context(serve_in_thread(app))
        report = simulate(url, judge=judge, needs_images=args.judge not in JUDGES_WITHOUT_IMAGES, votes=args.votes,
                          annotators=args.annotators, token=args.token, prefix=args.name, resubmit=args.resubmit)
    print(json.dumps({"votes": report.votes, "duplicates": report.duplicates, "elapsed_s": round(report.elapsed_s, 3),
                      "votes_per_s": round(report.votes / report.elapsed_s, 1) if report.elapsed_s else None,
                      "next_p95_ms": round(1000 * percentile(report.next_latency_s, 95), 2)}))
    return 0
