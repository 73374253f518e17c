"""The built-in model as a family: detection, `--model builtin`, and the generic tools on it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qsched import families
from qsched.errors import QSchedError
from qsched.families import get_family, load_pipeline
from qsched.generate import generate_to_folder
from qsched.prepare import prepare_pipeline
from qsched.quant import parse_preset
from qsched.schedule import QSchedCoefficients
from qsched.scheduler import wrap


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory):
    from qsched.builtin.pipeline import QSchedBuiltinPipeline
    from qsched.builtin.unet import SHAPES, make_student_scheduler, make_unet

    torch.manual_seed(0)
    pipe = QSchedBuiltinPipeline(unet=make_unet(SHAPES["tiny"], guidance_embedding=True).eval(),
                                 scheduler=make_student_scheduler())
    folder = tmp_path_factory.mktemp("builtin") / "student"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def shipped_at(monkeypatch):
    """Point the builtin family's shipped folder somewhere else for one test."""

    def set_folder(folder):
        spec = dataclasses.replace(get_family("builtin"), default_folder=str(folder))
        monkeypatch.setitem(families._REGISTRY, "builtin", spec)

    return set_folder


def test_folder_is_detected_as_builtin(student_folder):
    loaded = load_pipeline(student_folder)
    assert loaded.family.name == "builtin"
    assert type(loaded.pipe.scheduler).__name__ == "LCMScheduler"


def test_model_name_builtin_loads_the_shipped_folder(student_folder, shipped_at, tmp_path):
    shipped_at(student_folder)
    assert load_pipeline("builtin").source == str(student_folder.resolve())
    shipped_at(tmp_path / "missing")
    with pytest.raises(QSchedError, match="python -m qsched.builtin.train student"):
        load_pipeline("builtin")


def test_wrapper_is_bit_identical_on_the_builtin_pipeline(student_folder):
    pipe = load_pipeline(student_folder).pipe
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe(["a sneaker", "a coat"], num_inference_steps=4, output_type="pt",
                    generator=[torch.Generator().manual_seed(i) for i in range(2)]).images

    reference = images()
    plain = pipe.scheduler
    pipe.scheduler = wrap(plain, QSchedCoefficients.identity(4))
    assert torch.equal(images(), reference)
    pipe.scheduler = wrap(plain, QSchedCoefficients.from_ramps(cx_start=1.15, ceps_start=0.85, num_steps=4))
    assert not torch.equal(images(), reference)


def test_generate_quantized_builtin(student_folder, tmp_path):
    prepared = prepare_pipeline(student_folder, recipe=parse_preset("w4a8"))
    assert prepared.family == "builtin" and prepared.steps == 4 and prepared.guidance_scale == 3.0
    assert prepared.report.quantized_params > 0
    records = generate_to_folder(prepared, ["a sneaker", "an ankle boot"], out=tmp_path / "out", progress=False)
    assert [r["quant"] for r in records] == ["w4a8", "w4a8"]
    assert (tmp_path / "out" / "00001.png").is_file()
