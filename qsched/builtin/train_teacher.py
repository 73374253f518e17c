"""Teacher: a v-prediction diffusion model (zero terminal SNR) with caption dropout for CFG."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qsched.builtin import train_common as tc
from qsched.builtin.unet import SHAPES, make_teacher_scheduler, make_unet


@dataclass(frozen=True)
class TeacherConfig:
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    warmup_steps: int = 200
    grad_clip: float = 1.0


def train_teacher(opts: tc.RunOptions, cfg: TeacherConfig = TeacherConfig()) -> Path:
    """Train (or resume) the teacher; returns the exported pipeline folder."""
    out = tc.setup_run(opts)
    shape = SHAPES[opts.shape]
    torch.manual_seed(opts.seed)
    unet = make_unet(shape)
    ema = tc.frozen_copy(unet)
    gen = torch.Generator().manual_seed(opts.seed)
    n_params = sum(p.numel() for p in unet.parameters())
    tc.logger.info("teacher: %.2fM parameters, shape %s, %s", n_params / 1e6, shape, tc.env_threads_note())

    images = tc.ImageBatches(data_root=opts.data_root, patch_size=shape.patch_size)
    bank = tc.CaptionBank(max_templates=opts.max_templates)
    scheduler = make_teacher_scheduler()
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    T = scheduler.config.num_train_timesteps

    def loss_fn(step: int) -> torch.Tensor:
        x0, labels = images.sample(opts.batch_size, gen)
        ctx, mask, _ = bank.sample(labels, gen, drop_prob=cfg.caption_dropout)
        t = torch.randint(0, T, (opts.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = unet(xt, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        return F.mse_loss(pred, v)

    def export(folder: Path) -> Path:
        return tc.export_pipeline(folder, unet=ema, scheduler=scheduler)

    tc.fit(out, opts, stage="teacher", model=unet, shadow=("ema", ema), loss_fn=loss_fn,
           shadow_decay=lambda step: min(cfg.ema_decay, (1 + step) / (10 + step)), warmup_steps=cfg.warmup_steps,
           grad_clip=cfg.grad_clip, config=asdict(cfg), gen=gen, export=export)
    return export(out / tc.PIPELINE_DIR)
