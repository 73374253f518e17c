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


def test_pseudo_huber_per_image_and_per_element():
    from qsched.builtin.train_student import ict_huber_c, pseudo_huber

    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([3.0, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]).view(2, 1, 2, 2)
    # per image: ||a - b|| = 5 and 2; sqrt(25 + c^2) - c, sqrt(4 + c^2) - c
    c = 0.5
    expected = ((25 + c * c) ** 0.5 - c + (4 + c * c) ** 0.5 - c) / 2
    assert abs(float(pseudo_huber(a, b, c, "image")) - expected) < 1e-6
    # per element: mean over the 8 values of sqrt(d^2 + c^2) - c
    per = [((d * d + c * c) ** 0.5 - c) for d in (3, 4, 0, 0, 1, 1, 1, 1)]
    assert abs(float(pseudo_huber(a, b, c, "element")) - sum(per) / 8) < 1e-6
    # with a tiny c the per-element loss is the mean absolute error (an L1 loss)
    assert abs(float(pseudo_huber(a, b, 1e-6, "element")) - 11 / 8) < 1e-5
    assert abs(ict_huber_c(1024) - 0.00054 * 32) < 1e-12
    try:
        pseudo_huber(a, b, c, "pixel")
    except Exception as exc:  # QSchedError names the allowed values
        assert "image" in str(exc) and "pixel" in str(exc)
    else:
        raise AssertionError("an unknown reduction was accepted")


def test_student_records_its_loss(tmp_path):
    data = str(write_fake_dataset(tmp_path / "data", n=16))
    teacher = tmp_path / "teacher"
    assert main(["teacher", "--steps", "1", "--out", str(teacher), "--data-root", data, *TINY]) == 0
    for extra, c, reduction in (([], 0.00054 * 32, "image"),
                                (["--huber-c", "0.001", "--huber-reduction", "element"], 0.001, "element")):
        out = tmp_path / f"student-{reduction}"
        assert main(["student", "--teacher", str(teacher / "pipeline"), "--out", str(out), "--data-root", data,
                     "--steps", "1", *extra, *TINY]) == 0
        config = json.loads((out / "checkpoint" / "state.json").read_text())["config"]
        assert abs(config["huber_c"] - c) < 1e-9 and config["huber_reduction"] == reduction


def test_resumed_runs_equal_uninterrupted_runs(tmp_path):
    """Teacher and student: 2 steps + resume to 4 give the weights, EMA/target and AdamW state of 4 straight steps."""
    from safetensors.torch import load_file

    data = str(write_fake_dataset(tmp_path / "data", n=16))

    def run(stage, out, *extra):
        common = ["--out", str(out), "--data-root", data, *extra, *TINY]
        assert main([stage, *common, "--steps", "2"]) == 0
        assert main([stage, *common, "--steps", "4", "--resume"]) == 0
        straight = out.with_name(out.name + "-straight")
        assert main([stage, "--out", str(straight), "--data-root", data, *extra, *TINY, "--steps", "4"]) == 0
        a = load_file(str(out / "checkpoint" / "state.safetensors"))
        b = load_file(str(straight / "checkpoint" / "state.safetensors"))
        assert a.keys() == b.keys() and any(k.startswith("optim") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a)

    run("teacher", tmp_path / "teacher")
    run("student", tmp_path / "student", "--teacher", str(tmp_path / "teacher" / "pipeline"))


def test_resume_refuses_other_settings(tmp_path, capsys):
    """--resume continues the run the checkpoint holds: another recipe (student config), another
    data order (batch size, seed) or another stage exits 2 and leaves the checkpoint as it was;
    --steps, --threads and --snapshot-every may change."""
    data = str(write_fake_dataset(tmp_path / "data", n=16))
    teacher = tmp_path / "teacher"
    assert main(["teacher", "--steps", "1", "--out", str(teacher), "--data-root", data, *TINY]) == 0
    out = tmp_path / "student"
    common = ["student", "--teacher", str(teacher / "pipeline"), "--data-root", data, "--out", str(out), *TINY]
    assert main([*common, "--steps", "1"]) == 0
    state = (out / "checkpoint" / "state.safetensors").read_bytes()
    for extra, named in ((["--ddim-timesteps", "50"], "num_ddim_timesteps: 25 -> 50"),
                         (["--guidance-range", "1.5", "4.5"], "guidance_min: 4.5 -> 1.5"),
                         (["--lr", "1e-4"], "lr: 0.0002 -> 0.0001"), (["--seed", "1"], "seed: 0 -> 1"),
                         (["--batch-size", "2"], "batch_size: 4 -> 2")):
        assert main([*common, "--steps", "2", "--resume", *extra]) == 2
        err = capsys.readouterr().err
        assert named in err and "only --steps, --threads, --checkpoint-minutes, --log-every, --snapshot-every" in err
        assert (out / "checkpoint" / "state.safetensors").read_bytes() == state
    assert main(["teacher", "--steps", "2", "--out", str(out), "--data-root", data, *TINY, "--resume"]) == 2
    assert "of stage 'student', not 'teacher'" in capsys.readouterr().err
    assert main([*common, "--steps", "2", "--resume", "--threads", "2", "--snapshot-every", "1"]) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2


