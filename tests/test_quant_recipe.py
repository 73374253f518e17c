from __future__ import annotations

import dataclasses
import json

import pytest

from qsched.errors import QSchedError
from qsched.quant import DEFAULT_SKIP, PRESETS, QuantRecipe, parse_preset


@pytest.mark.parametrize(
    ("name", "w", "a"),
    [("fp", 16, 16), ("w8a8", 8, 8), ("w4a8", 4, 8), ("w4a4", 4, 4), ("w4a16", 4, 16), ("w8a16", 8, 16)],
)
def test_presets(name: str, w: int, a: int) -> None:
    recipe = parse_preset(name)
    assert (recipe.weight_bits, recipe.act_bits, recipe.group_size) == (w, a, None)
    assert recipe.module_types == ("Linear", "Conv2d")
    assert recipe.skip == DEFAULT_SKIP
    assert recipe.name == name
    assert parse_preset(f"  {name.upper()} ") is recipe


def test_unknown_preset_lists_allowed() -> None:
    with pytest.raises(QSchedError, match=r"'w3a8'.*fp, w8a8, w4a8, w4a4, w4a16, w8a16"):
        parse_preset("w3a8")


@pytest.mark.parametrize("field", ["weight_bits", "act_bits"])
@pytest.mark.parametrize("bad", [2, 3, 6, 32, 0, -8, 8.0, "8", True])
def test_bits_outside_allowed_set(field: str, bad: object) -> None:
    with pytest.raises(QSchedError, match=rf"{field}={bad!r}.*allowed: 4, 8 or 16"):
        QuantRecipe(**{field: bad})


@pytest.mark.parametrize("bad", [0, -32, 1.5, "64", True])
def test_bad_group_size(bad: object) -> None:
    with pytest.raises(QSchedError, match="group_size"):
        QuantRecipe(weight_bits=4, group_size=bad)


def test_group_size_without_weight_quantization() -> None:
    with pytest.raises(QSchedError, match="weight_bits=16"):
        QuantRecipe(weight_bits=16, act_bits=8, group_size=32)


def test_module_types_and_skip_validation() -> None:
    with pytest.raises(QSchedError, match=r"module_types.*'Conv1d'.*allowed"):
        QuantRecipe(module_types=("Linear", "Conv1d"))
    with pytest.raises(QSchedError, match="module_types"):
        QuantRecipe(module_types=())
    with pytest.raises(QSchedError, match=r"did you mean \('conv_in',\)"):
        QuantRecipe(skip="conv_in")  # type: ignore[arg-type]
    recipe = QuantRecipe(module_types=["Linear"], skip=["a*"])  # type: ignore[arg-type]
    assert recipe.module_types == ("Linear",) and recipe.skip == ("a*",)
    hash(recipe)  # frozen and hashable after list -> tuple normalisation


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        PRESETS["w4a8"].weight_bits = 8  # type: ignore[misc]


def test_custom_names() -> None:
    assert QuantRecipe(weight_bits=4, act_bits=8, group_size=64).name == "w4a8-g64"
    assert QuantRecipe(weight_bits=8, act_bits=8, module_types=("Linear",)).name == "w8a8-Linear"
    assert QuantRecipe(weight_bits=4, act_bits=4, skip=()).name == "w4a4-noskip"
    assert QuantRecipe(weight_bits=16, act_bits=8).name == "w16a8"
    assert QuantRecipe(weight_bits=4, act_bits=4, act_groups=4).name == "w4a4-ag4"
    assert QuantRecipe(weight_bits=8, act_bits=8, full_range=True, act_symmetric=False).name == "w8a8-full-asym"


def test_dict_round_trip_is_json_safe() -> None:
    extra = QuantRecipe(weight_bits=4, group_size=32, skip=("x*",), act_symmetric=False, act_groups=2)
    for recipe in [*PRESETS.values(), extra]:
        data = json.loads(json.dumps(recipe.to_dict()))
        assert data["symmetric"] is True and data["name"] == recipe.name
        assert QuantRecipe.from_dict(data) == recipe


