"""qsched calibrate: outputs end to end, one-line errors that write nothing, kill -9 and --resume."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from qsched.builtin import clip as C
from qsched.cli import main
from qsched.score import register_scorer

TINY_CLIP = C.ClipSpec(vision_width=32, vision_layers=1, vision_heads=2, vision_mlp=64, text_width=32,
                       text_layers=1, text_heads=2, text_mlp=64, projection_dim=16)
TEST_SCORERS = '''
import os, time
from qsched.score import register_scorer
def _mean(**_):
    delay = float(os.environ.get("QSCHED_TEST_DELAY", "0"))
    def score(images, prompts):
        time.sleep(delay)
        return images.mean((1, 2, 3))
    return score
register_scorer("test-mean", _mean, kind="alignment", replace=True)
register_scorer("test-std", lambda **_: (lambda images, prompts: images.std((1, 2, 3))), replace=True)
'''
exec(TEST_SCORERS)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    tokenizer = C.build_tokenizer(C.vocabulary_words(), max_length=TINY_CLIP.max_text_length)
    path = tmp_path_factory.mktemp("tiny_clip")
    C.save_clip(C.new_clip(TINY_CLIP, tokenizer), C.build_processor(tokenizer), path)
    return path


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a shoe\na red bag\na coat\n")
    return path


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def base_args(model: Path, prompts: Path, out: Path) -> list[str]:
    return ["calibrate", "--model", str(model), "--steps", "2", "--height", "32", "--width", "32",
            "--prompts", str(prompts), "--out", str(out), "--no-progress"]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_calibrate_with_clip_and_clipiqa_end_to_end(tiny_pipeline_path, tiny_clip, prompts, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    # the built-in CLIP: a random tiny CLIP's mean cosine over a set can be negative, and then the
    # reference's log(CLIP score of the set) is undefined and every candidate fails
    code, stdout, err = run(capsys, *base_args(tiny_pipeline_path("lcm"), prompts, out), "--grid-points", "2")
    assert code == 0, err
    assert {"card.json", "trials.csv", "landscape.png", "compare.png", "run.json", "study.db"} <= {p.name for p in out.iterdir()}
    table = read_rows(out / "trials.csv")
    assert len(table) == 5 and {"clip", "clipiqa", "jaq"} <= set(table[0])
    card = json.loads((out / "card.json").read_text())
    assert (card["objective"]["criterion"], card["objective"]["formula"]) == ("new", "log(mean(clip)) + 2 * mean(clipiqa)")
    assert card["objective"]["value"] == pytest.approx(max(float(r["jaq"]) for r in table))
    for r in table:  # the reference's JAQ, from the trial's means: log(mean 100 cos) + 2 * mean CLIP-IQA
        assert float(r["jaq"]) == pytest.approx(math.log(float(r["clip"])) + 2 * float(r["clipiqa"]), abs=1e-9)
    assert card["objective"]["alignment_options"] == {"clamp": False}
    for needle in ("baseline JAQ", "best JAQ", "coefficients  c_x = [", "5 evaluated, 0 failed", "wall time"):
        assert needle in stdout


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def bad_cases(tmp: Path) -> list[tuple[list[str], str]]:
    return [
        (["--prompts", write(tmp / "empty.txt", "\n\n")], "holds no prompts"),
        (["--prompts", str(tmp / "missing.txt")], "does not exist"),
        (["--prompts", write(tmp / "p.docx", "a shoe")], "format '.docx' is not recognised"),
        (["--bounds", "1.2", "0.8"], "need low < high"),
        (["--bounds", "-1", "1.2"], "finite positive"),
        (["--search", "tpe", "--trials", "0"], "expected a positive integer, got 0"),
        (["--alignment", "imagereward"], "unknown scorer 'imagereward'; known scorers:"),
        (["--search", "anneal"], "invalid choice: 'anneal'"),
        (["--space", "spline"], "invalid choice: 'spline'"),
        (["--storage", "sqlite:////nonexistent-dir/study.db"], "cannot open storage sqlite:////nonexistent-dir/study.db"),
        (["--clip", str(tmp / "no-clip")], f"CLIP folder {tmp / 'no-clip'} does not exist"),
        (["--quant", "fp"], "calibration runs only the quantized model"),
        (["--normalize", "minmax"], "unknown normalisation 'minmax'"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_pipeline_path, prompts, tmp_path, capsys) -> None:
    model = tiny_pipeline_path("lcm")
    for i, (extra, message) in enumerate(bad_cases(tmp_path)):
        out = tmp_path / f"out{i}"
        code, _, err = run(capsys, *base_args(model, prompts, out), *extra)
        assert code == 2, (extra, err)
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists(), extra


def test_resume_with_different_settings_is_refused_naming_the_difference(tiny_pipeline_path, prompts, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    args = [*base_args(tiny_pipeline_path("lcm"), prompts, out), "--alignment", "test-mean", "--quality", "test-std",
            "--transform", "none", "--search", "random", "--trials", "2"]
    assert run(capsys, *args)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run(capsys, *args, "--k", "0.5", "--resume")
    assert code == 2 and "jaq.k: stored 2.0, given 0.5" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, *args)
    assert code == 2 and "pass --resume" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten
    code, stdout, err = run(capsys, *args[:-1], "4", "--resume")  # a larger budget continues the same study
    assert code == 0, err
    assert [r["number"] for r in read_rows(out / "trials.csv")] == ["0", "1", "2", "3"]


def completed(url: str) -> dict[int, float]:
    if not Path(url.removeprefix("sqlite:///")).is_file():
        return {}
    import sqlalchemy.exc

    try:  # the worker may be creating the tables (and their version row) or holding the write lock
        study = optuna.load_study(study_name="qsched-calibrate", storage=url)
        return {t.number: t.value for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"}
    except (KeyError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
        return {}


def test_kill_9_then_resume_loses_no_finished_candidate_and_repeats_none(tiny_pipeline_path, prompts, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    url = f"sqlite:///{out / 'study.db'}"
    script = tmp_path / "worker.py"
    script.write_text(TEST_SCORERS + textwrap.dedent('''
        import sys
        from qsched.cli import main
        sys.exit(main(sys.argv[1:]))
    '''))
    args = [*base_args(tiny_pipeline_path("lcm"), prompts, out), "--alignment", "test-mean", "--quality", "test-std",
            "--transform", "none", "--grid-points", "2"]
    worker = subprocess.Popen([sys.executable, str(script), *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "QSCHED_TEST_DELAY": "1.0"})  # the kill lands mid-candidate, with seconds to spare under load
    deadline = time.monotonic() + 90
    while len(completed(url)) < 2 and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    before = completed(url)
    assert worker.returncode == -signal.SIGKILL and 2 <= len(before) < 5
    code, _, err = run(capsys, *args, "--resume")
    assert code == 0, err
    after = completed(url)
    assert len(after) == 5
    assert all(after[n] == v for n, v in before.items())  # finished candidates kept as they were
    rows = [r for r in read_rows(out / "trials.csv") if r["state"] == "COMPLETE"]
    points = [(r["role"], r["cx_start"], r["ceps_start"]) for r in rows]
    assert len(points) == len(set(points)) == 5  # every grid point and the baseline exactly once
    retried = [r for r in read_rows(out / "trials.csv") if r["state"] == "FAIL"]
    assert all(r["retried_as"] and "died" in r["error"] for r in retried)  # the in-flight one, if any
