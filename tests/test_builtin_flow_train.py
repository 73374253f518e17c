"""Training stages of the built-in flow model: one step each, checkpoint + resume, export, ship."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qsched.builtin.data import write_fake_dataset
from qsched.builtin.flow_pipeline import QSchedBuiltinFlowPipeline
from qsched.builtin.train import main
from qsched.builtin.train_flow_student import FlowStudentConfig, phase_edges, phased_pair
from qsched.builtin.train_flow_teacher import FlowTeacherConfig, sample_sigmas
from qsched.errors import QSchedError
from qsched.families import load_pipeline

TINY = ["--shape", "tiny", "--max-templates", "1", "--batch-size", "4", "--log-every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(write_fake_dataset(tmp_path_factory.mktemp("fmnist"), n=16))


def _weights(run):
    return load_file(str(run / "checkpoint" / "state.safetensors"))


def _assert_same_weights(a, b, prefixes):
    wa, wb = _weights(a), _weights(b)
    keys = [k for k in wa if k.split(".")[0] in prefixes]
    assert keys and all(torch.equal(wa[k], wb[k]) for k in keys)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, data):
    """A teacher trained 2 steps, checkpointed, then resumed to 4 steps."""
    out = tmp_path_factory.mktemp("flow") / "teacher"
    args = ["flow-teacher", "--out", str(out), "--data-root", data, *TINY]
    assert main([*args, "--steps", "2"]) == 0
    meta = json.loads((out / "checkpoint" / "state.json").read_text())
    assert meta["stage"] == "flow-teacher" and meta["step"] == 2
    assert main([*args, "--steps", "4"]) == 2  # an existing checkpoint without --resume is refused
    assert main([*args, "--steps", "4", "--resume"]) == 0
    assert "resumed from step 2" in (out / "train.log").read_text()
    return out


def test_teacher_resume_equals_an_uninterrupted_run(teacher_run, data, tmp_path):
    straight = tmp_path / "straight"
    assert main(["flow-teacher", "--out", str(straight), "--data-root", data, "--steps", "4", *TINY]) == 0
    assert "step 4/4" in (straight / "train.log").read_text()
    _assert_same_weights(teacher_run, straight, {"model", "ema", "optim"})
    pipe = QSchedBuiltinFlowPipeline.from_pretrained(str(teacher_run / "pipeline"))
    assert not pipe.is_distilled and type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    _assert_checkpoint_pipeline_is_exported(teacher_run, pipe)


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _assert_checkpoint_pipeline_is_exported(run, exported):
    """quick_eval's pipeline from the checkpoint has the exported (EMA / target) weights and config."""
    from qsched.builtin.quick_eval import load_any

    from_checkpoint = load_any(str(run / "checkpoint"))
    assert isinstance(from_checkpoint, QSchedBuiltinFlowPipeline)
    assert _public(from_checkpoint.config) == _public(exported.config)
    a, b = from_checkpoint.transformer.state_dict(), exported.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_student_resume_export_and_ship(teacher_run, data, tmp_path):
    common = ["flow-student", "--teacher", str(teacher_run / "pipeline"), "--data-root", data, *TINY]
    split = tmp_path / "split"
    assert main([*common, "--out", str(split), "--steps", "1"]) == 0
    assert main([*common, "--out", str(split), "--steps", "3", "--resume"]) == 0
    straight = tmp_path / "straight"
    assert main([*common, "--out", str(straight), "--steps", "3", "--snapshot-every", "2"]) == 0
    _assert_same_weights(split, straight, {"model", "target", "optim"})  # snapshots change nothing in training
    assert [p.name for p in (straight / "snapshots").iterdir()] == ["step-00002"]
    assert load_pipeline(straight / "snapshots" / "step-00002").pipe.is_distilled
    meta = json.loads((straight / "checkpoint" / "state.json").read_text())
    assert meta["config"]["huber_c_used"] == pytest.approx(0.00054 * 32)

    loaded = load_pipeline(straight / "pipeline")
    assert loaded.family.name == "builtin-flow" and loaded.pipe.is_distilled
    assert loaded.pipe.config.default_guidance_scale == 3.0
    _assert_checkpoint_pipeline_is_exported(straight, QSchedBuiltinFlowPipeline.from_pretrained(str(straight / "pipeline")))

    shipped = tmp_path / "assets" / "flow-student"
    assert main(["ship", str(straight / "pipeline"), str(shipped)]) == 0
    with safe_open(str(shipped / "transformer" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    again = QSchedBuiltinFlowPipeline.from_pretrained(str(shipped))
    assert again.transformer.dtype == torch.float32 and again.is_distilled


def test_student_needs_a_teacher(data, tmp_path, teacher_run):
    args = ["flow-student", "--data-root", data, "--steps", "1", *TINY]
    assert main([*args, "--teacher", str(tmp_path / "none"), "--out", str(tmp_path / "a")]) == 2
    student = tmp_path / "s"
    assert main([*args, "--teacher", str(teacher_run / "pipeline"), "--out", str(student)]) == 0
    assert main([*args, "--teacher", str(student / "pipeline"), "--out", str(tmp_path / "b")]) == 2


def test_unknown_shape_is_refused(data, tmp_path):
    assert main(["flow-teacher", "--steps", "1", "--out", str(tmp_path / "t"), "--data-root", data,
                 "--batch-size", "2", "--shape", "huge"]) == 2


def test_config_checks_and_noise_levels():
    gen = torch.Generator().manual_seed(0)
    for how in ("uniform", "logit-normal"):
        s = sample_sigmas(1000, gen, how)
        assert 0.0 <= float(s.min()) and float(s.max()) <= 1.0
    with pytest.raises(QSchedError, match="sigma_sampling"):
        FlowTeacherConfig(sigma_sampling="cosine")
    with pytest.raises(QSchedError, match="loss"):
        FlowStudentConfig(loss="l1")
    with pytest.raises(QSchedError, match="target_ema_decay"):
        FlowStudentConfig(target_ema_decay=1.0)


def test_student_target_decay_option_is_recorded(teacher_run, data, tmp_path):
    out = tmp_path / "s"
    assert main(["flow-student", "--teacher", str(teacher_run / "pipeline"), "--data-root", data, *TINY,
                 "--out", str(out), "--steps", "1", "--target-ema-decay", "0.5"]) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["config"]["target_ema_decay"] == 0.5


def test_phase_edges():
    k = torch.arange(1, 41)  # links k/40 -> (k-1)/40
    assert torch.equal(phase_edges(k, 40, 1), torch.zeros(40))  # consistency: every link maps to sigma 0
    assert torch.equal(phase_edges(k, 40, 40), (k - 1).float() / 40)  # one link per phase: the edge is s', exactly
    four = phase_edges(k, 40, 4)
    assert torch.equal(four[:10], torch.zeros(10))  # s = 0.025 .. 0.25 -> 0: the 4-step sampler's last jump
    assert torch.allclose(four[10:20], torch.full((10,), 0.25))  # s = 0.275 .. 0.5 -> 0.25
    assert torch.allclose(four[30:], torch.full((10,), 0.75))  # s = 0.775 .. 1 -> 0.75: the first jump
    for phases in (0, 3, 80):
        with pytest.raises(QSchedError, match="phases must divide"):
            FlowStudentConfig(phases=phases)


@pytest.mark.parametrize("phases", ["1", "4"])  # the default, 40, is trained by the tests above
def test_student_phases_train_and_are_recorded(teacher_run, data, tmp_path, phases):
    out = tmp_path / "s"
    assert main(["flow-student", "--teacher", str(teacher_run / "pipeline"), "--data-root", data, *TINY,
                 "--out", str(out), "--steps", "2", "--phases", phases]) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["config"]["phases"] == int(phases)
    assert load_pipeline(out / "pipeline").pipe.is_distilled


def _toy_velocities(calls):
    """Distinct, known velocity fields; ``calls`` records the rows the target network is asked for."""
    student = lambda x, sigma: 0.5 * x + sigma.view(-1, 1, 1)  # noqa: E731
    guided = lambda x, sigma: -x + 2 * sigma.view(-1, 1, 1)  # noqa: E731

    def target(x, sigma, rows):
        calls.append(rows.tolist())
        return 0.25 * x - sigma.view(-1, 1, 1)
    return student, guided, target


def test_phased_pair_matches_its_definition():
    gen = torch.Generator().manual_seed(0)
    k = torch.tensor([1, 2, 10, 11, 12, 20, 21, 40])
    xs = torch.randn(len(k), 3, 5, generator=gen)
    s, s1 = (k.float() / 40).view(-1, 1, 1), ((k - 1).float() / 40).view(-1, 1, 1)
    calls = []
    student, guided, target = _toy_velocities(calls)
    x_prev = xs + (s1 - s) * guided(xs, s.flatten())

    # one phase = consistency to sigma 0: f = x - s v, the target f(x_{s'}, s') = x_{s'} - s' v_target
    f_s, f_t = phased_pair(xs, k, 40, 1, student=student, guided=guided, target=target)
    assert torch.allclose(f_s, xs - s * student(xs, s.flatten()))
    want = x_prev - s1 * target(x_prev, s1.flatten(), torch.arange(len(k)))
    assert torch.allclose(f_t, want) and calls[0] == [1, 2, 3, 4, 5, 6, 7]  # k = 1 needs no target network: s' = 0

    # N phases = guidance distillation: the target network is never called, and the two
    # estimates differ by exactly (s' - s) (v_student - v_guided)
    calls.clear()
    f_s, f_t = phased_pair(xs, k, 40, 40, student=student, guided=guided, target=target)
    assert calls == []
    assert torch.allclose(f_s - f_t, (s1 - s) * (student(xs, s.flatten()) - guided(xs, s.flatten())), atol=1e-6)

    # four phases: each sample's estimate lands on its phase's lower edge (0, 0.25, 0.5, 0.75)
    f_s, f_t = phased_pair(xs, k, 40, 4, student=student, guided=guided, target=target)
    edge = torch.tensor([0, 0, 0, 0.25, 0.25, 0.25, 0.5, 0.75]).view(-1, 1, 1)
    assert torch.allclose(f_s, xs + (edge - s) * student(xs, s.flatten()))
    assert calls == [[1, 2, 4, 5, 7]]  # k = 1, 11, 21 step onto their edge; k = 40 and the rest map on
    inner = [1, 2, 4, 5, 7]
    want = x_prev.clone()
    want[inner] = x_prev[inner] + (edge[inner] - s1[inner]) * (0.25 * x_prev[inner] - s1[inner])
    assert torch.allclose(f_t, want)
