"""Choosing a distillation's stopping point from validation metrics of its snapshots."""

from __future__ import annotations

import json

import pytest

from qsched.builtin import stopping as S
from qsched.errors import QSchedError


def _write(folder, name, fid, zs, *, split="validation", steps=4, source=None):
    (folder / name).mkdir(parents=True)
    record = {"source": source or str(folder / name), "split": split,
              "runs": {str(steps): {"fid_effnet": fid, "zero_shot_accuracy": zs, "clip_iqa_noisiness": 0.9}}}
    (folder / name / "metrics.json").write_text(json.dumps(record))


@pytest.fixture
def run(tmp_path):
    """A run with snapshots at 25/50/75 and a final pipeline whose checkpoint says step 100."""
    train = tmp_path / "train"
    (train / "checkpoint").mkdir(parents=True)
    (train / "checkpoint" / "state.json").write_text(json.dumps({"step": 100}))
    val = tmp_path / "val" / "r"
    _write(val, "step-00025", 660.0, 0.95)
    _write(val, "step-00050", 640.0, 0.92)  # best FID, but below the zero-shot bar
    _write(val, "step-00075", 650.0, 0.94)
    _write(val, "pipeline", 645.0, 0.93, source=str(train / "pipeline"))
    return val


def test_read_run_orders_snapshots_and_reads_the_final_step_from_the_checkpoint(run):
    rows = S.read_run(run)
    assert [r.step for r in rows] == [25, 50, 75, 100] and rows[-1].fid == 645.0


def test_pick_lowest_fid_among_those_reaching_the_zero_shot_bar(run):
    rows = S.read_run(run)
    assert S.pick(rows, min_zero_shot=0.93).step == 100  # 645 < 650; step 50 (640) is below the bar
    assert S.pick(rows, min_zero_shot=0.94).step == 75
    assert S.pick(rows, min_zero_shot=0.99).step == 25  # none reaches it: the highest zero-shot
    assert S.pick(rows, min_zero_shot=0.0).step == 50


def test_only_validation_measurements_are_accepted(tmp_path):
    _write(tmp_path / "r", "step-00010", 600.0, 0.95, split="evaluation")
    with pytest.raises(QSchedError, match="validation"):
        S.read_run(tmp_path / "r")


def test_missing_step_count_and_empty_folders_are_explained(run, tmp_path):
    with pytest.raises(QSchedError, match="no 8-step row"):
        S.read_run(run, steps=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QSchedError, match="no snapshot metrics"):
        S.read_run(tmp_path / "empty")


def test_cli_table_pick_labels_and_plot(run, tmp_path, capsys):
    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps({"runs": {"25": {"fid_effnet": 600.0}}}))
    png = tmp_path / "curve.png"
    assert S.main([f"my run={run}", "--reference", str(teacher), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| my run | 100 | 645.0 | +7.5% | 0.930 |" in out and "chosen: my run step 100" in out
    assert f"\npipeline: {tmp_path / 'train' / 'pipeline'}\n" in out  # what to measure on the evaluation split
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert S.main([str(tmp_path / "absent")]) == 2


def test_cli_draws_other_measurements_at_the_same_step_count(run, tmp_path, capsys):
    ddim = tmp_path / "ddim4.json"
    ddim.write_text(json.dumps({"runs": {"4": {"fid_effnet": 620.0}}}))
    png = tmp_path / "curve.png"
    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps({"runs": {"25": {"fid_effnet": 600.0}}}))
    assert S.main([str(run), "--line", f"teacher, 4 DDIM steps={ddim}", "--reference", str(teacher),
                   "--plot", str(png)]) == 0
    assert "teacher, 4 DDIM steps: FID 620.0 (+3.3% vs reference)" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert S.read_line(f"x={ddim}", steps=4) == ("x", 620.0)
    with pytest.raises(QSchedError, match="no 8-step row"):
        S.read_line(f"x={ddim}", steps=8)
    assert S.main([str(run), "--line", str(ddim)]) == 2
    assert "LABEL=METRICS_JSON" in capsys.readouterr().err
