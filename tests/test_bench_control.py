"""The statistics of benchmarks/bench_control.py (the control study), on hand-computed numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from qsched.errors import QSchedError

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_control.py"
_spec = importlib.util.spec_from_file_location("bench_control", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up while the class is made
_spec.loader.exec_module(bench)


def test_t_interval_by_hand():
    # mean 2, std 1, n 3: t(0.975, df 2) = 4.302653, half-width 4.302653 / sqrt(3) = 2.484138
    low, high = bench.t_interval([1.0, 2.0, 3.0])
    assert low == pytest.approx(2 - 2.484138, abs=1e-6) and high == pytest.approx(2 + 2.484138, abs=1e-6)
    # n 5, values 0, 2, 4, 6, 8: mean 4, std sqrt(10); t(0.975, 4) = 2.776445; half 2.776445 * sqrt(2) = 3.926486
    summary = bench.summarize([0.0, 2.0, 4.0, 6.0, 8.0])
    assert (summary.mean, summary.n) == (4.0, 5) and summary.std == pytest.approx(math.sqrt(10))
    assert (summary.low, summary.high) == pytest.approx((4 - 3.926486, 4 + 3.926486), abs=1e-6)
    assert summary.text() == "+4.00 ± 3.16 [+0.07, +7.93]"
    # 90%: t(0.95, 2) = 2.919986
    assert bench.t_interval([1.0, 2.0, 3.0], confidence=0.9)[1] == pytest.approx(2 + 2.919986 / math.sqrt(3), abs=1e-6)


def test_one_seed_has_no_interval():
    summary = bench.summarize([1.5])
    assert summary.mean == 1.5 and summary.n == 1
    assert all(math.isnan(v) for v in (summary.std, summary.low, summary.high))


def test_paired_contrast_and_gain_by_hand():
    values = {"fp": [100.0, 200.0], "fp+card": [90.0, 190.0], "w4a8": [110.0, 220.0], "w4a8+card": [95.0, 200.0]}
    change = {"w4a8": 1.0, "fp": -1.0}
    assert bench.paired_contrast(values, change, relative_to=None) == [10.0, 20.0]
    assert bench.paired_contrast(values, change) == pytest.approx([10.0, 10.0])  # percent of fp, same seed
    gain = bench.contrasts(["fp", "w4a8"], [])["G_w4a8 = (w4a8+card - w4a8) - (fp+card - fp)"]
    # seed 0: (95 - 110) - (90 - 100) = -5 -> -5%; seed 1: (200 - 220) - (190 - 200) = -10 -> -5%
    assert bench.paired_contrast(values, gain, relative_to=None) == [-5.0, -10.0]
    assert bench.paired_contrast(values, gain) == pytest.approx([-5.0, -5.0])
    with pytest.raises(ValueError, match="different numbers of seeds"):
        bench.paired_contrast({**values, "w4a8": [1.0]}, change)


def test_contrasts_list_the_study():
    rows = bench.contrasts(["fp", "w4a8", "w4a4"], ["w4a8"])
    assert list(rows) == [
        "fp+card - fp", "w4a8 - fp", "w4a8+card - fp", "w4a4 - fp", "w4a4+card - fp",
        "w4a8+fpcard - fp", "fp+w4a8card - fp",
        "G_w4a8 = (w4a8+card - w4a8) - (fp+card - fp)", "G_w4a4 = (w4a4+card - w4a4) - (fp+card - fp)",
        "w4a8+fpcard - w4a8+card", "fp+w4a8card - fp+card",
    ]
    assert rows["w4a8+fpcard - w4a8+card"] == {"w4a8+fpcard": 1.0, "w4a8+card": -1.0}
    assert all(sum(weights.values()) == 0 for weights in rows.values())  # a contrast: equal values give 0


def test_settings_refuse_a_study_without_its_control(tmp_path):
    with pytest.raises(QSchedError, match="must include fp"):
        bench.ControlSettings(model="builtin", out=tmp_path, recipes=("w4a8",), cross=())
    with pytest.raises(QSchedError, match="--cross takes quantized recipes"):
        bench.ControlSettings(model="builtin", out=tmp_path, recipes=("fp", "w4a4"), cross=("w4a8",))


def test_summary_table_lines_up_studies(tmp_path, capsys, monkeypatch):
    def contrast(mean, low=None, high=None):
        return {"mean": mean, "low": low, "high": high}

    def card(c_x, c_eps):
        return {"c_x": [c_x, 1.0], "c_eps": [c_eps, 1.0], "steps": 2}

    record = {
        "settings": {"model": "builtin-flow", "steps": 2, "seeds": 5, "num": 300, "recipes": ["fp", "w4a8"]},
        "cards": {"fp+card": card(0.8, 1.2), "w4a8+card": card(0.9, 1.1), "w4a8+fpcard": card(0.8, 1.2)},
        "contrasts": {
            "fp+card - fp": {"fid": contrast(-44.4, -46.0, -42.8), "clipiqa": contrast(9.11, 8.93, 9.29)},
            "w4a8 - fp": {"fid": contrast(8.5, 7.0, 10.0)},
            "G_w4a8 = (w4a8+card - w4a8) - (fp+card - fp)": {"fid": contrast(7.38), "clipiqa": contrast(0.61, 0.44, 0.78)},
        },
    }
    table = bench.summary_table([record]).splitlines()
    assert table[0].startswith("| model | steps | seeds × prompts | cards (c_x, c_eps starts) | card on fp fid | G(w4a8) fid")
    assert table[2] == ("| builtin-flow | 2 | 5 × 300 | fp 0.8, 1.2; w4a8 0.9, 1.1 | -44.40 [-46.00, -42.80] | +7.38 | — "
                        "| +9.11 [+8.93, +9.29] | +0.61 [+0.44, +0.78] | — |")  # one seed: no interval; no w4a4: a dash

    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "control.json").write_text(json.dumps(record))
    monkeypatch.setattr(sys, "argv", ["bench_control.py", "--summarize", str(tmp_path / "study")])
    bench.main()
    assert capsys.readouterr().out.splitlines()[2] == table[2]
    monkeypatch.setattr(sys, "argv", ["bench_control.py", "--summarize", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2 and "no control.json in" in capsys.readouterr().err
