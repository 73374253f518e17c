"""Memory and speed of quantized denoisers at real size (random weights), as a user runs them.

Builds pipeline folders whose denoiser has the *real* configuration of SD 1.5 (LCM
Dreamshaper v7 UNet, 860 M parameters), SDXL (SDXL-Turbo UNet, 2.6 B) or FLUX.1-schnell
(the transformer, 11.9 B; ``--flux-blocks D S`` keeps D double and S single blocks),
with random weights written shard by shard (the model is never whole in memory), and
small text encoders / VAE of matching widths (the same for every row, so they do not
change the comparison). Then it runs the real commands in fresh processes and
records their peak resident memory (GNU time's maximum RSS):

- ``qsched generate --quant Q --backend fake``   (float weights on the integer grid)
- ``qsched generate --quant Q``                  (packed, streamed from the FP checkpoint)
- ``qsched quantize --quant Q``, then ``qsched generate --packed FILE``

and, in one process, the time per denoiser call of the fake and packed models,
interleaved (``time`` rows). Usage::

    python benchmarks/bench_memory.py suite --model sd15 --work runs/mem --out runs/mem/sd15.json
    python benchmarks/bench_memory.py suite --model flux --flux-blocks 3 6 --work runs/mem ...
    python benchmarks/bench_memory.py moonshot --work runs/mem     # full FLUX, W4A8, bf16 checkpoint

Each step is skipped when its output exists (resumable); ``--threads`` is passed to
every command. Prints a markdown table; BENCHMARKS.md records the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SD15_UNET = {  # SimianLuo/LCM_Dreamshaper_v7 unet/config.json
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                     "CrossAttnDownBlock2D", "DownBlock2D"],
    "in_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 4, "sample_size": 96,
    "time_cond_proj_dim": 256,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SDXL_UNET = {  # stabilityai/sdxl-turbo unet/config.json
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 64, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
FLUX_TRANSFORMER = {  # black-forest-labs/FLUX.1-schnell transformer/config.json
    "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": False, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "patch_size": 1, "pooled_projection_dim": 768,
}
QUANTS = ("w8a8", "w4a8", "w4a4")


@dataclass(frozen=True)
class ModelSpec:
    key: str
    family: str
    attr: str
    class_name: str
    config: dict[str, Any]
    size: int  # image side of the short generation
    steps: int
    half: str  # the half-precision dtype its checkpoints ship in
    extra: dict[str, Any] = field(default_factory=dict)


SPECS = {
    "sd15": ModelSpec("sd15", "lcm", "unet", "UNet2DConditionModel", SD15_UNET, 64, 2, "float16"),
    "sdxl": ModelSpec("sdxl", "sdxl-turbo", "unet", "UNet2DConditionModel", SDXL_UNET, 64, 2, "float16"),
    "flux": ModelSpec("flux", "flux-schnell", "transformer", "FluxTransformer2DModel", FLUX_TRANSFORMER, 64, 2,
                      "bfloat16"),
}


# --- building the folders ----------------------------------------------------------------------


def _small_components(spec: ModelSpec) -> dict[str, Any]:
    """Text encoders, tokenizers, VAE and scheduler of matching widths (tiny, random)."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from qsched.testing import _clip_text_config, _clip_tokenizer, _sd_scheduler_config, _t5_tokenizer

    torch.manual_seed(0)
    latent = 16 if spec.key == "flux" else 4
    vae = AutoencoderKL(  # 4 levels: downsamples by 8 like the real VAEs
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=latent, norm_num_groups=2,
        sample_size=spec.size, **({"shift_factor": 0.0609, "scaling_factor": 1.5035} if spec.key == "flux" else {}),
    )
    tok = _clip_tokenizer()
    clip = dict(num_hidden_layers=1, intermediate_size=256, num_attention_heads=4, max_position_embeddings=77)
    tok.model_max_length = 77
    if spec.key == "sd15":
        return {"vae": vae, "tokenizer": tok, "text_encoder": CLIPTextModel(_clip_text_config(tok, hidden_size=768, **clip)),
                "scheduler": LCMScheduler(**_sd_scheduler_config(), clip_sample=False),
                "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if spec.key == "sdxl":
        tok2 = _clip_tokenizer()
        tok2.model_max_length = 77
        return {"vae": vae, "tokenizer": tok, "tokenizer_2": tok2,
                "text_encoder": CLIPTextModel(_clip_text_config(tok, hidden_size=768, **clip)),
                "text_encoder_2": CLIPTextModelWithProjection(
                    _clip_text_config(tok2, hidden_size=1280, projection_dim=1280, **clip)),
                "scheduler": EulerAncestralDiscreteScheduler(**_sd_scheduler_config(), timestep_spacing="trailing"),
                "add_watermarker": False}
    tok2 = _t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=8,
                                 relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tok2.pad_token_id,
                                 eos_token_id=tok2.eos_token_id, decoder_start_token_id=tok2.pad_token_id))
    return {"vae": vae, "tokenizer": tok, "text_encoder": CLIPTextModel(_clip_text_config(tok, hidden_size=768, **clip)),
            "tokenizer_2": tok2, "text_encoder_2": t5,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)}


