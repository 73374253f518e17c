from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from qsched.card import ScheduleCard
from qsched.errors import QSchedError
from qsched.generate import batches, generate_to_folder, image_seed
from qsched.prepare import ModelOptions, prepare_pipeline
from qsched.quant import parse_preset
from qsched.schedule import QSchedCoefficients

PROMPTS = ["a red shoe", "a blue bag", "a grey coat"]


def prepared(path, *, card=None, steps=2):
    return prepare_pipeline(path, recipe=parse_preset("w8a8"), card=card,
                            options=ModelOptions(steps=steps, height=32, width=32))


def pixels(folder, index):
    return np.asarray(Image.open(folder / f"{index:05d}.png"), dtype=np.int16)


def test_image_seed_is_a_function_of_seed_and_index():
    assert image_seed(0, 1) == image_seed(0, 1)
    seeds = {image_seed(s, i) for s in range(3) for i in range(50)}
    assert len(seeds) == 150 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(QSchedError):
        image_seed(-1, 0)


def test_batches_cover_range():
    assert [list(b) for b in batches(5, 2)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(QSchedError, match="batch size"):
        list(batches(3, 0))


def test_images_do_not_depend_on_batch_size(tiny_pipeline_path, tmp_path):
    pipe = prepared(tiny_pipeline_path("sdxl-turbo"))  # ancestral sampler: noise at every step
    generate_to_folder(pipe, PROMPTS, out=tmp_path / "b1", batch_size=1, progress=False)
    records = generate_to_folder(pipe, PROMPTS, out=tmp_path / "b3", batch_size=3, progress=False)
    for i in range(len(PROMPTS)):
        # batched matmuls may round differently; the noise is the same, so pixels agree to 1 level
        assert np.abs(pixels(tmp_path / "b1", i) - pixels(tmp_path / "b3", i)).max() <= 1
    assert not np.array_equal(pixels(tmp_path / "b1", 0), pixels(tmp_path / "b1", 1))
    assert [r["file"] for r in records] == ["00000.png", "00001.png", "00002.png"]
    assert records[2] == {
        "file": "00002.png", "index": 2, "prompt": "a grey coat", "seed": 0, "image_seed": image_seed(0, 2),
        "steps": 2, "guidance_scale": 0.0, "quant": "w8a8", "card": None,
    }
    assert json.loads((tmp_path / "b3" / "metadata.json").read_text()) == records
    run = json.loads((tmp_path / "b3" / "run.json").read_text())
    assert run["family"] == "sdxl-turbo" and run["quant"]["name"] == "w8a8" and "torch" in run["versions"]


def test_card_changes_images_and_is_checked(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("lcm")
    card = ScheduleCard(
        coefficients=QSchedCoefficients.from_ramps(cx_start=1.2, ceps_start=0.8, num_steps=2),
        model=str(path), family="lcm", quant=parse_preset("w8a8").to_dict(), steps=2,
    )
    plain = generate_to_folder(prepared(path), PROMPTS[:1], out=tmp_path / "plain", progress=False)
    generate_to_folder(prepared(path, card=card), PROMPTS[:1], out=tmp_path / "card", progress=False)
    assert plain[0]["image_seed"] == image_seed(0, 0)
    assert not np.array_equal(pixels(tmp_path / "plain", 0), pixels(tmp_path / "card", 0))
    with pytest.raises(QSchedError, match="calibrated for 2 steps, not 4"):
        prepared(path, card=card, steps=4)
    with pytest.raises(QSchedError, match="family 'lcm', not 'pcm-sd15'"):
        prepared(tiny_pipeline_path("pcm-sd15"), card=card)


def test_existing_output_folder_is_refused_unless_overwrite(tiny_pipeline_path, tmp_path):
    pipe = prepared(tiny_pipeline_path("lcm"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(QSchedError, match="not empty; pass --overwrite"):
        generate_to_folder(pipe, PROMPTS[:1], out=out, progress=False)
    (out / "00007.png").write_bytes(b"stale")
    generate_to_folder(pipe, PROMPTS[:1], out=out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "metadata.json", "notes.txt", "run.json"]
