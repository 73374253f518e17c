"""Student: LCM-style consistency distillation of the teacher into a 1-8 step model.

Recipe (Luo et al. 2023, as in diffusers' LCM distillation script): the student is the
teacher's UNet plus a guidance-scale embedding (``time_cond_proj_dim``, zero-initialised so
it starts as the teacher). Each step: noise a batch to a DDIM-grid timestep t (50-step
trailing grid, t in {19, 39, ..., 999}); one DDIM step of the classifier-free-guided teacher
(guidance scale drawn uniformly) gives x at t-20; the loss is the pseudo-Huber distance
between the student's consistency function at (x_t, t) and the EMA target's at
(x_{t-20}, t-20), with the boundary scalings ``c_skip``/``c_out`` of ``LCMScheduler``.
Optionally (``trajectory_weight``) a second term pulls the consistency function at stored states
of the teacher's own sampler to their trajectories' ends (``qsched.builtin.trajectories``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from qsched.builtin import train_common as tc
from qsched.builtin.unet import (
    GUIDANCE_EMBED_DIM,
    IMAGE_CHANNELS,
    IMAGE_SIZE,
    guidance_embedding,
    make_student_scheduler,
)
from qsched.errors import QSchedError


HUBER_REDUCTIONS = ("image", "element")


@dataclass(frozen=True)
class StudentConfig:
    """The distillation recipe; the defaults are the shipped student's (MODEL_CARD.md)."""

    num_ddim_timesteps: int = 25
    #: K: the guided teacher takes K DDIM steps of the grid per target (t -> t - K*gap), so the
    #: consistency chain from t = 999 to 0 has about num_ddim_timesteps / K links
    teacher_steps: int = 1
    #: classifier-free guidance scale range of the teacher, drawn per image and embedded; the
    #: shipped student distils a stronger guidance than the pipeline's default scale of 3
    guidance_min: float = 4.5
    guidance_max: float = 7.5
    target_ema_decay: float = 0.95
    #: pseudo-Huber constant; None = iCT's 0.00054 * sqrt(d) for d values per image (0.0173 here)
    huber_c: float | None = None
    #: "image": iCT's sqrt(||a - b||^2 + c^2) - c over each image's whole vector (the default);
    #: "element": the same per pixel, as diffusers' LCM script (the first student; with c = 0.001
    #: it is an L1 loss per pixel, which left salt-and-pepper speckle, see MODEL_CARD.md)
    huber_reduction: str = "image"
    warmup_steps: int = 50
    grad_clip: float = 1.0
    #: weight of the consistency-distillation term (0: none, and no teacher calls)
    consistency_weight: float = 1.0
    #: weight of the trajectory term: the student's consistency function at stored states of the
    #: teacher's own sampler against their final samples (``qsched.builtin.trajectories``)
    trajectory_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.num_ddim_timesteps < 1 or 1000 % self.num_ddim_timesteps:
            raise QSchedError(f"num_ddim_timesteps must divide the 1000 training timesteps, got {self.num_ddim_timesteps}")
        if not 1 <= self.teacher_steps <= self.num_ddim_timesteps:
            raise QSchedError(f"teacher_steps must be in [1, num_ddim_timesteps = {self.num_ddim_timesteps}], "
                              f"got {self.teacher_steps}")
        if not 0.0 <= self.target_ema_decay < 1.0:
            raise QSchedError(f"target_ema_decay must be in [0, 1), got {self.target_ema_decay}")
        if not 1.0 <= self.guidance_min <= self.guidance_max:
            raise QSchedError(f"guidance range must satisfy 1 <= min <= max, got [{self.guidance_min}, {self.guidance_max}]")
        if self.huber_reduction not in HUBER_REDUCTIONS:
            raise QSchedError(f"huber reduction must be one of {HUBER_REDUCTIONS}, got {self.huber_reduction!r}")
        if self.consistency_weight < 0 or self.trajectory_weight < 0 or not (self.consistency_weight
                                                                             or self.trajectory_weight):
            raise QSchedError("consistency and trajectory weights must be >= 0 and not both 0, got "
                              f"{self.consistency_weight} and {self.trajectory_weight}")


