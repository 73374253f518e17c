"""Teacher: a v-prediction diffusion model (zero terminal SNR) with caption dropout for CFG."""

from __future__ import annotations

import time
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
    ema = make_unet(shape)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=opts.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(opts.seed)
    start, elapsed = 0, 0.0
    if opts.resume:
        start, elapsed = tc.resume_from_checkpoint(
            out, modules={"model": unet, "ema": ema}, opt=opt, gen=gen
        )
    n_params = sum(p.numel() for p in unet.parameters())
    tc.logger.info("teacher: %.2fM parameters, shape %s, %s", n_params / 1e6, shape, tc.env_threads_note())

    images = tc.ImageBatches(data_root=opts.data_root, patch_size=shape.patch_size)
    bank = tc.CaptionBank(max_templates=opts.max_templates)
    scheduler = make_teacher_scheduler()
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    T = scheduler.config.num_train_timesteps

    def step_fn(step: int) -> float:
        for group in opt.param_groups:
            group["lr"] = opts.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        x0, labels = images.sample(opts.batch_size, gen)
        ctx, mask, _ = bank.sample(labels, gen, drop_prob=cfg.caption_dropout)
        t = torch.randint(0, T, (opts.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = unet(xt, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        loss = F.mse_loss(pred, v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        tc.ema_update(ema, unet, min(cfg.ema_decay, (1 + step) / (10 + step)))
        return float(loss.detach())

    def checkpoint_fn(step: int, total: float) -> None:
        tc.write_checkpoint(out, stage="teacher", step=step, opts=opts, config=asdict(cfg), total=total,
                            modules={"model": unet, "ema": ema}, opt=opt, gen=gen)

    unet.train()
    t0 = time.perf_counter()
    tc.train_loop(start_step=start, steps=opts.steps, step_fn=step_fn, checkpoint_fn=checkpoint_fn,
                  elapsed_before=elapsed, opts=opts)
    tc.logger.info("wall time this run %.1f min", (time.perf_counter() - t0) / 60)
    return tc.export_pipeline(out / tc.PIPELINE_DIR, unet=ema.eval(), scheduler=scheduler)