def write_random_weights(cls: type, config: dict[str, Any], folder: Path, *, dtype: torch.dtype,
                         shard_bytes: int = 2 * 1024**3) -> int:
    """Random weights of ``cls(**config)`` in safetensors shards, built tensor by tensor; returns the count."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = cls.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(skeleton.config) | {"_class_name": cls.__name__}, default=list))
    generator = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    parts: list[tuple[str, list[str]]] = []  # (temporary file name, its tensor names)
    size = total = 0
    for name, meta in skeleton.state_dict().items():
        if meta.dim() >= 2:
            fan_in = meta[0].numel()
            value = torch.randn(meta.shape, generator=generator, dtype=torch.float32).mul_(fan_in ** -0.5)
        elif name.endswith("weight"):  # norms
            value = torch.ones(meta.shape)
        else:
            value = torch.randn(meta.shape, generator=generator).mul_(0.01)
        value = value.to(dtype)
        nbytes = value.numel() * value.element_size()
        if size and size + nbytes > shard_bytes:
            parts.append(_flush(shard, folder, len(parts)))
            size = 0
        shard[name] = value
        size += nbytes
        total += value.numel()
    parts.append(_flush(shard, folder, len(parts)))
    weight_map = {}
    for i, (part, keys) in enumerate(parts):
        final = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        (folder / part).rename(folder / final)
        weight_map.update(dict.fromkeys(keys, final))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _flush(tensors: dict[str, torch.Tensor], folder: Path, index: int) -> tuple[str, list[str]]:
    """Write ``tensors`` to a temporary shard and empty the dict; returns the file and the names."""
    from qsched.quant.tensor_files import write_tensors

    name = f"part-{index:05d}.safetensors"
    write_tensors(folder / name, tensors, metadata={"format": "pt"})
    keys = list(tensors)
    tensors.clear()
    return name, keys


def make_pipeline(spec: ModelSpec, folder: Path, *, dtype: torch.dtype, flux_blocks: tuple[int, int] | None) -> None:
    """A pipeline folder: small components + the real-size denoiser with random ``dtype`` weights."""
    import diffusers

    if (folder / "model_index.json").is_file():
        return
    config = dict(spec.config)
    if spec.key == "flux" and flux_blocks is not None:
        config["num_layers"], config["num_single_layers"] = flux_blocks
    cls = getattr(diffusers, spec.class_name)
    tmp = folder.with_name(folder.name + ".partial")
    pipe_cls = {"sd15": "LatentConsistencyModelPipeline", "sdxl": "StableDiffusionXLPipeline",
                "flux": "FluxPipeline"}[spec.key]
    parts = _small_components(spec)
    tiny = {"sd15": {"block_out_channels": (32, 32), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                     "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "norm_num_groups": 8, "attention_head_dim": 8},
            "sdxl": {"block_out_channels": (32, 32), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                     "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 8,
                     "transformer_layers_per_block": 1, "attention_head_dim": 8},
            "flux": {"num_layers": 1, "num_single_layers": 1}}[spec.key]
    placeholder = cls.from_config({**config, **tiny})  # saved, then replaced by the real-size weights
    getattr(diffusers, pipe_cls)(**parts, **{spec.attr: placeholder}).save_pretrained(tmp)
    denoiser = tmp / spec.attr
    for old in denoiser.iterdir():
        old.unlink()
    count = write_random_weights(cls, config, denoiser, dtype=dtype)
    (tmp / "params.json").write_text(json.dumps({"denoiser_params": count, "dtype": str(dtype), "config": config}))
    tmp.rename(folder)


# --- measuring --------------------------------------------------------------------------------


def measure(command: list[str], *, threads: int) -> dict[str, Any]:
    """Peak RSS (GB) and wall time of ``command`` in a fresh process (GNU time)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        full = ["/usr/bin/time", "-f", "%M %e", "-o", out.name, sys.executable, "-m", "qsched",
                "--threads", str(threads), *command]
        result = subprocess.run(full, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        kb, seconds = out.read().split()[-2:]
    return {"peak_rss_gb": int(kb) * 1024 / 1e9, "wall_s": float(seconds), "command": "qsched " + " ".join(command)}


def time_per_call(folder: Path, spec: ModelSpec, quant: str, *, repeats: int, latent: int) -> dict[str, Any]:
    """Median seconds per denoiser call, fake vs packed, interleaved in one process."""
    from diffusers import DiffusionPipeline

    from qsched.quant import parse_preset, quantize
    from qsched.quant.stream import component_source, load_quantized

    recipe = parse_preset(quant)
    packed, _ = load_quantized(component_source(folder, spec.attr), recipe)
    fake = getattr(DiffusionPipeline.from_pretrained(folder), spec.attr)
    quantize(fake, recipe)
    inputs = denoiser_inputs(spec, packed.config, latent)
    times: dict[str, list[float]] = {"fake": [], "packed": []}
    with torch.no_grad():
        for model in (fake, packed):
            model(**inputs)  # warm-up
        for _ in range(repeats):
            for name, model in (("fake", fake), ("packed", packed)):
                start = time.perf_counter()
                model(**inputs)
                times[name].append(time.perf_counter() - start)
    fake_s, packed_s = statistics.median(times["fake"]), statistics.median(times["packed"])
    return {"quant": quant, "latent": latent, "repeats": repeats, "fake_s": fake_s, "packed_s": packed_s,
            "ratio": packed_s / fake_s, "ratio_min": min(times["packed"]) / min(times["fake"])}


def denoiser_inputs(spec: ModelSpec, config: Any, latent: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    if spec.key == "flux":
        tokens, text = (latent // 2) ** 2, 64
        return {"hidden_states": torch.randn(1, tokens, 64, generator=g),
                "encoder_hidden_states": torch.randn(1, text, 4096, generator=g),
                "pooled_projections": torch.randn(1, 768, generator=g), "timestep": torch.tensor([0.5]),
                "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(text, 3), "return_dict": False}
    kwargs: dict[str, Any] = {"sample": torch.randn(1, 4, latent, latent, generator=g), "timestep": torch.tensor([500]),
                              "encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim, generator=g),
                              "return_dict": False}
    if config.time_cond_proj_dim:
        kwargs["timestep_cond"] = torch.randn(1, config.time_cond_proj_dim, generator=g)
    if config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280, generator=g), "time_ids": torch.zeros(1, 6)}
    return kwargs


def generate_args(folder: Path, spec: ModelSpec, out: Path, steps: int) -> list[str]:
    return ["generate", "a red sneaker", "--model", str(folder), "--steps", str(steps), "--height", str(spec.size),
            "--width", str(spec.size), "--out", str(out), "--overwrite", "--no-progress"]


def _cached(path: Path, compute: Any) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def suite(args: argparse.Namespace) -> dict[str, Any]:
    spec = SPECS[args.model]
    blocks = tuple(args.flux_blocks) if args.flux_blocks else None
    tag = spec.key + (f"-{blocks[0]}x{blocks[1]}" if blocks else "")
    work = Path(args.work) / tag
    rows: dict[str, Any] = {}
    fp32 = work / "pipe-fp32"
    make_pipeline(spec, fp32, dtype=torch.float32, flux_blocks=blocks)
    rows["params"] = json.loads((fp32 / "params.json").read_text())["denoiser_params"]
    steps = spec.steps
    runs = work / "runs"

    def gen(name: str, extra: list[str], folder: Path = fp32) -> dict[str, Any]:
        images = work / "images" / name
        return _cached(runs / f"{name}.json", lambda: measure(
            generate_args(folder, spec, images, steps) + extra, threads=args.threads)
            | {"timing": json.loads((images / "run.json").read_text())["timing"]})

    rows["fp32"] = gen("fp32", ["--quant", "fp"])
    if not args.skip_half:
        half = work / f"pipe-{spec.half}"
        make_pipeline(spec, half, dtype=getattr(torch, spec.half), flux_blocks=blocks)
        rows[spec.half] = gen(spec.half, ["--quant", "fp", "--dtype", spec.half], half)
    for quant in args.quants:
        rows[f"{quant} fake"] = gen(f"{quant}-fake", ["--quant", quant, "--backend", "fake"])
        rows[f"{quant} packed"] = gen(f"{quant}-packed", ["--quant", quant])
        packed_file = work / f"{quant}.safetensors"
        rows[f"{quant} quantize"] = _cached(runs / f"{quant}-quantize.json", lambda: measure(
            ["quantize", "--model", str(fp32), "--quant", quant, "--out", str(packed_file), "--overwrite"],
            threads=args.threads) | {"file_bytes": packed_file.stat().st_size})
        rows[f"{quant} from file"] = gen(f"{quant}-file", ["--packed", str(packed_file)])
    for quant in args.time_quants:
        for latent in args.time_latents:
            rows[f"time {quant} latent {latent}"] = _cached(
                runs / f"time-{quant}-{latent}.json",
                lambda: time_per_call(fp32, spec, quant, repeats=args.repeats, latent=latent))
    return {"model": tag, "rows": rows}


def moonshot(args: argparse.Namespace) -> dict[str, Any]:
    """The full FLUX.1-schnell-size transformer in bf16 (~24 GB), W4A8, a 4-step image on 24 GB."""
    spec = SPECS["flux"]
    work = Path(args.work) / "flux-full"
    folder = work / "pipe-bfloat16"
    start = time.perf_counter()
    make_pipeline(spec, folder, dtype=torch.bfloat16, flux_blocks=None)
    made_s = time.perf_counter() - start
    params = json.loads((folder / "params.json").read_text())["denoiser_params"]
    images = work / "images"
    command = ["generate", "a red sneaker", "--model", str(folder), "--quant", "w4a8", "--steps", "4",
               "--height", str(args.size), "--width", str(args.size), "--out", str(images), "--overwrite"]
    run = _cached(work / "runs" / "w4a8-4steps.json", lambda: measure(command, threads=args.threads)
                  | {"timing": json.loads((images / "run.json").read_text())["timing"]})
    checkpoint = sum(p.stat().st_size for p in (folder / spec.attr).glob("*.safetensors"))
    return {"model": "flux-full", "params": params, "checkpoint_bytes": checkpoint, "made_s": made_s, "run": run}


def table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    base = rows["fp32"]["peak_rss_gb"]
    lines = [f"### {result['model']} ({rows['params'] / 1e9:.2f} B denoiser parameters)", "",
             "| run | peak RSS (GB) | vs fp32 run | wall (s) |", "|---|---|---|---|"]
    for name, row in rows.items():
        if isinstance(row, dict) and "peak_rss_gb" in row:
            extra = f" (file {row['file_bytes'] / 1e9:.2f} GB)" if "file_bytes" in row else ""
            lines.append(f"| {name}{extra} | {row['peak_rss_gb']:.2f} | {row['peak_rss_gb'] / base:.2f}x | {row['wall_s']:.0f} |")
    timed = [r for r in rows.values() if isinstance(r, dict) and "ratio" in r]
    if timed:
        lines += ["", "| time per denoiser call | latent | fake (s) | packed (s) | packed / fake (median) | (min) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['quant']} | {r['latent']}x{r['latent']} | {r['fake_s']:.2f} | {r['packed_s']:.2f} | "
                  f"{r['ratio']:.2f}x | {r['ratio_min']:.2f}x |" for r in timed]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("suite")
    s.add_argument("--model", choices=sorted(SPECS), required=True)
    s.add_argument("--flux-blocks", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"))
    s.add_argument("--skip-half", action="store_true", help="no fp16/bf16 row (slow on CPU)")
    s.add_argument("--quants", nargs="*", default=list(QUANTS), choices=QUANTS)
    s.add_argument("--time-quants", nargs="*", default=["w8a8", "w4a8"])
    s.add_argument("--time-latents", type=int, nargs="*", default=[8, 32])
    s.add_argument("--repeats", type=int, default=3)
    m = sub.add_parser("moonshot")
    m.add_argument("--size", type=int, default=128)
    for p in (s, m):
        p.add_argument("--work", required=True)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--out", required=True, help="JSON results")
    args = parser.parse_args()
    result = suite(args) if args.command == "suite" else moonshot(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result) if args.command == "suite" else json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
