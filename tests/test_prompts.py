from __future__ import annotations

import json

import pytest

from qsched.errors import QSchedError
from qsched.prompts import prompt_source, read_prompts

EXPECTED = ["a red sneaker", "an ankle boot"]


@pytest.mark.parametrize(
    "name, text",
    [
        ("p.txt", "a red sneaker\n\n  an ankle boot  \n"),
        ("p.json", json.dumps(EXPECTED)),
        ("meta_data.json", json.dumps({"0a1": {"category": "x", "prompt": EXPECTED[0]}, "0b2": {"category": "y", "prompt": EXPECTED[1]}})),
        ("captions_val2017.json", json.dumps({"images": [], "annotations": [{"image_id": 1, "caption": EXPECTED[0]}, {"image_id": 2, "caption": EXPECTED[1]}]})),
        ("sdci.yaml", "k1: a red sneaker\nk2: an ankle boot\n"),
        ("p.yml", "- a red sneaker\n- an ankle boot\n"),
        ("p.csv", "id,prompt\n1,a red sneaker\n2,an ankle boot\n3,\n"),
    ],
)
def test_formats(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert read_prompts(path) == EXPECTED


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("p.txt", "\n \n", "holds no prompts"),
        ("p.md", "x", "not recognised"),
        ("p.json", "[1, 2", "not valid JSON"),
        ("p.json", "[{\"text\": 1}]", "'prompt' string"),
        ("p.csv", "caption\nx\n", "'prompt' column"),
        ("p.yaml", "a: [b", "not valid YAML"),
    ],
)
def test_bad_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(QSchedError, match=message):
        read_prompts(path)


def test_missing_file(tmp_path):
    with pytest.raises(QSchedError, match="does not exist"):
        read_prompts(tmp_path / "none.txt")


def test_prompt_source_hash(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\nb\n")
    info = prompt_source(path)
    assert info["count"] == 2 and len(info["sha256"]) == 64
    path.write_text("a\nc\n")
    assert prompt_source(path)["sha256"] != info["sha256"]
