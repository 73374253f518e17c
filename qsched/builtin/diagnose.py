"""Where does a built-in model's pixel noise come from? Speckle per timestep and per sampling step.

    python -m qsched.builtin.diagnose student teacher runs/builtin/student/pipeline --out runs/builtin/diagnose

Speckle is measured without any learned scorer: a pixel is a speckle pixel when it differs by
more than 0.1 (images in [0, 1]) from the median of its 3x3 neighbourhood; real Fashion-MNIST
test images have ~8% such pixels (edges and fabric texture). For each source it reports

- single evaluations on *real* test images noised to t (one fixed noise): the speckle of the
  model's clean-image estimate and its MSE to the real image, for the student (its guidance
  embedding at scale 3) and, for a teacher, with classifier-free guidance 3 — this separates
  "the denoiser itself adds speckle" from "multi-step sampling accumulates it";
- sampling at the given step counts on held-out prompts (the shipped sampler): speckle of the
  final images and their tone (mean, std, background and saturated fractions, see :func:`tone`),
  which shows a sampler that overshoots in scale.

Flow pipelines (``flow-teacher``, ``flow-student``) get the sampled measurements only: the
clean-estimate probe is written for the UNet's v-prediction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from qsched.builtin import captions as cap
from qsched.builtin.data import DEFAULT_ROOT, load_split, to_model_range
from qsched.builtin.quick_eval import load_any
from qsched.builtin.unet import guidance_embedding, patchify, unpatchify
from qsched.errors import QSchedError

TIMESTEPS = (999, 749, 499, 249, 99, 19)
SPECKLE_THRESHOLD = 0.1
BACKGROUND_BELOW = 0.05
SATURATED_ABOVE = 0.95


def speckle(images: torch.Tensor, threshold: float = SPECKLE_THRESHOLD) -> tuple[float, float]:
    """(fraction of speckle pixels, mean |pixel - 3x3 median|) of gray images [B, 1, H, W] in [0, 1]."""
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    patches = padded.unfold(2, 3, 1).unfold(3, 3, 1).reshape(*images.shape, 9)
    deviation = (images - patches.median(-1).values).abs()
    return float((deviation > threshold).float().mean()), float(deviation.mean())


def tone(images: torch.Tensor) -> dict[str, float]:
    """Mean, std, background (< 0.05) and saturated (> 0.95) pixel fractions of images [B, C, H, W] in [0, 1]
    (channels averaged to gray first)."""
    gray = images.float().mean(1)
    return {"mean": round(float(gray.mean()), 4), "std": round(float(gray.std()), 4),
            "background": round(float((gray < BACKGROUND_BELOW).float().mean()), 4),
            "saturated": round(float((gray > SATURATED_ABOVE).float().mean()), 4)}


def _real_batch(n: int, data_root: str | Path) -> tuple[torch.Tensor, list[str]]:
    test = load_split("test", root=data_root)  # already padded to 32x32, as in training
    pixels = (to_model_range(test.images[:n]) + 1) / 2
    prompts = [cap.HELDOUT_TEMPLATES[i % len(cap.HELDOUT_TEMPLATES)].format(cap.CLASS_PHRASES[int(label)][0])
               for i, label in enumerate(test.labels[:n])]
    return pixels, prompts


@torch.no_grad()
def clean_estimates(pipe, pixels: torch.Tensor, prompts: list[str], *, guidance_scale: float = 3.0,
                    timesteps: Sequence[int] = TIMESTEPS, seed: int = 1) -> dict[str, dict[str, float]]:
    """Per t: speckle and MSE of the model's x0 estimate from real images noised to t (v-prediction)."""
    patch = int(pipe.config.patch_size)
    x0 = patchify(pixels * 2 - 1, patch)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    states, mask = pipe.encode_prompt(prompts, torch.device("cpu"))
    null_states, null_mask = pipe.encode_prompt([""] * len(prompts), torch.device("cpu"))
    alphas = pipe.scheduler.alphas_cumprod
    cond = None
    if pipe.is_distilled:
        w = torch.full((len(prompts),), guidance_scale - 1.0)
        cond = guidance_embedding(w, pipe.unet.config.time_cond_proj_dim)
    rows = {}
    for t in timesteps:
        a = alphas[t]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        tt = torch.full((len(prompts),), t)
        if pipe.is_distilled:
            v = pipe.unet(xt, tt, encoder_hidden_states=states, encoder_attention_mask=mask, timestep_cond=cond).sample
        else:
            v_c, v_u = pipe.unet(torch.cat([xt, xt]), torch.cat([tt, tt]),
                                 encoder_hidden_states=torch.cat([states, null_states]),
                                 encoder_attention_mask=torch.cat([mask, null_mask])).sample.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        estimate = a.sqrt() * xt - (1 - a).sqrt() * v
        image = (unpatchify(estimate, patch).clamp(-1, 1) + 1) / 2
        frac, dev = speckle(image)
        rows[str(t)] = {"speckle": round(frac, 4), "deviation": round(dev, 4),
                        "mse_x0": round(float(((estimate - x0) ** 2).mean()), 4)}
    return rows


@torch.no_grad()
def sampled(pipe, prompts: list[str], steps: Sequence[int], *, guidance_scale: float = 3.0) -> dict[str, dict]:
    """Speckle fraction and :func:`tone` of the images sampled at each step count (seed i for image i)."""
    out = {}
    for n in steps:
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        images = pipe(prompts, num_inference_steps=n, guidance_scale=guidance_scale, generator=gens,
                      output_type="pt").images
        gray = images.float().mean(1, keepdim=True)
        out[str(n)] = {"speckle": round(speckle(gray)[0], 4), **tone(gray)}
    return out


def diagnose(sources: Sequence[str], *, n: int = 64, student_steps: Sequence[int] = (1, 2, 4, 8),
             teacher_steps: Sequence[int] = (4, 25), data_root: str | Path = DEFAULT_ROOT) -> dict:
    pixels, prompts = _real_batch(n, data_root)
    report = {"n": n, "threshold": SPECKLE_THRESHOLD, "real_test_speckle": round(speckle(pixels)[0], 4),
              "real_test_tone": tone(pixels), "sources": {}}
    for source in sources:
        pipe = load_any(source)
        pipe.set_progress_bar_config(disable=True)
        steps = student_steps if pipe.is_distilled else teacher_steps
        row = {"sampled": sampled(pipe, prompts, steps)}
        if hasattr(pipe, "unet"):  # the clean-estimate probe is the UNet's v-prediction
            row["clean_estimates"] = clean_estimates(pipe, pixels, prompts)
        report["sources"][source] = row
        print(source, json.dumps(report["sources"][source]), flush=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsched.builtin.diagnose", description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="+", help="pipeline folders, 'student', 'teacher' or training checkpoints")
    p.add_argument("--n", type=int, default=64, help="images per measurement (default %(default)s)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="folder for diagnose.json")
    p.add_argument("--data-root", default=str(DEFAULT_ROOT), help="Fashion-MNIST IDX folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        report = diagnose(args.sources, n=args.n, data_root=args.data_root)
    except QSchedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"real test images: speckle {report['real_test_speckle']}, tone {report['real_test_tone']}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "diagnose.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
