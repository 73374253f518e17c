"""Study server throughput: votes per second one server process sustains, and p95 of loading a question.

Starts ``qsched --threads 1 study serve`` (one uvicorn process, SQLite WAL votes) on a
synthetic evaluation folder of the paper's default size (7 configurations x 300 prompts:
21 pairs, 6,300 comparisons), then K simulated annotators (threads, keep-alive HTTP,
a random judge: no scoring cost) each loop ``GET /api/next`` -> ``POST /api/vote`` as fast
as the server answers. Reports acknowledged votes per second and the p50/p95 latency of
``/api/next`` (what the page waits for before it shows a question) under that load, and
again for a single annotator on an idle server; and the server process's CPU time per
vote (so a number taken on a busy machine can be told from the server's own cost). Targets: >= 200 votes/s, p95 <= 50 ms.

    python benchmarks/bench_study.py [--configs 7] [--prompts 300] [--annotators 8] [--votes 4000]
    python benchmarks/bench_study.py --storage postgresql://user@host/db   # the same against PostgreSQL
    python benchmarks/bench_study.py --postgres     # against a throw-away local server (tests/pg_server.py)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qsched.study.simulate import StudyClient, make_judge, percentile, simulate
from qsched.study.synthetic import write_synthetic_evaluation

REPO = Path(__file__).resolve().parents[1]


def start(eval_dir: Path, cache: Path, storage: str | None, per_annotator: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "qsched", "--threads", "1", "study", "serve", str(eval_dir), "--port", str(port),
            "--cache", str(cache), "--per-annotator", str(per_annotator)] + (["--storage", storage] if storage else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}/"
    client = StudyClient(url, retries=0, timeout=5)
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read()[-2000:]}")
        try:
            if client.request("GET", "healthz")[0] == 200:
                return process, url
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to tell server cost from machine load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--annotators", type=int, default=8)
    parser.add_argument("--votes", type=int, default=4000)
    parser.add_argument("--storage", default=None)
    parser.add_argument("--postgres", action="store_true", help="start a throw-away PostgreSQL server for --storage")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    if args.postgres:
        sys.path.insert(0, str(REPO / "tests"))
        from pg_server import create_database, postgres_server

        with postgres_server() as url:
            args.storage, args.postgres = create_database(url, "bench"), False
            run(args)
    else:
        run(args)


def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-study-"))
    configs = ["fp"] + [f"c{k}" for k in range(1, args.configs)]
    eval_dir = write_synthetic_evaluation(root / "eval", configs=configs, num=args.prompts, size=32)
    per_annotator = max(50, -(-args.votes // args.annotators))
    process, url = start(eval_dir, root / "study", args.storage, per_annotator)
    try:
        idle = simulate(url, judge=make_judge("random"), needs_images=False, votes=200, annotators=1, prefix="idle",
                        progress=False)
        cpu_before = cpu_seconds(process.pid)
        loaded = simulate(url, judge=make_judge("random"), needs_images=False, votes=args.votes,
                          annotators=args.annotators, prefix="load", progress=False)
        server_cpu = cpu_seconds(process.pid) - cpu_before
    finally:
        process.terminate()
        process.wait(timeout=10)
    numbers = {
        "questions": args.configs * (args.configs - 1) // 2 * args.prompts, "annotators": args.annotators,
        "votes": loaded.votes, "elapsed_s": round(loaded.elapsed_s, 2),
        "votes_per_s": round(loaded.votes / loaded.elapsed_s, 1),
        "next_p50_ms": round(1000 * percentile(loaded.next_latency_s, 50), 1),
        "next_p95_ms": round(1000 * percentile(loaded.next_latency_s, 95), 1),
        "vote_p95_ms": round(1000 * percentile(loaded.vote_latency_s, 95), 1),
        "idle_next_p50_ms": round(1000 * percentile(idle.next_latency_s, 50), 1),
        "idle_next_p95_ms": round(1000 * percentile(idle.next_latency_s, 95), 1),
        "idle_votes_per_s": round(idle.votes / idle.elapsed_s, 1),
        "server_cpu_ms_per_vote": round(1000 * server_cpu / loaded.votes, 2),
        "votes_per_server_cpu_s": round(loaded.votes / server_cpu, 1),
        "storage": args.storage or "sqlite (WAL)",
    }
    print(json.dumps(numbers, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
