"""``qsched evaluate`` at the boundary: one-line errors (exit 2), warnings, and 2 processes == 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qsched.card import ScheduleCard
from qsched.cli import main
from qsched.quant import parse_preset
from qsched.schedule import QSchedCoefficients


@pytest.fixture
def base(tiny_pipeline_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na shoe\n")
    return ["evaluate", "--model", str(tiny_pipeline_path("lcm")), "--prompts", str(prompts), "--steps", "2",
            "--height", "32", "--width", "32", "--configs", "fp,w4a8", "--metrics", "mse", "--no-progress"]


@pytest.mark.parametrize("extra, message", [
    (["--configs", "fp,w9a9"], "unknown configuration 'w9a9'"),
    (["--metrics", "fid,lpips"], "unknown metric 'lpips'"),
    (["--num", "0"], "--num must be a positive integer, got 0"),
    (["--configs", "w4a8+card"], "needs a schedule card for recipe 'w4a8'"),
    (["--scorer-weights", "pickscore"], "--scorer-weights takes SCORER=PATH"),
    (["--metrics", "mse,pickscore", "--scorer-weights", "pickscore=/nonexistent/ps"], "metric pickscore: "),
])
def test_bad_input_is_one_line_exit_2(base, tmp_path, capsys, extra, message):
    assert main([*base, *extra, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_card_for_another_model_is_refused(base, tmp_path, capsys):
    card = ScheduleCard(coefficients=QSchedCoefficients.identity(2), model="/models/other", family="lcm",
                        quant=parse_preset("w4a8").to_dict(), steps=2)
    path = card.save(tmp_path / "card.json")
    code = main([*base, "--configs", "fp,w4a8+card", "--card", str(path), "--out", str(tmp_path / "out")])
    assert code == 2 and "calibrated for model '/models/other'" in capsys.readouterr().err


def test_num_above_the_prompt_count_warns_and_uses_all(base, tmp_path, capsys):
    assert main([*base, "--num", "10", "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "--num 10 is more than the 3 prompts" in captured.err
    assert "fp 3, w4a8 3" in captured.out


def test_two_processes_make_the_same_images_as_one(base, tmp_path):
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        # --num too: a launcher that re-parses our options once took it for its own --numa-binding
        command = [sys.executable, "-m", "qsched", *base, "--num", "3", "--batch-size", "1",
                   "--num-processes", str(processes), "--out", str(out)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[processes] = out
    for config in ("fp", "w4a8"):
        for index in range(3):
            name = f"images/{config}/{index:05d}.png"
            assert (runs[1] / name).read_bytes() == (runs[2] / name).read_bytes(), name
