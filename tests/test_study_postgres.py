"""Storage on a real PostgreSQL server: study votes from two server processes, calibrate with two workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import optuna
import pytest

from qsched.cli import main
from qsched.search import StudyView
from qsched.study.simulate import StudyClient, make_judge, simulate
from qsched.study.store import Vote, VoteStore
from qsched.study.synthetic import write_synthetic_evaluation
from pg_server import create_database, postgres_server
from study_helpers import REPO, spawn_server, stop, wait_ready
from test_cli_calibrate import TEST_SCORERS, base_args


@pytest.fixture(scope="module")
def server_url():
    with postgres_server() as url:
        yield url


def test_the_vote_store_on_postgres(server_url) -> None:
    store = VoteStore(create_database(server_url, "store"))
    secret = store.bind({"configs": ["fp", "w4a8"]})
    assert VoteStore(store.url).bind({"configs": ["fp", "w4a8"]}) == secret  # a second process gets the same secret
    vote = Vote("ann", "q0-0", 0, "fp", "w4a8", "left", "fp", False, None, 42)
    first, again = store.add(vote), store.add(Vote(**{**vote.to_dict(), "answer": "tie", "winner": None}))
    assert first[1] is True and again[1] is False and again[0].answer == "left"
    assert store.counts() == {"q0-0": 1} and store.answered("ann") == {"q0-0"} and store.count() == 1


def test_two_server_processes_share_one_study(server_url, tmp_path) -> None:
    url = create_database(server_url, "study")
    eval_dir = write_synthetic_evaluation(tmp_path / "eval", num=10, size=16)
    servers = [spawn_server(eval_dir, "--storage", url, "--cache", str(tmp_path / f"cache{k}"), "--gold", "2",
                            "--per-annotator", "20") for k in range(2)]
    try:
        for process, base in servers:
            wait_ready(process, base)
        reports = {}

        def run(k: int) -> None:
            reports[k] = simulate(servers[k][1], judge=make_judge("random", seed=k), needs_images=False, votes=80,
                                  annotators=4, prefix=f"p{k}", progress=False)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        # an annotator moving between the two processes: same images and sides, a repeat is a duplicate,
        # no question twice
        a, b = StudyClient(servers[0][1]), StudyClient(servers[1][1])
        question = a.json("GET", "api/next?annotator=roamer")["question"]  # position 0: a comparison, not gold
        assert b.json("POST", "api/vote", {"annotator": "roamer", "question": question["id"], "answer": "left"})["duplicate"] is False
        assert a.json("POST", "api/vote", {"annotator": "roamer", "question": question["id"], "answer": "right"})["duplicate"] is True
        (vote,) = [v for v in VoteStore(url).all_votes() if v.annotator == "roamer"]
        shown_left = b.request("GET", question["left"])  # image tokens are the same in every process
        assert shown_left[0] == 200 and shown_left[1] == (eval_dir / "images" / vote.left / f"{vote.index:05d}.png").read_bytes()
        assert vote.answer == "left" and vote.winner == vote.left
        for client in (a, b):
            assert client.json("GET", "api/next?annotator=roamer")["question"]["id"] != question["id"]
        a.close()
        b.close()
    finally:
        for process, _ in servers:
            stop(process)
    assert reports[0].votes == reports[1].votes == 80
    stored = VoteStore(url).all_votes()
    assert len(stored) == 161 and len({(v.annotator, v.question) for v in stored}) == 161
    out = tmp_path / "results"
    assert main(["study", "results", str(eval_dir), "--storage", url, "--out", str(out), "--bootstrap", "20"]) == 0
    assert json.loads((out / "results.json").read_text())["votes_total"] == 161


def test_calibrate_with_two_workers_on_postgres_evaluates_every_candidate_once(server_url, tiny_pipeline_path, tmp_path) -> None:
    storage = create_database(server_url, "calibrate")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a shoe\na red bag\na coat\n")
    script = tmp_path / "worker.py"
    # A scorer that waits (once) until both workers are scoring: each then evaluates candidates,
    # however far apart the two processes start.
    script.write_text(TEST_SCORERS + textwrap.dedent('''
        import os, sys, time
        from pathlib import Path
        from qsched.score import register_scorer
        def _meeting(**_):
            barrier, met = Path(os.environ["QSCHED_TEST_BARRIER"]), []
            def score(images, prompts):
                if not met:
                    (barrier / str(os.getpid())).touch()
                    deadline = time.monotonic() + 120
                    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    met.append(True)
                return images.mean((1, 2, 3))
            return score
        register_scorer("test-meeting", _meeting, kind="alignment", replace=True)
        from qsched.cli import main
        sys.exit(main(sys.argv[1:]))
    '''))
    (tmp_path / "barrier").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "QSCHED_TEST_BARRIER": str(tmp_path / "barrier")}
    workers = []
    for k in range(2):
        args = ["--threads", "1", *base_args(tiny_pipeline_path("lcm"), prompts, tmp_path / f"out{k}"),
                "--alignment", "test-meeting", "--quality", "test-std", "--transform", "none", "--grid-points", "2",
                "--storage", storage, "--resume"]
        workers.append(subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, env=env))
    errors = [w.communicate(timeout=300)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    study = optuna.load_study(study_name="qsched-calibrate", storage=storage.replace("postgresql://", "postgresql+psycopg://"))
    complete = [c for c in StudyView.of(study).candidates() if c.state == "COMPLETE"]
    points = [(c.role, c.params["cx_start"], c.params["ceps_start"]) for c in complete]
    assert len(points) == len(set(points)) == 2 * 2 + 1  # the grid and the baseline, each exactly once
    workers_seen = {json.dumps(t.user_attrs.get("qsched.worker"), sort_keys=True) for t in study.trials if t.state.name == "COMPLETE"}
    assert len(workers_seen) == 2  # both workers evaluated candidates