def load_teacher_unet(folder: str | Path) -> tuple[torch.nn.Module, int]:
    """The teacher UNet (frozen, eval) and its pipeline's patch size."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    if not (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        raise QSchedError(f"no teacher pipeline in {folder} (missing unet weights); train it first: "
                          "python -m qsched.builtin.train teacher")
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32)
    if unet.config.time_cond_proj_dim is not None:
        raise QSchedError(f"{folder} holds a distilled student (its UNet embeds the guidance scale), not a "
                          "teacher; pass the teacher's pipeline folder")
    patch_size = int(json.loads((folder / "model_index.json").read_text()).get("patch_size", 2))
    return unet.eval().requires_grad_(False), patch_size


def student_from_teacher(teacher: torch.nn.Module) -> torch.nn.Module:
    """Teacher weights plus a zero-initialised guidance embedding input."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": GUIDANCE_EMBED_DIM})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in k for k in missing):
        raise RuntimeError(f"teacher/student mismatch: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def ict_huber_c(values_per_image: int) -> float:
    """Song & Dhariwal (2023, improved consistency training): c = 0.00054 * sqrt(d)."""
    return 0.00054 * math.sqrt(values_per_image)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float, reduction: str = "image") -> torch.Tensor:
    """Mean over the batch of sqrt(||a - b||^2 + c^2) - c, the norm taken per image or per element."""
    if reduction not in HUBER_REDUCTIONS:
        raise QSchedError(f"huber reduction must be one of {HUBER_REDUCTIONS}, got {reduction!r}")
    squared = (a.float() - b.float()) ** 2
    if reduction == "image":
        squared = squared.flatten(1).sum(1)
    return (torch.sqrt(squared + c**2) - c).mean()