def test_snapshots_are_the_target_weights_of_a_run_stopped_there(tmp_path):
    """--snapshot-every 2 over 5 steps exports steps 2 and 4 (not 5: that is OUT/pipeline), each equal
    to the final export of a run of that many steps."""
    from safetensors.torch import load_file

    data = str(write_fake_dataset(tmp_path / "data", n=16))
    teacher = tmp_path / "teacher"
    assert main(["teacher", "--steps", "1", "--out", str(teacher), "--data-root", data, *TINY]) == 0
    common = ["student", "--teacher", str(teacher / "pipeline"), "--data-root", data, *TINY]
    out = tmp_path / "student"
    assert main([*common, "--out", str(out), "--steps", "5", "--snapshot-every", "2"]) == 0
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-00002", "step-00004"]
    short = tmp_path / "student-4"
    assert main([*common, "--out", str(short), "--steps", "4"]) == 0
    weights = "unet/diffusion_pytorch_model.safetensors"
    a = load_file(str(out / "snapshots" / "step-00004" / weights))
    b = load_file(str(short / "pipeline" / weights))
    final = load_file(str(out / "pipeline" / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], final[k]) for k in a)  # the target moved on after step 4
    assert QSchedBuiltinPipeline.from_pretrained(str(out / "snapshots" / "step-00002")).is_distilled
    assert main([*common, "--out", str(tmp_path / "bad"), "--steps", "1", "--snapshot-every", "-1"]) == 2


def test_student_grid_and_target_decay_options(tmp_path):
    data = str(write_fake_dataset(tmp_path / "data", n=16))
    teacher = tmp_path / "teacher"
    assert main(["teacher", "--steps", "1", "--out", str(teacher), "--data-root", data, *TINY]) == 0
    common = ["student", "--teacher", str(teacher / "pipeline"), "--data-root", data, "--steps", "1", *TINY]
    out = tmp_path / "student"
    assert main([*common, "--out", str(out), "--ddim-timesteps", "25", "--target-ema-decay", "0.9",
                 "--guidance-range", "3", "3", "--teacher-steps", "5"]) == 0
    config = json.loads((out / "checkpoint" / "state.json").read_text())["config"]
    assert config["num_ddim_timesteps"] == 25 and config["target_ema_decay"] == 0.9 and config["teacher_steps"] == 5
    assert config["guidance_min"] == config["guidance_max"] == 3.0
    # a grid that does not divide the 1000 timesteps, or a decay outside [0, 1): exit 2 before training
    assert main([*common, "--out", str(tmp_path / "bad1"), "--ddim-timesteps", "30"]) == 2
    assert main([*common, "--out", str(tmp_path / "bad2"), "--target-ema-decay", "1.0"]) == 2
    assert main([*common, "--out", str(tmp_path / "bad3"), "--guidance-range", "4", "2"]) == 2
    assert main([*common, "--out", str(tmp_path / "bad4"), "--ddim-timesteps", "25", "--teacher-steps", "26"]) == 2
    assert main([*common, "--out", str(tmp_path / "bad5"), "--teacher-steps", "0"]) == 2
    assert not (tmp_path / "bad1" / "checkpoint").exists()


def test_student_defaults_are_the_shipped_students_recipe():
    """With no recipe option, `train student` runs the recipe MODEL_CARD.md records for the shipped
    student: 75 steps x 32, lr 2e-4, the 25-link grid, guidance drawn from U[4.5, 7.5], the shipped teacher."""
    from pathlib import Path

    from qsched.builtin.pipeline import ASSETS
    from qsched.builtin.train import build_parser

    args = build_parser().parse_args(["student"])
    assert (args.steps, args.batch_size, args.lr, args.seed) == (75, 32, 2e-4, 0)
    assert (args.ddim_timesteps, tuple(args.guidance_range), args.teacher_steps) == (25, (4.5, 7.5), 1)
    assert (args.huber_c, args.huber_reduction, args.target_ema_decay) == (None, "image", 0.95)
    assert (args.consistency_weight, args.trajectory_weight, args.trajectories) == (1.0, 0.0, None)
    assert Path(args.teacher) == ASSETS / "teacher" and (Path(args.teacher) / "model_index.json").is_file()
    card = (ASSETS.parent / "MODEL_CARD.md").read_text()
    assert "--ddim-timesteps 25 --guidance-range 4.5 7.5" in card


def test_ddim_steps_match_diffusers_ddim_and_stop_at_zero():
    from diffusers import DDIMScheduler

    from qsched.builtin.train_student import ddim_steps
    from qsched.builtin.unet import SCHEDULE

    gen = torch.Generator().manual_seed(0)
    ddim = DDIMScheduler(**SCHEDULE)
    ddim.set_timesteps(25)  # trailing grid of 40 timesteps, as the 25-link distillation grid
    alphas = ddim.alphas_cumprod.to(torch.float32)
    velocity = lambda x, t: 0.3 * x + (t.float() / 1000).view(-1, 1, 1, 1)  # noqa: E731  a known v field
    x = torch.randn(3, 1, 8, 8, generator=gen)
    t = torch.tensor([999, 519, 79])

    one, t1 = ddim_steps(x, t, 1, gap=40, alphas=alphas, velocity=velocity)
    assert t1.tolist() == [959, 479, 39]
    for i in range(3):  # diffusers' DDIM step (eta 0, v-prediction), one sample at a time
        want = ddim.step(velocity(x[i:i + 1], t[i:i + 1]), int(t[i]), x[i:i + 1], eta=0.0).prev_sample
        assert torch.allclose(one[i:i + 1], want, atol=1e-5)
    # K steps are K single steps; a sample that reaches t = 0 (79 -> 39 -> 0) stays there
    two, _ = ddim_steps(one, t1, 1, gap=40, alphas=alphas, velocity=velocity)
    two_at_once, t2 = ddim_steps(x, t, 2, gap=40, alphas=alphas, velocity=velocity)
    assert torch.allclose(two_at_once, two) and t2.tolist() == [919, 439, 0]
    three, t3 = ddim_steps(x, t, 3, gap=40, alphas=alphas, velocity=velocity)
    assert torch.equal(three[2], two[2]) and t3.tolist() == [879, 399, 0]
    assert not torch.equal(three[:2], two[:2])