def test_golden_dict() -> None:
    assert parse_preset("w4a8").to_dict() == {
        "name": "w4a8",
        "weight_bits": 4,
        "act_bits": 8,
        "group_size": None,
        "symmetric": True,
        "module_types": ["Linear", "Conv2d"],
        "skip": list(DEFAULT_SKIP),
        "full_range": False,
        "act_symmetric": True,
        "act_groups": 1,
    }
    assert parse_preset("w4a8-ref").to_dict() == {
        "name": "w4a8-ref",
        "weight_bits": 4,
        "act_bits": 8,
        "group_size": 32,
        "symmetric": True,
        "module_types": ["Linear"],
        "skip": [],
        "full_range": True,
        "act_symmetric": False,
        "act_groups": 1,
    }


def test_reference_presets() -> None:
    w4a8, w4a4 = parse_preset("W4A8-ref"), parse_preset("w4a4-ref")
    # torchao int8 dynamic activation + int4 weight, group 32, Linear only, asymmetric per-token activations
    assert (w4a8.weight_bits, w4a8.act_bits, w4a8.group_size, w4a8.module_types, w4a8.skip) == (4, 8, 32, ("Linear",), ())
    assert (w4a8.full_range, w4a8.act_symmetric, w4a8.act_groups) == (True, False, 1)
    # W4A4: int4 weights per row, symmetric int4 activations in 4 groups per token
    assert (w4a4.weight_bits, w4a4.act_bits, w4a4.group_size, w4a4.module_types, w4a4.skip) == (4, 4, None, ("Linear",), ())
    assert (w4a4.full_range, w4a4.act_symmetric, w4a4.act_groups) == (True, True, 4)
    # a recipe equal to a preset carries its name, wherever it was built
    assert QuantRecipe.from_dict(json.loads(json.dumps(w4a4.to_dict()))).name == "w4a4-ref"
    assert dataclasses.replace(w4a8, group_size=64).name == "w4a8-g64-full-asym-Linear-noskip"


def test_old_dicts_read_as_the_defaults() -> None:
    """Cards and packed headers written before full_range/act_symmetric/act_groups existed."""
    old = {"name": "w4a8", "weight_bits": 4, "act_bits": 8, "group_size": None, "symmetric": True,
           "module_types": ["Linear", "Conv2d"], "skip": list(DEFAULT_SKIP)}
    recipe = QuantRecipe.from_dict(old)
    assert recipe == parse_preset("w4a8") and recipe.name == "w4a8"
    assert (recipe.full_range, recipe.act_symmetric, recipe.act_groups) == (False, True, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(act_groups=0), "act_groups=0 is not supported"),
        (dict(act_groups=2.0), "act_groups=2.0 is not supported"),
        (dict(act_groups=True), "act_groups=True is not supported"),
        (dict(act_bits=16, act_groups=4), "act_bits=16"),
        (dict(act_bits=16, act_symmetric=False), "act_bits=16"),
        (dict(full_range=1), "full_range=1 must be True or False"),
        (dict(act_symmetric="no"), "act_symmetric='no' must be True or False"),
        (dict(weight_bits=16, act_bits=16, full_range=True), "nothing is quantized"),
    ],
)
def test_activation_options_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(QSchedError, match=message):
        QuantRecipe(**kwargs)


def test_from_dict_rejects_bad_input() -> None:
    with pytest.raises(QSchedError, match=r"unknown quant recipe keys \['bitz'\]"):
        QuantRecipe.from_dict({"weight_bits": 4, "act_bits": 8, "bitz": 3})
    with pytest.raises(QSchedError, match="lacks required keys"):
        QuantRecipe.from_dict({"weight_bits": 4})
    with pytest.raises(QSchedError, match="symmetric"):
        QuantRecipe.from_dict({"weight_bits": 4, "act_bits": 8, "symmetric": False})
    with pytest.raises(QSchedError, match="act_bits=5"):
        QuantRecipe.from_dict({"weight_bits": 4, "act_bits": 5})
    with pytest.raises(QSchedError, match="JSON object"):
        QuantRecipe.from_dict([4, 8])  # type: ignore[arg-type]
