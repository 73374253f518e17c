"""A real uvicorn process: 20 annotators at once, and kill -9 in the middle of a run (loopback only)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from qsched.study.simulate import StudyClient, make_judge, simulate
from qsched.study.store import VoteStore
from qsched.study.synthetic import write_synthetic_evaluation
from study_helpers import start_server, stop


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    return write_synthetic_evaluation(tmp_path_factory.mktemp("eval"), num=20, size=16)  # 3 pairs x 20 = 60 comparisons


def test_twenty_annotators_at_once_lose_and_double_no_vote(eval_dir: Path, tmp_path: Path) -> None:
    process, url = start_server(eval_dir, "--cache", str(tmp_path / "study"), "--gold", "5")
    try:
        report = simulate(url, judge=make_judge("random"), needs_images=False, votes=20 * 50, annotators=20,
                          resubmit=True, progress=False)
    finally:
        stop(process)
    assert report.votes == 1000 and report.duplicates == 1000  # every resubmission recognised as one
    store = VoteStore(f"sqlite:///{tmp_path / 'study' / 'votes.db'}")
    stored = store.all_votes()
    assert len(stored) == 1000
    by_annotator: dict[str, list[str]] = {}
    for vote in stored:
        by_annotator.setdefault(vote.annotator, []).append(vote.question)
    assert {a: sorted(q) for a, q in by_annotator.items()} == {a: sorted(q) for a, q in report.acknowledged.items()}
    assert all(len(q) == 50 == len(set(q)) for q in by_annotator.values())
    counts = store.counts()
    comparison = [n for q, n in counts.items() if q.startswith("q")]
    assert len(comparison) == 60 and max(comparison) - min(comparison) <= 3  # balanced under concurrency too


def test_kill_9_loses_no_acknowledged_vote(eval_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "study"
    process, url = start_server(eval_dir, "--cache", str(cache), "--gold", "5")
    acknowledged: list[tuple[str, str, str]] = []
    lock = threading.Lock()
    stop_voting = threading.Event()

    def annotator(name: str) -> None:
        client = StudyClient(url, retries=0, timeout=5)
        answers = ("left", "right", "tie")
        try:
            while not stop_voting.is_set():
                question = client.json("GET", f"api/next?annotator={name}")["question"]
                answer = answers[len(question["id"]) % 3]
                result = client.json("POST", "api/vote", {"annotator": name, "question": question["id"], "answer": answer})
                assert result["duplicate"] is False
                with lock:
                    acknowledged.append((name, question["id"], answer))
        except OSError:
            pass  # the server is gone; what was acknowledged before counts
        finally:
            client.close()

    threads = [threading.Thread(target=annotator, args=(f"k{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # mid-run: requests are in flight
    process.wait()
    stop_voting.set()
    for thread in threads:
        thread.join(timeout=30)
    assert process.returncode == -signal.SIGKILL and len(acknowledged) >= 60
    process, url = start_server(eval_dir, "--cache", str(cache), "--gold", "5")
    try:
        stored = {(v.annotator, v.question): v.answer for v in VoteStore(f"sqlite:///{cache / 'votes.db'}").all_votes()}
        assert all(stored.get((a, q)) == answer for a, q, answer in acknowledged)  # every acknowledged vote is there
        assert len(stored) - len(acknowledged) <= 4  # at most one committed-but-unacknowledged vote per annotator
        client = StudyClient(url)  # the study goes on where it stopped
        data = client.json("GET", "api/next?annotator=k0")
        answered = {q for a, q in stored if a == "k0"}
        assert data["progress"]["answered"] == len(answered) and data["question"]["id"] not in answered
        client.close()
    finally:
        stop(process)
