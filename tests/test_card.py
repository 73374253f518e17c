from __future__ import annotations

import json

import pytest

from qsched.card import CARD_VERSION, ScheduleCard
from qsched.errors import QSchedError
from qsched.schedule import QSchedCoefficients


def make_card(**overrides):
    values = dict(
        coefficients=QSchedCoefficients.from_ramps(cx_start=1.05, ceps_start=0.95, num_steps=4),
        model="/models/lcm",
        family="lcm",
        quant={"weight_bits": 4, "act_bits": 8},
        steps=4,
        guidance_scale=8.0,
        seed=0,
        parametrization={"space": "ramp", "cx_start": 1.05, "ceps_start": 0.95},
        objective={"name": "jaq", "k": 1.0, "value": 0.31, "baseline": 0.29},
        prompts={"source": "prompts.txt", "sha256": "ab" * 32, "count": 16},
    )
    values.update(overrides)
    return ScheduleCard(**values)


def test_round_trip(tmp_path):
    card = make_card()
    path = card.save(tmp_path / "card.json")
    loaded = ScheduleCard.load(path)
    assert loaded == card
    document = json.loads(path.read_text())
    assert document["format"] == "qsched-schedule-card" and document["version"] == CARD_VERSION
    assert "torch" in document["versions"] and "python" in document["versions"]


def test_check_names_the_mismatch(tmp_path):
    path = make_card().save(tmp_path / "card.json")
    ScheduleCard.load(path, family="lcm", steps=4)
    with pytest.raises(QSchedError, match="family 'lcm', not 'flux-schnell'"):
        ScheduleCard.load(path, family="flux-schnell")
    with pytest.raises(QSchedError, match="calibrated for 4 steps, not 2"):
        ScheduleCard.load(path, steps=2)


def test_steps_must_match_coefficients():
    with pytest.raises(QSchedError, match="steps=2 but its coefficients have 4"):
        make_card(steps=2)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(version=99), "version 99 is not supported"),
        (lambda d: d.update(format="other"), "not a schedule card"),
        (lambda d: d.pop("family"), r"missing fields \['family'\]"),
        (lambda d: d.update(extra=1), r"unknown fields \['extra'\]"),
        (lambda d: d.update(steps="4"), "'steps' must be a positive integer, got '4'"),
        (lambda d: d["coefficients"]["c_x"].__setitem__(0, -1.0), r"c_x\[0\]"),
    ],
)
def test_schema_errors(tmp_path, mutate, message):
    document = make_card().to_dict()
    mutate(document)
    path = tmp_path / "card.json"
    path.write_text(json.dumps(document))
    with pytest.raises(QSchedError, match=message):
        ScheduleCard.load(path)


def test_truncated_and_missing(tmp_path):
    path = make_card().save(tmp_path / "card.json")
    path.write_text(path.read_text()[:40])
    with pytest.raises(QSchedError, match="not valid JSON"):
        ScheduleCard.load(path)
    with pytest.raises(QSchedError, match="does not exist"):
        ScheduleCard.load(tmp_path / "nope.json")


def test_for_recipe_transplants_on_purpose_and_says_so(tmp_path):
    card = make_card()
    fp = {"name": "fp", "weight_bits": 16, "act_bits": 16}
    moved = card.for_recipe(fp, note="w4a8 coefficients on fp (control)")
    assert moved.quant == fp and moved.coefficients == card.coefficients and moved.steps == card.steps
    assert moved.objective == card.objective and moved.created == card.created
    assert moved.parametrization["transplanted_from"] == {"quant": dict(card.quant), "note": "w4a8 coefficients on fp (control)"}
    assert moved.parametrization["cx_start"] == 1.05
    path = moved.save(tmp_path / "moved.json")
    assert ScheduleCard.load(path) == moved
    assert card.for_recipe(fp, note="w4a8 coefficients on fp (control)").save(tmp_path / "again.json").read_bytes() == path.read_bytes()
    back = moved.for_recipe(card.quant)  # the origin stays the recipe the coefficients were calibrated for
    assert back.parametrization["transplanted_from"]["quant"] == dict(card.quant)
    with pytest.raises(QSchedError, match="already for recipe"):
        card.for_recipe(dict(card.quant))
