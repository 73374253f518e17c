"""Flow student: (phased) consistency distillation of the flow teacher in the flow parameterisation.

The student's clean-image estimate is ``f(x_s, s) = x_s - s * v_student(x_s, s)`` (so
``f(x, 0) = x``: the boundary condition holds by construction). One FlowMatchEuler step
``s -> s'`` on the student's velocity is ``x_s + (s' - s) v = (s'/s) x_s + (1 - s'/s) f``:
re-noising the estimate with the noise it implies. So sampling the student with
FlowMatchEuler at 1, 2 or 4 steps *is* its multistep consistency sampler, with no
scheduler of its own (FLUX.1-schnell is sampled the same way).

Per step: noise a batch to a grid level ``s = k/N`` (k = 1..N, N = 40, so the 1-, 2-, 4- and
8-step sigmas of FluxPipeline lie on the grid); one Euler step of the classifier-free-guided
teacher (fixed scale, baked into the student since it has no guidance input) gives
``x_{s'}`` at ``s' = (k-1)/N``; the loss compares the student's ``f(x_s, s)`` with the EMA
target's ``f(x_{s'}, s')`` (= ``x_{s'}`` itself at ``s' = 0``). Loss: pseudo-Huber on the
per-image distance with iCT's ``c = 0.00054 * sqrt(d)`` (d = 1024 values per image), or MSE.
The student starts as a copy of the teacher.

Phases (``phases = P``, PCM's phased consistency): the grid is cut into P equal phases with
edges ``j/P``; the student's estimate is taken at the lower edge ``e`` of its phase,
``x_s + (e - s) v_student(x_s, s)``, and compared with the target's ``x_{s'} + (e - s') v_target``
(``x_{s'}`` itself when ``s'`` is the edge). P = 1 is the consistency recipe above (e = 0);
a FlowMatchEuler sampler with P steps then jumps from edge to edge, each jump learnt as one
phase's consistency map, so errors no longer accumulate across phases. P = N leaves one grid
link per phase: no target network, the student regresses the teacher's guided velocity
(guidance distillation). That is the shipped student (``phases = 40``, 100 steps): this
rectified-flow teacher is already good at 4 Euler steps, so distilling its guidance (one
forward per step instead of two) met the 4-step targets, where the consistency recipe's
chain of targets left it 63% above its teacher's FID (model card, 2026-12-03).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qsched.builtin import train_common as tc
from qsched.builtin.flow import (
    IMAGE_CHANNELS,
    IMAGE_SIZE,
    MAX_SEQUENCE_LENGTH,
    make_scheduler,
    pack,
    pooled_text,
    transformer_record,
    velocity,
)
from qsched.builtin.train_student import ict_huber_c, pseudo_huber
from qsched.errors import QSchedError

LOSSES = ("pseudo-huber", "mse")


@dataclass(frozen=True)
class FlowStudentConfig:
    num_sigmas: int = 40  # distillation grid k/N, k = 1..N
    phases: int = 40  # P equal phases (1: consistency to sigma 0; num_sigmas: guidance distillation, shipped)
    guidance_scale: float = 3.0  # the teacher's CFG scale, baked into the student
    target_ema_decay: float = 0.95
    loss: str = "pseudo-huber"
    huber_c: float | None = None  # None: iCT's 0.00054 * sqrt(values per image)
    warmup_steps: int = 50
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise QSchedError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.num_sigmas < 1 or self.guidance_scale < 1.0:
            raise QSchedError(f"num_sigmas must be >= 1 and guidance_scale >= 1, got {self.num_sigmas}, {self.guidance_scale}")
        if self.phases < 1 or self.num_sigmas % self.phases:
            raise QSchedError(f"phases must divide num_sigmas ({self.num_sigmas}), got {self.phases}")
        if self.huber_c is not None and self.huber_c <= 0:
            raise QSchedError(f"huber_c must be positive, got {self.huber_c}")
        if not 0.0 <= self.target_ema_decay < 1.0:
            raise QSchedError(f"target_ema_decay must be in [0, 1), got {self.target_ema_decay}")


def phase_edges(k: torch.Tensor, num_sigmas: int, phases: int) -> torch.Tensor:
    """The lower phase edge ``e`` of each grid link ``k/N -> (k-1)/N`` (k = 1..N), as a sigma."""
    links = num_sigmas // phases
    return torch.div(k - 1, links, rounding_mode="floor").float() * links / num_sigmas


def phased_pair(
    xs: torch.Tensor, k: torch.Tensor, num_sigmas: int, phases: int, *,
    student: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    guided: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    target: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's estimate and its target, both at the phase edge of each sample's link.

    ``xs`` [B, ...] are noisy samples at ``s = k/N``; ``student(x, sigma)`` and
    ``guided(x, sigma)`` (the teacher's CFG velocity) are velocities of the whole batch,
    ``target(x, sigma, rows)`` the target network's for those rows of it. The target network is
    called only for links whose ``s'`` lies strictly inside its phase (never when P = N).
    """
    s, s_prev = k.float() / num_sigmas, (k - 1).float() / num_sigmas
    edge = phase_edges(k, num_sigmas, phases)
    sv, spv, ev = (t.view(-1, *([1] * (xs.dim() - 1))) for t in (s, s_prev, edge))
    f_student = xs + (ev - sv) * student(xs, s)
    with torch.no_grad():
        x_prev = xs + (spv - sv) * guided(xs, s)  # one Euler step of the guided teacher, s -> s'
        f_target = x_prev.clone()  # at s' = e the target is x_{s'} itself
        inner = (edge < s_prev).nonzero().flatten()  # the target network maps on from s' to e
        if len(inner):
            f_target[inner] = x_prev[inner] + (ev[inner] - spv[inner]) * target(x_prev[inner], s_prev[inner], inner)
    return f_student, f_target


