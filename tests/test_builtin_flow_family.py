"""The built-in flow model as families (builtin-flow, builtin-flow-teacher): detection, shipped
weights, the Q-Sched wrapper, quantization and `qsched generate` on it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from flow_helpers import save_tiny_flow

from qsched import families
from qsched.card import ScheduleCard
from qsched.cli import main as cli_main
from qsched.errors import QSchedError
from qsched.families import detect_family, get_family, load_pipeline
from qsched.prepare import prepare_pipeline
from qsched.quant import parse_preset
from qsched.schedule import QSchedCoefficients
from qsched.scheduler import wrap


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory):
    return save_tiny_flow(tmp_path_factory.mktemp("flow") / "student", distilled=True)


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    return save_tiny_flow(tmp_path_factory.mktemp("flow") / "teacher", distilled=False)


def test_folders_are_detected(student_folder, teacher_folder):
    student, teacher = load_pipeline(student_folder), load_pipeline(teacher_folder)
    assert student.family.name == "builtin-flow" and teacher.family.name == "builtin-flow-teacher"
    assert detect_family(student.pipe).name == "builtin-flow"
    assert detect_family(teacher.pipe).name == "builtin-flow-teacher"
    assert type(student.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert student.pipe.scheduler.config.shift == 1.0 and not student.pipe.scheduler.config.use_dynamic_shifting
    spec = get_family("builtin-flow")
    assert spec.denoiser_attr == "transformer" and spec.allowed_steps == (1, 2, 4) and spec.default_steps == 4


def test_missing_shipped_weights_are_one_clear_line(student_folder, monkeypatch, tmp_path, capsys):
    def ship_at(folder):
        spec = dataclasses.replace(get_family("builtin-flow"), default_folder=str(folder))
        monkeypatch.setitem(families._REGISTRY, "builtin-flow", spec)

    ship_at(tmp_path / "missing")
    with pytest.raises(QSchedError, match=r"builtin-flow.*missing.*python -m qsched.builtin.train flow-student"):
        load_pipeline("builtin-flow")
    assert cli_main(["generate", "a coat", "--model", "builtin-flow", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "python -m qsched.builtin.train flow-student" in err
    ship_at(student_folder)
    assert load_pipeline("builtin-flow").source == str(student_folder.resolve())


def test_wrapper_identity_is_bit_identical_and_coefficients_act(student_folder):
    pipe = load_pipeline(student_folder).pipe
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe(["a sneaker", "a coat"], num_inference_steps=4, output_type="pt",
                    generator=[torch.Generator().manual_seed(i) for i in range(2)]).images

    reference = images()
    plain = pipe.scheduler
    pipe.scheduler = wrap(plain, QSchedCoefficients.identity(4))
    assert torch.equal(images(), reference)
    for cx, ceps in ((1.1, 1.0), (1.0, 0.9)):
        pipe.scheduler = wrap(plain, QSchedCoefficients.from_ramps(cx_start=cx, ceps_start=ceps, num_steps=4))
        assert not torch.equal(images(), reference)


def test_quantization_covers_the_transformer_linears(student_folder):
    prepared = prepare_pipeline(student_folder, recipe=parse_preset("w4a8"))
    assert prepared.family == "builtin-flow" and prepared.steps == 4 and prepared.guidance_scale == 3.0
    transformer = load_pipeline(student_folder).pipe.transformer
    block_linears = {name for name, m in transformer.named_modules()
                     if isinstance(m, torch.nn.Linear) and "transformer_blocks." in name}
    quantized = set(prepared.report.quantized_layers)
    assert block_linears and block_linears <= quantized  # attention, MLP and modulation layers of every block
    assert {"x_embedder", "context_embedder", "proj_out"}.isdisjoint(quantized)  # FLUX's default skip list


def test_generate_cli_with_w4a8_and_a_card(student_folder, tmp_path, capsys):
    card = tmp_path / "card.json"
    ScheduleCard(coefficients=QSchedCoefficients.from_ramps(cx_start=1.1, ceps_start=0.9, num_steps=4),
                 model="tiny", family="builtin-flow", quant=parse_preset("w4a8").to_dict(), steps=4).save(card)
    code = cli_main(["generate", "a sneaker", "an ankle boot", "--model", str(student_folder), "--quant", "w4a8",
                     "--card", str(card), "--out", str(tmp_path / "out"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "wrote 2 images" in out
    records = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert [r["quant"] for r in records] == ["w4a8", "w4a8"] and records[0]["card"] == str(card)
    assert (tmp_path / "out" / "00001.png").is_file()
    code = cli_main(["generate", "a sneaker", "--model", str(student_folder), "--quant", "w4a8",
                     "--out", str(tmp_path / "plain"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
