from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from qsched.builtin.data import write_fake_dataset
from qsched.builtin.train import main
from qsched.builtin.trajectories import TrajectoryBank, TrajectorySpec, sample_trajectories
from qsched.errors import QSchedError

TINY = ["--shape", "tiny", "--max-templates", "1", "--batch-size", "4", "--log-every", "1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("traj")
    data = str(write_fake_dataset(root / "data", n=16))
    out = root / "teacher"
    assert main(["teacher", "--steps", "2", "--out", str(out), "--data-root", data, *TINY]) == 0
    return out / "pipeline", data


def test_trajectory_ends_are_the_pipelines_samples(teacher):
    """Same noise and prompts: the stored trajectory's end is the teacher pipeline's output, its first
    state the noise, and each state the guided DDIM step of the one before (written out here)."""
    from qsched.builtin.pipeline import QSchedBuiltinPipeline

    pipe = QSchedBuiltinPipeline.from_pretrained(str(teacher[0]))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a shirt", "a pair of trousers"]
    noise = torch.randn(2, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size,
                        generator=torch.Generator().manual_seed(3))
    want = pipe(prompts, num_inference_steps=4, guidance_scale=2.5, latents=noise, output_type="latent").images
    states, x0, timesteps = sample_trajectories(pipe, noise, prompts, steps=4, guidance_scale=2.5)
    assert states.shape == (2, 4, *noise.shape[1:]) and timesteps.tolist() == [999, 749, 499, 249]
    assert torch.equal(states[:, 0], noise)
    assert torch.equal(x0, want)
    # each stored state is one guided DDIM step (eta 0) of the state before it
    ctx, mask = pipe.encode_prompt(prompts, torch.device("cpu"))
    null_ctx, null_mask = pipe.encode_prompt(["", ""], torch.device("cpu"))
    pipe.scheduler.set_timesteps(4)
    for k, t in enumerate(pipe.scheduler.timesteps):
        x = states[:, k]
        v_u, v_c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([null_ctx, ctx]),
                             encoder_attention_mask=torch.cat([null_mask, mask])).sample.chunk(2)
        step = pipe.scheduler.step(v_u + 2.5 * (v_c - v_u), t, x, eta=0.0).prev_sample
        assert torch.allclose(step, states[:, k + 1] if k < 3 else x0, atol=1e-6), k


def test_generate_resumes_by_shard_and_refuses_another_spec(teacher, tmp_path):
    out = tmp_path / "traj"
    args = ["trajectories", "--teacher", str(teacher[0]), "--count", "5", "--shard-size", "2", "--steps", "3",
            "--max-templates", "1", "--out", str(out)]
    assert main(args) == 0
    shards = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert shards == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    first = {p.name: load_file(str(p)) for p in out.glob("shard-*.safetensors")}
    assert first["shard-00002.safetensors"]["x0"].shape[0] == 1  # 5 = 2 + 2 + 1
    # an interrupted run (a shard missing) is completed by the same command, identically
    (out / "shard-00001.safetensors").unlink()
    assert main(args) == 0
    again = load_file(str(out / "shard-00001.safetensors"))
    assert all(torch.equal(again[k], first["shard-00001.safetensors"][k]) for k in again)
    # the same folder with another spec is refused (exit 2), the spec file unchanged
    assert main([*args[:-2], "--guidance-scale", "2", "--out", str(out)]) == 2
    assert json.loads((out / "spec.json").read_text())["guidance_scale"] == 3.0

    bank = TrajectoryBank(out)
    assert len(bank) == 5 and bank.timesteps.tolist() == [999, 666, 332]  # trailing: round(1000 - k * 1000/3) - 1
    xt, t, x0, caption = bank.sample(64, torch.Generator().manual_seed(0))
    assert xt.shape == (64, *bank.states.shape[2:]) and set(t.tolist()) <= {999, 666, 332}
    # every drawn (state, t) lies on the trajectory whose end is drawn with it
    for k in range(64):
        i = int(torch.nonzero((bank.x0 == x0[k]).flatten(1).all(1))[0])
        j = bank.timesteps.tolist().index(int(t[k]))
        assert torch.equal(bank.states[i, j], xt[k]) and int(bank.caption[i]) == int(caption[k])

    (out / "shard-00000.safetensors").unlink()
    with pytest.raises(QSchedError, match="2 of 3 trajectory shards"):
        TrajectoryBank(out)
    with pytest.raises(QSchedError, match="no trajectories"):
        TrajectoryBank(tmp_path)
    with pytest.raises(QSchedError):
        TrajectorySpec(count=0)
    # a wrong teacher folder, or a student's: exit 2, and no trajectory folder left behind
    assert main(["trajectories", "--teacher", str(tmp_path / "nowhere"), "--out", str(tmp_path / "t2")]) == 2
    assert not (tmp_path / "t2").exists()
    student = tmp_path / "student"
    assert main(["student", "--teacher", str(teacher[0]), "--data-root", teacher[1], "--steps", "1", "--out",
                 str(student), *TINY]) == 0
    assert main(["trajectories", "--teacher", str(student / "pipeline"), "--out", str(tmp_path / "t3")]) == 2
    assert not (tmp_path / "t3").exists()
    assert main(["student", "--teacher", str(student / "pipeline"), "--data-root", teacher[1], "--steps", "1",
                 "--out", str(tmp_path / "s2"), *TINY]) == 2  # nor can a student be distilled from a student
    assert not (tmp_path / "s2").exists()


