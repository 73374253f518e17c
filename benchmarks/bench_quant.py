"""Benchmark fake quantization time and packed checkpoint size (not a test).

Measured in one run on a UNet2DConditionModel of moderate size (SD-like layout,
~1/5 of SD1.5's width, random weights):

- 4-step LCM sampling time with fake-quant W8A8 and W4A8 vs FP32 (goal <= 1.1x);
- packed W4 / W8 checkpoint bytes vs the FP32 and FP16 safetensors files of the
  same model (goal >= 7x smaller for W4 vs FP32).

Timing runs are interleaved (FP32, W8A8, W4A8, FP32, ...) and the median is
reported (with the minimum, the least disturbed run), so background load hits
every configuration alike.

    nice -n 10 .venv/bin/python benchmarks/bench_quant.py [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import LCMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from qsched.quant import packed_size, parse_preset, quantize, save_packed
from qsched.quant.fake import ActivationQuantizer


def build_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        cross_attention_dim=256,
        attention_head_dim=8,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


@torch.inference_mode()
def sample(unet: UNet2DConditionModel, scheduler: LCMScheduler, *, steps: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=g)
    text = torch.randn(1, 77, 256, generator=g)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        eps = unet(latents, t, encoder_hidden_states=text).sample
        latents = scheduler.step(eps, t, latents, generator=g, return_dict=False)[0]
    return latents


def hook_cost(quantized: UNet2DConditionModel, fp: UNet2DConditionModel, *, repeats: int) -> tuple[float, float]:
    """Min time of replaying every activation hook of one forward, and of one FP32 forward (ms).

    Less sensitive to background load than the end-to-end ratio above.
    """
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 256, generator=g)
    calls: list[tuple[ActivationQuantizer, torch.Tensor]] = []
    handles = []
    for module in quantized.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, ActivationQuantizer):
                handles.append(module.register_forward_pre_hook(
                    lambda mod, args, hook=hook: calls.append((hook, args[0])), prepend=True))
    with torch.inference_mode():
        quantized(x, 500, encoder_hidden_states=text)
        for handle in handles:
            handle.remove()
        hooks, forwards = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            for hook, inp in calls:
                hook(None, (inp,))
            hooks.append(time.perf_counter() - start)
            start = time.perf_counter()
            fp(x, 500, encoder_hidden_states=text)
            forwards.append(time.perf_counter() - start)
    return 1e3 * min(hooks), 1e3 * min(forwards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = {"fp32": build_unet()}
    n_params = sum(p.numel() for p in models["fp32"].parameters())
    reports = {}
    for name in ("w8a8", "w4a8"):
        models[name] = build_unet()
        reports[name] = quantize(models[name], parse_preset(name))
    scheduler = LCMScheduler()
    print(f"UNet2DConditionModel, {n_params / 1e6:.1f} M parameters; torch {torch.__version__}, "
          f"{args.threads} thread(s); {args.steps}-step LCM sampling, batch 1, latent 4x32x32")
    print(f"quantized fraction of parameters (default skip list): "
          f"{100 * reports['w4a8'].quantized_fraction:.1f}%")

    for model in models.values():  # warm-up
        sample(model, scheduler, steps=args.steps)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            sample(model, scheduler, steps=args.steps)
            times[name].append(time.perf_counter() - start)
    base, base_min = statistics.median(times["fp32"]), min(times["fp32"])
    print(f"\n{'config':<8} {'median s':>9} {'min s':>7} {'median/fp32':>12} {'min/fp32':>9}   (goal <= 1.10x)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<8} {med:>9.3f} {min(ts):>7.3f} {med / base:>11.3f}x {min(ts) / base_min:>8.3f}x")

    hook_ms, forward_ms = hook_cost(models["w8a8"], models["fp32"], repeats=args.repeats)
    print(f"activation fake-quant alone (all hooks of one W8A8 forward, replayed): {hook_ms:.1f} ms "
          f"= {100 * hook_ms / forward_ms:.1f}% of one FP32 forward ({forward_ms:.1f} ms, min)")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        fp32_file = out / "fp32.safetensors"
        save_file(models["fp32"].state_dict(), str(fp32_file))
        fp16_file = out / "fp16.safetensors"
        save_file({k: v.half() for k, v in models["fp32"].state_dict().items()}, str(fp16_file))
        fp32_bytes, fp16_bytes = fp32_file.stat().st_size, fp16_file.stat().st_size
        print(f"\n{'checkpoint':<12} {'bytes':>12} {'FP32/this':>10} {'FP16/this':>10}   (goal W4: FP32/this >= 7x)")
        print(f"{'fp32':<12} {fp32_bytes:>12,} {1.0:>10.2f} {fp16_bytes / fp32_bytes:>10.2f}")
        print(f"{'fp16':<12} {fp16_bytes:>12,} {fp32_bytes / fp16_bytes:>10.2f} {1.0:>10.2f}")
        for name, preset in (("packed w8", "w8a8"), ("packed w4", "w4a8")):
            path = save_packed(models[preset], out / f"{preset}.safetensors")
            size = packed_size(path)
            nbytes = size.file_bytes
            print(f"{name:<12} {nbytes:>12,} {fp32_bytes / nbytes:>10.2f} {fp16_bytes / nbytes:>10.2f}")


if __name__ == "__main__":
    main()