def x0_from_v(x: torch.Tensor, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The clean estimate of a v-prediction at cumulative alpha ``a``."""
    return a.sqrt() * x - (1 - a).sqrt() * v


def consistency_fn(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, *, scheduler, alphas: torch.Tensor,
                   **unet_kwargs) -> torch.Tensor:
    """The LCM consistency function c_skip(t) x + c_out(t) x0(x, t) of a v-prediction ``unet`` at timesteps ``t`` [B].

    ``scheduler``: the student's ``LCMScheduler`` (its boundary scalings); the same value as its
    ``step(...).denoised`` for the same model output.
    """
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t.to(torch.float32))
    v = unet(x, t, **unet_kwargs).sample
    return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0_from_v(x, v, alphas[t].view(-1, 1, 1, 1))


def ddim_steps(x: torch.Tensor, t: torch.Tensor, steps: int, *, gap: int, alphas: torch.Tensor,
               velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` DDIM steps of size ``gap`` from timesteps ``t`` [B] with the v-prediction ``velocity(x, t)``.

    Returns the samples and their timesteps. A sample that reaches timestep 0 stays there (its
    later steps are computed and discarded).
    """
    cur = t
    for _ in range(steps):
        nxt = (cur - gap).clamp(min=0)
        a_c, a_n = alphas[cur].view(-1, 1, 1, 1), alphas[nxt].view(-1, 1, 1, 1)
        v = velocity(x, cur)
        eps = (1 - a_c).sqrt() * x + a_c.sqrt() * v
        x = torch.where((cur > 0).view(-1, 1, 1, 1), a_n.sqrt() * x0_from_v(x, v, a_c) + (1 - a_n).sqrt() * eps, x)
        cur = nxt
        if not bool((cur > 0).any()):
            break
    return x, cur


def train_student(opts: tc.RunOptions, *, teacher: str | Path, cfg: StudentConfig = StudentConfig(),
                  trajectories: str | Path | None = None) -> Path:
    """Distil (or resume distilling) the student from the teacher pipeline folder; returns the exported pipeline.

    ``trajectories``: a folder written by ``qsched.builtin.trajectories.generate`` (needed when
    ``cfg.trajectory_weight`` > 0), from this teacher with the same caption templates.
    """
    traj = None
    if cfg.trajectory_weight:
        if trajectories is None:
            raise QSchedError("a trajectory weight > 0 needs --trajectories (python -m qsched.builtin.train trajectories)")
        from qsched.builtin.trajectories import TrajectoryBank

        traj = TrajectoryBank(trajectories)
        if Path(traj.teacher).resolve() != Path(teacher).resolve():
            raise QSchedError(f"trajectories in {trajectories} are of teacher {traj.teacher}, this run distils "
                              f"{teacher}; write them from this teacher (python -m qsched.builtin.train trajectories)")
        if traj.spec.max_templates != opts.max_templates:
            raise QSchedError(f"trajectories in {trajectories} use max_templates {traj.spec.max_templates}, "
                              f"this run {opts.max_templates}: their caption indices would not match")
    teacher_unet, patch_size = load_teacher_unet(teacher)  # a wrong teacher fails before the folder is made
    out = tc.setup_run(opts)
    torch.manual_seed(opts.seed)
    student = student_from_teacher(teacher_unet).train()
    target = tc.frozen_copy(student)
    gen = torch.Generator().manual_seed(opts.seed)
    tc.logger.info("student: %.2fM parameters from teacher %s, %s",
                   sum(p.numel() for p in student.parameters()) / 1e6, teacher, tc.env_threads_note())

    images = tc.ImageBatches(data_root=opts.data_root, patch_size=patch_size)
    bank = tc.CaptionBank(max_templates=opts.max_templates)
    scheduler = make_student_scheduler()
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    T = scheduler.config.num_train_timesteps
    gap = T // cfg.num_ddim_timesteps
    grid = torch.arange(1, cfg.num_ddim_timesteps + 1) * gap - 1  # trailing: 19, 39, ..., 999
    huber_c = cfg.huber_c if cfg.huber_c is not None else ict_huber_c(IMAGE_CHANNELS * IMAGE_SIZE**2)
    tc.logger.info("consistency loss: pseudo-Huber per %s, c = %.4g", cfg.huber_reduction, huber_c)

    def consistency_loss(B: int) -> torch.Tensor:
        x0, labels = images.sample(B, gen)
        ctx, mask, _ = bank.sample(labels, gen)
        null_ctx, null_mask = bank.null(B)
        t = grid[torch.randint(0, len(grid), (B,), generator=gen)]
        scale = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(B, generator=gen)
        cond = dict(encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep_cond=guidance_embedding(scale - 1.0))
        noise = torch.randn(x0.shape, generator=gen)
        a_t = alphas[t].view(-1, 1, 1, 1)
        xt = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise

        f_student = consistency_fn(student, xt, t, scheduler=scheduler, alphas=alphas, **cond)
        with torch.no_grad():
            def guided(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
                v_c, v_u = teacher_unet(
                    torch.cat([x, x]), torch.cat([at, at]), encoder_hidden_states=torch.cat([ctx, null_ctx]),
                    encoder_attention_mask=torch.cat([mask, null_mask]),
                ).sample.chunk(2)
                return v_u + scale.view(-1, 1, 1, 1) * (v_c - v_u)

            x_prev, t_prev = ddim_steps(xt, t, cfg.teacher_steps, gap=gap, alphas=alphas, velocity=guided)
            f_target = consistency_fn(target, x_prev, t_prev, scheduler=scheduler, alphas=alphas, **cond)
        return pseudo_huber(f_student, f_target, huber_c, cfg.huber_reduction)

    def trajectory_loss(B: int) -> torch.Tensor:
        xt, t, x0, caption = traj.sample(B, gen)
        f_student = consistency_fn(
            student, xt, t, scheduler=scheduler, alphas=alphas, encoder_hidden_states=bank.states[caption],
            encoder_attention_mask=bank.masks[caption],
            timestep_cond=guidance_embedding(torch.full((B,), traj.spec.guidance_scale - 1.0)))
        return pseudo_huber(f_student, x0, huber_c, cfg.huber_reduction)

    def loss_fn(step: int) -> torch.Tensor:
        terms = []
        if cfg.consistency_weight:
            terms.append(cfg.consistency_weight * consistency_loss(opts.batch_size))
        if cfg.trajectory_weight:
            terms.append(cfg.trajectory_weight * trajectory_loss(opts.batch_size))
        return sum(terms[1:], terms[0])

    def export(folder: Path) -> Path:
        return tc.export_pipeline(folder, unet=target, scheduler=scheduler)

    tc.fit(out, opts, stage="student", model=student, shadow=("target", target), loss_fn=loss_fn,
           shadow_decay=lambda step: cfg.target_ema_decay, warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip,
           config={**asdict(cfg), "huber_c": huber_c, "teacher": str(teacher),
                   "trajectories": None if traj is None else str(trajectories)}, gen=gen, export=export)
    return export(out / tc.PIPELINE_DIR)
