"""Simulated annotators: a model (or a coin) answers the study through its HTTP API.

The same requests as the page (``/api/next``, ``/img/...``, ``/api/vote``), so a simulation
is a demo, a load generator and, with a scorer as judge, the automatic metric's
"vote" to set beside the humans' later. A judge prefers the side with the higher score
of a registered scorer (``clip``, ``clipiqa``, ``pickscore``, ``hpsv2``, ...) and answers
"tie" when the scores differ by less than ``tie_margin``; ``random`` looks at nothing
(load generation). Each annotator is a thread with its own keep-alive connection;
scorer calls are serialised (one model in memory).
"""

from __future__ import annotations

import http.client
import io
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import quote, urlsplit

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from qsched.errors import QSchedError

JUDGES_WITHOUT_IMAGES = ("random",)


class StudyClient:
    """A keep-alive HTTP client for one annotator (reconnects and retries on a dropped connection)."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0, retries: int = 5) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise QSchedError(f"study URL {url!r} is not http://HOST:PORT/")
        self.host, self.port, self.prefix = parts.hostname, parts.port or 80, parts.path.rstrip("/")
        self.token, self.timeout, self.retries = token, timeout, retries
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        headers = {"X-Study-Token": self.token} if self.token else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in range(self.retries + 1):
            try:
                if self._conn is None:
                    self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                    self._conn.connect()
                    # headers and body go out in two writes: without this, Nagle's algorithm holds the
                    # body until the server's delayed ACK (~40 ms per request)
                    self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._conn.request(method, f"{self.prefix}/{path}", body=data, headers=headers)
                response = self._conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == self.retries:
                    raise
                time.sleep(min(0.1 * 2 ** attempt, 2.0))
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        status, payload = self.request(method, path, body)
        if status != 200:
            raise QSchedError(f"{method} /{path} answered {status}: {payload[:200]!r}")
        return json.loads(payload)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


Judge = Callable[[str, "np.ndarray | None", "np.ndarray | None"], str]


def make_judge(name: str, *, tie_margin: float = 0.0, seed: int = 0, weights: str | None = None) -> Judge:
    """``judge(prompt, left, right) -> "left" | "right" | "tie"`` (images as uint8 HWC arrays).

    ``weights``: a local weights path for the scorer (its ``path`` / ``checkpoint`` option).
    """
    if name == "random":
        rng = random.Random(seed)
        lock = threading.Lock()

        def coin(_prompt: str, _left: Any, _right: Any) -> str:
            with lock:
                return rng.choice(("left", "right", "tie"))
        return coin
    import torch

    from qsched.score import build_scorer, scorer_names, weights_option

    if name not in scorer_names():
        raise QSchedError(f"unknown judge {name!r}; use random or a scorer: {', '.join(scorer_names())}")
    option = weights_option(name)
    if weights is not None and option is None:
        raise QSchedError(f"judge {name!r} takes no weights path")
    scorer = build_scorer(name, **({option: weights} if weights is not None and option else {}))
    lock = threading.Lock()

    def judge(prompt: str, left: np.ndarray | None, right: np.ndarray | None) -> str:
        assert left is not None and right is not None
        images = torch.from_numpy(np.stack([left, right])).permute(0, 3, 1, 2).float() / 255.0
        with lock, torch.no_grad():
            scores = scorer(images, [prompt, prompt]).float().tolist()
        if abs(scores[0] - scores[1]) <= tie_margin:
            return "tie"
        return "left" if scores[0] > scores[1] else "right"
    return judge


def _decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


@dataclass
class SimulationReport:
    """What the simulated annotators did: votes acknowledged per annotator, repeats recognised, timings."""

    annotators: int
    acknowledged: dict[str, list[str]] = field(default_factory=dict)
    duplicates: int = 0
    next_latency_s: list[float] = field(default_factory=list)
    vote_latency_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def votes(self) -> int:
        return sum(len(v) for v in self.acknowledged.values())


def simulate(url: str, *, judge: Judge, needs_images: bool, votes: int, annotators: int = 4,
             token: str | None = None, prefix: str = "sim", resubmit: bool = False,
             progress: bool = True) -> SimulationReport:
    """``annotators`` threads cast up to ``votes`` votes in all (fewer if their questions run out).

    ``resubmit`` sends every vote twice (a retried request): the second must come back as a duplicate.
    """
    if votes < 1 or annotators < 1:
        raise QSchedError(f"votes and annotators must be >= 1, got {votes} and {annotators}")
    report = SimulationReport(annotators)
    lock = threading.Condition()
    budget = {"remaining": votes, "held": 0}  # votes not yet taken; taken but not yet cast
    errors: list[BaseException] = []
    bar = tqdm(total=votes, desc="votes", unit="vote", disable=not progress)

    def take() -> bool:
        """Claim one vote of the budget; waits while others hold claims they may hand back."""
        with lock:
            while budget["remaining"] == 0 and budget["held"] > 0:
                lock.wait()
            if budget["remaining"] == 0:
                return False
            budget["remaining"] -= 1
            budget["held"] += 1
            return True

    def release(*, used: bool) -> None:
        with lock:
            budget["held"] -= 1
            budget["remaining"] += 0 if used else 1
            lock.notify_all()

    def annotator(name: str) -> None:
        client = StudyClient(url, token=token)
        mine: list[str] = []
        try:
            while take():
                used = False
                try:
                    t0 = time.perf_counter()
                    data = client.json("GET", f"api/next?annotator={quote(name)}")
                    t1 = time.perf_counter()
                    if data["done"]:
                        break
                    question = data["question"]
                    left = right = None
                    if needs_images:
                        left = _decode(client.request("GET", question["left"])[1])
                        right = _decode(client.request("GET", question["right"])[1])
                    answer = judge(question["prompt"], left, right)
                    body = {"annotator": name, "question": question["id"], "answer": answer,
                            "response_ms": int(1000 * (time.perf_counter() - t1))}
                    t2 = time.perf_counter()
                    # Only this thread votes as ``name``: a duplicate here means an earlier attempt of
                    # this same request (retried after a dropped connection) was stored.
                    client.json("POST", "api/vote", body)
                    t3 = time.perf_counter()
                    used = True
                    repeats = [client.json("POST", "api/vote", body)] if resubmit else []
                    with lock:
                        report.next_latency_s.append(t1 - t0)
                        report.vote_latency_s.append(t3 - t2)
                        mine.append(question["id"])
                        report.duplicates += sum(r["duplicate"] for r in repeats)
                    bar.update(1)
                finally:
                    release(used=used)
        except BaseException as err:  # noqa: BLE001 - reported after all threads stop
            with lock:
                errors.append(err)
        finally:
            client.close()
            with lock:
                report.acknowledged[name] = mine

    start = time.perf_counter()
    threads = [threading.Thread(target=annotator, args=(f"{prefix}-{k}",), daemon=True) for k in range(annotators)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bar.close()
    report.elapsed_s = time.perf_counter() - start
    if errors:
        raise QSchedError(f"a simulated annotator failed: {errors[0]}") from errors[0]
    return report


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(q / 100 * len(ordered))) - 1))]