def test_consistency_fn_is_lcm_schedulers_denoised():
    """The student's consistency function equals diffusers' LCMScheduler.step(...).denoised."""
    from qsched.builtin.train_student import consistency_fn
    from qsched.builtin.unet import make_student_scheduler

    scheduler = make_student_scheduler()
    alphas = scheduler.alphas_cumprod.to(torch.float32)

    class Field(torch.nn.Module):  # a known v-prediction
        def forward(self, x, t, **kwargs):
            return type("Out", (), {"sample": 0.7 * x - (t.float() / 999).view(-1, 1, 1, 1)})()

    gen = torch.Generator().manual_seed(1)
    scheduler.set_timesteps(4)
    for t in scheduler.timesteps.tolist():
        x = torch.randn(1, 4, 8, 8, generator=gen)
        mine = consistency_fn(Field(), x, torch.tensor([t]), scheduler=scheduler, alphas=alphas)
        scheduler._step_index = None  # step() looks the timestep up afresh
        ref = scheduler.step(Field()(x, torch.tensor([t])).sample, t, x, generator=gen).denoised
        assert torch.allclose(mine, ref, atol=1e-6), t


def test_student_with_trajectory_term(teacher, tmp_path):
    pipe, data = teacher
    traj = tmp_path / "traj"
    assert main(["trajectories", "--teacher", str(pipe), "--count", "4", "--steps", "5", "--max-templates", "1",
                 "--out", str(traj)]) == 0
    common = ["student", "--teacher", str(pipe), "--data-root", data, "--steps", "2", *TINY]
    both = tmp_path / "both"
    assert main([*common, "--out", str(both), "--trajectory-weight", "1", "--trajectories", str(traj)]) == 0
    config = json.loads((both / "checkpoint" / "state.json").read_text())["config"]
    assert config["trajectory_weight"] == 1.0 and config["consistency_weight"] == 1.0
    assert config["trajectories"] == str(traj)
    only = tmp_path / "only"
    assert main([*common, "--out", str(only), "--consistency-weight", "0", "--trajectory-weight", "1",
                 "--trajectories", str(traj)]) == 0
    a = load_file(str(both / "checkpoint" / "state.safetensors"))
    b = load_file(str(only / "checkpoint" / "state.safetensors"))
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))
    # refused before training (exit 2): no trajectories, both weights 0, a negative weight,
    # trajectories written with other caption templates (their caption indices would not match),
    # trajectories of another teacher (a copy of the same weights elsewhere counts as another)
    assert main([*common, "--out", str(tmp_path / "bad1"), "--trajectory-weight", "1"]) == 2
    assert main([*common, "--out", str(tmp_path / "bad2"), "--consistency-weight", "0"]) == 2
    assert main([*common, "--out", str(tmp_path / "bad3"), "--trajectory-weight", "-1"]) == 2
    other = tmp_path / "traj-all-templates"
    assert main(["trajectories", "--teacher", str(pipe), "--count", "1", "--steps", "2", "--out", str(other)]) == 0
    assert main([*common, "--out", str(tmp_path / "bad4"), "--trajectory-weight", "1", "--trajectories", str(other)]) == 2
    copy = shutil.copytree(pipe, tmp_path / "teacher-copy")
    assert main([*common[:2], str(copy), *common[3:], "--out", str(tmp_path / "bad5"), "--trajectory-weight", "1",
                 "--trajectories", str(traj)]) == 2
    assert not any((tmp_path / f"bad{i}").exists() for i in range(1, 6))
