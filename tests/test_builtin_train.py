from __future__ import annotations

import json

import torch
from safetensors import safe_open

from qsched.builtin.data import write_fake_dataset
from qsched.builtin.pipeline import QSchedBuiltinPipeline
from qsched.builtin.train import main

TINY = ["--shape", "tiny", "--max-templates", "1", "--batch-size", "4", "--log-every", "1"]


def test_teacher_resume_and_student(tmp_path):
    data = str(write_fake_dataset(tmp_path / "data", n=16))
    out = tmp_path / "teacher"
    assert main(["teacher", "--steps", "3", "--out", str(out), "--data-root", data, *TINY]) == 0
    meta = json.loads((out / "checkpoint" / "state.json").read_text())
    assert meta["step"] == 3 and (out / "checkpoint" / "state.safetensors").is_file()
    assert "step 3/3" in (out / "train.log").read_text()
    # an existing checkpoint without --resume is refused; with --resume training continues
    assert main(["teacher", "--steps", "5", "--out", str(out), "--data-root", data, *TINY]) == 2
    assert main(["teacher", "--steps", "5", "--out", str(out), "--data-root", data, "--resume", *TINY]) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 5
    assert "resumed from step 3" in (out / "train.log").read_text()

    student = tmp_path / "student"
    args = ["student", "--teacher", str(out / "pipeline"), "--out", str(student), "--data-root", data, *TINY]
    assert main([*args, "--steps", "2"]) == 0
    pipe = QSchedBuiltinPipeline.from_pretrained(str(student / "pipeline"))
    assert pipe.is_distilled and type(pipe.scheduler).__name__ == "LCMScheduler"

    shipped = tmp_path / "assets" / "student"
    assert main(["ship", str(student / "pipeline"), str(shipped)]) == 0
    with safe_open(str(shipped / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    assert QSchedBuiltinPipeline.from_pretrained(str(shipped)).unet.dtype == torch.float32


def test_missing_dataset_exit_code(tmp_path):
    assert main(["teacher", "--steps", "1", "--out", str(tmp_path / "t"), "--data-root", str(tmp_path), *TINY]) == 2