def load_flow_teacher(folder: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The teacher transformer (frozen, eval) and its pipeline config (``model_index.json``)."""
    from diffusers import FluxTransformer2DModel

    folder = Path(folder)
    if not (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file():
        raise QSchedError(f"no flow teacher pipeline in {folder} (missing transformer weights); train it first: "
                          "python -m qsched.builtin.train flow-teacher")
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    if index.get("distilled"):
        raise QSchedError(f"{folder} holds a distilled student, not a teacher; pass the flow-teacher pipeline")
    model = FluxTransformer2DModel.from_pretrained(str(folder / "transformer"), torch_dtype=torch.float32)
    return model.eval().requires_grad_(False), index


def train_flow_student(opts: tc.RunOptions, *, teacher: str | Path, cfg: FlowStudentConfig = FlowStudentConfig()) -> Path:
    """Distil (or resume distilling) the student from the flow teacher's pipeline folder; returns the exported pipeline."""
    from diffusers import FluxTransformer2DModel

    from qsched.builtin.flow_pipeline import QSchedBuiltinFlowPipeline

    out = tc.setup_run(opts)
    torch.manual_seed(opts.seed)
    teacher_model, index = load_flow_teacher(teacher)
    patch_size = int(index.get("patch_size", 2))
    max_length = int(index.get("max_sequence_length", MAX_SEQUENCE_LENGTH))
    student = FluxTransformer2DModel.from_config(teacher_model.config)
    student.load_state_dict(teacher_model.state_dict())
    target = tc.frozen_copy(student)
    gen = torch.Generator().manual_seed(opts.seed)
    tc.logger.info("flow student: %.2fM parameters from teacher %s, %s",
                   sum(p.numel() for p in student.parameters()) / 1e6, teacher, tc.env_threads_note())
    images = tc.ImageBatches(data_root=opts.data_root, patch_size=patch_size)
    bank = tc.CaptionBank(max_templates=opts.max_templates, max_length=max_length)
    size = IMAGE_SIZE // patch_size
    huber_c = cfg.huber_c if cfg.huber_c is not None else ict_huber_c(IMAGE_CHANNELS * IMAGE_SIZE**2)
    n = cfg.num_sigmas

    def loss_fn(step: int) -> torch.Tensor:
        b = opts.batch_size
        latents, labels = images.sample(b, gen)
        x0 = pack(latents)
        ctx, mask, _ = bank.sample(labels, gen)
        pooled = pooled_text(ctx, mask)
        null_ctx, null_mask = bank.null(b)
        null_pooled = pooled_text(null_ctx, null_mask)
        k = torch.randint(1, n + 1, (b,), generator=gen)
        s = k.float() / n
        noise = torch.randn(x0.shape, generator=gen)
        xs = (1 - s.view(-1, 1, 1)) * x0 + s.view(-1, 1, 1) * noise

        def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            v_c, v_u = velocity(teacher_model, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([ctx, null_ctx]),
                                torch.cat([pooled, null_pooled]), height=size, width=size).chunk(2)
            return v_u + cfg.guidance_scale * (v_c - v_u)

        f_student, f_target = phased_pair(
            xs, k, n, cfg.phases, guided=guided,
            student=lambda x, sigma: velocity(student, x, sigma, ctx, pooled, height=size, width=size),
            target=lambda x, sigma, rows: velocity(target, x, sigma, ctx[rows], pooled[rows], height=size, width=size))
        if cfg.loss == "mse":
            return torch.nn.functional.mse_loss(f_student, f_target)
        return pseudo_huber(f_student, f_target, huber_c, "image")

    def export(folder: Path) -> Path:
        pipe = QSchedBuiltinFlowPipeline(transformer=target, scheduler=make_scheduler(), patch_size=patch_size,
                                         max_sequence_length=max_length, distilled=True,
                                         default_guidance_scale=cfg.guidance_scale)
        return tc.save_pipeline(folder, pipe)

    tc.fit(out, opts, stage="flow-student", model=student, shadow=("target", target), loss_fn=loss_fn,
           shadow_decay=lambda step: cfg.target_ema_decay, warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip,
           config={**asdict(cfg), "huber_c_used": huber_c, "teacher": str(teacher), "patch_size": patch_size,
                   "max_sequence_length": max_length, **transformer_record(teacher_model)}, gen=gen, export=export)
    return export(out / tc.PIPELINE_DIR)
