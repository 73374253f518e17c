from __future__ import annotations

import pytest

from qsched.evaluate.report import relative_change, results_table


def test_relative_change_is_against_fp():
    results = {
        "fp": {"fid": {"value": 20.0, "status": "ok"}, "mse": {"value": 0.0, "status": "ok"}},
        "w4a8": {"fid": {"value": 25.0, "status": "ok"}, "mse": {"value": 0.01, "status": "ok"}},
        "w4a8+qsched": {"fid": {"value": 18.0, "status": "ok"}, "mse": {"value": None, "status": "failed", "error": "x"}},
    }
    table = results_table(results, ["fid", "mse"])
    lines = table.splitlines()
    assert lines[0] == "| configuration | FID ↓ | MSE to fp ↓ |"
    assert "| `fp` | 20 | 0 |" in lines
    assert "| `w4a8` | 25 (+25.0%) | 0.01 |" in lines  # no relative change against an fp value of 0
    assert "| `w4a8+qsched` | 18 (-10.0%) | failed |" in lines
    assert relative_change(5.0, None) is None and relative_change(5.0, 0.0) is None
    assert relative_change(9.0, -10.0) == pytest.approx(190.0)
