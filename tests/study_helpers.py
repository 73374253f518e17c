"""Helpers of the study tests: a study server in its own process, folder snapshots."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from qsched.study.simulate import StudyClient

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (to prove a folder was not touched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def spawn_server(eval_dir: Path, *args: str, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """``qsched study serve`` in a child process (not waited for); returns it and its URL."""
    port = port or free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "qsched", "--threads", "1", "study", "serve", str(eval_dir),
                                "--port", str(port), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return process, f"http://127.0.0.1:{port}/"


def wait_ready(process: subprocess.Popen, url: str, *, timeout: float = 90.0) -> None:
    """Return once the server answers ``/healthz``; fail with its stderr if it exits first."""
    client = StudyClient(url, retries=0, timeout=5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the study server exited: {process.stderr.read()[-2000:]}")
        try:
            if client.request("GET", "healthz")[0] == 200:
                client.close()
                return
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the study server did not answer within the timeout")


def start_server(eval_dir: Path, *args: str, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """``qsched study serve`` in a child process; returns it and its URL once it answers."""
    process, url = spawn_server(eval_dir, *args, port=port)
    wait_ready(process, url)
    return process, url


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
