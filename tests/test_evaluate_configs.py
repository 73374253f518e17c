from __future__ import annotations

import pytest

from qsched.errors import QSchedError
from qsched.evaluate import parse_configs, parse_metrics
from qsched.quant import parse_preset


def test_names_parse_into_frozen_configs_with_fp_first():
    configs = parse_configs("w4a8,w4a8+qsched,w4a4+ptqd")
    assert [c.name for c in configs] == ["fp", "w4a8", "w4a8+qsched", "w4a4+ptqd"]
    assert configs[0].is_fp and configs[1].recipe == parse_preset("w4a8")
    assert [c.correction for c in configs] == ["none", "none", "qsched", "ptqd"]
    assert configs[2].card is None  # calibrated first
    with pytest.raises(Exception):
        configs[0].name = "x"  # frozen


def test_card_is_matched_to_its_recipe():
    recipes = {"a.json": parse_preset("w4a8"), "b.json": parse_preset("w4a4")}
    configs = parse_configs("fp,w4a4+card,w4a8+qsched", cards=["a.json", "b.json"], card_recipes=recipes)
    assert configs[1].card == "b.json" and configs[2].card == "a.json"


@pytest.mark.parametrize("names, message", [
    ("fp,w5a5", "unknown configuration 'w5a5'"),
    ("w4a8+magic", "unknown correction .+magic."),
    ("w4a8+card", "needs a schedule card for recipe 'w4a8'"),
    ("fp+ptqd", "PTQD corrects a quantized model"),
    ("w4a8,w4a8", "listed twice"),
    ("", "no configurations"),
])
def test_bad_names_are_refused(names, message):
    with pytest.raises(QSchedError, match=message):
        parse_configs(names)


def test_metrics_parse_and_refuse_unknown():
    assert parse_metrics("fid, clip,fid") == ("fid", "clip")
    with pytest.raises(QSchedError, match="unknown metric 'lpips'; allowed: fid, mse, size, .*clip, clipiqa"):
        parse_metrics("fid,lpips")


def test_reference_presets_are_configurations():
    configs = parse_configs("w4a8-ref,w4a4-ref+ptqd")
    assert [c.name for c in configs] == ["fp", "w4a8-ref", "w4a4-ref+ptqd"]
    assert configs[1].recipe == parse_preset("w4a8-ref") and configs[2].correction == "ptqd"
