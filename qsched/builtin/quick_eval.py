"""Quick look at a built-in pipeline: one sample grid per step count (one row per class).

    python -m qsched.builtin.quick_eval runs/builtin/student/pipeline --steps 1 2 4 8 --out runs/builtin/eval/student
    python -m qsched.builtin.quick_eval runs/builtin/teacher/checkpoint --steps 25 --out runs/builtin/eval/teacher

The source may be a pipeline folder (UNet or flow), ``student`` / ``teacher`` /
``flow-student`` / ``flow-teacher`` (the shipped ones) or a training checkpoint folder
of any stage (its EMA / target weights are used). Besides the PNG grids it
reports a cheap, CLIP-free sanity metric: the class agreement of a k-nearest-neighbour
classifier in pixel space fitted on Fashion-MNIST training images (it scores ~0.85 on the
real test split); ``--metrics N`` adds FID-EffNet and, once the built-in CLIP is trained,
its zero-shot accuracy, CLIP score and CLIP-IQA on N held-out evaluation prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from qsched.builtin import captions as cap
from qsched.builtin.data import DEFAULT_ROOT, load_split
from qsched.errors import QSchedError


#: ``--split``: "evaluation" = held-out evaluation prompts, FID against the test split (what is
#: reported); "validation" = validation prompts, other noise seeds, FID against the last 10k training
#: images (picking a stopping point without looking at the evaluation prompts or the test split)
SPLITS = ("evaluation", "validation")
VALIDATION_SEED_OFFSET = 1_000_000


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise QSchedError(f"unknown split {split!r}; allowed: {SPLITS}")
    return split


def first_seed(seed: int, split: str) -> int:
    """Image i of a run draws its noise from seed ``first_seed(seed, split) + i``."""
    return seed * 100003 + (VALIDATION_SEED_OFFSET if split == "validation" else 0)


def pipeline_from_checkpoint(folder: Path) -> "DiffusionPipeline":  # noqa: F821
    """A pipeline from a training checkpoint (teacher: EMA weights; student: target weights)."""
    from qsched.builtin.pipeline import QSchedBuiltinPipeline
    from qsched.builtin.train_common import load_checkpoint, load_module
    from qsched.builtin.unet import SHAPES, make_student_scheduler, make_teacher_scheduler, make_unet

    tensors, meta = load_checkpoint(folder)
    if meta["stage"] in ("flow-teacher", "flow-student"):
        return flow_pipeline_from_checkpoint(tensors, meta)
    student = meta["stage"] == "student"
    shape = SHAPES[meta["options"]["shape"]]
    unet = make_unet(shape, guidance_embedding=student)
    load_module("target" if student else "ema", unet, tensors)
    scheduler = make_student_scheduler() if student else make_teacher_scheduler()
    return QSchedBuiltinPipeline(unet=unet.eval(), scheduler=scheduler, patch_size=shape.patch_size)


def flow_pipeline_from_checkpoint(tensors: dict, meta: dict) -> "QSchedBuiltinFlowPipeline":  # noqa: F821
    """The flow pipeline of a ``flow-teacher`` / ``flow-student`` checkpoint (EMA / target weights)."""
    from qsched.builtin.flow import MAX_SEQUENCE_LENGTH, make_scheduler, transformer_from_record
    from qsched.builtin.flow_pipeline import QSchedBuiltinFlowPipeline
    from qsched.builtin.train_common import load_module

    config = meta["config"]
    student = meta["stage"] == "flow-student"
    transformer = transformer_from_record(config)
    load_module("target" if student else "ema", transformer, tensors)
    return QSchedBuiltinFlowPipeline(
        transformer=transformer.eval(), scheduler=make_scheduler(), distilled=student,
        patch_size=config.get("patch_size", 2), max_sequence_length=config.get("max_sequence_length", MAX_SEQUENCE_LENGTH),
        **({"default_guidance_scale": config["guidance_scale"]} if student else {}),
    )


def load_any(source: str) -> "DiffusionPipeline":  # noqa: F821
    from qsched.builtin.pipeline import load_builtin_pipeline

    path = Path(source)
    if (path / "state.json").is_file():
        pipe = pipeline_from_checkpoint(path)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return load_builtin_pipeline(source)


class KnnProbe:
    """k-NN (cosine, k=10) class vote against training images: a cheap generated-class check."""

    def __init__(self, *, data_root: str | Path = DEFAULT_ROOT, n: int = 20000, k: int = 10) -> None:
        split = load_split("train", root=data_root)
        x = torch.from_numpy(split.images[:n]).float().flatten(1)
        self.bank = torch.nn.functional.normalize(x - x.mean(1, keepdim=True), dim=1)
        self.labels = torch.from_numpy(split.labels[:n])
        self.k = k

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, 32, 32] in [0, 1] -> predicted class [B]."""
        x = images[:, 0].flatten(1) * 255.0
        x = torch.nn.functional.normalize(x - x.mean(1, keepdim=True), dim=1)
        idx = (x @ self.bank.T).topk(self.k, dim=1).indices
        votes = torch.nn.functional.one_hot(self.labels[idx], 10).sum(1)
        return votes.argmax(1)


def grid_png(images: torch.Tensor, rows: int, path: Path, *, scale: int = 2) -> None:
    """Save [N, 3, H, W] images in [0, 1] as a rows x (N/rows) PNG, upscaled (nearest)."""
    from PIL import Image

    n, _, h, w = images.shape
    cols = n // rows
    pad = 2
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 128, dtype=np.uint8)
    arr = (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)


def quick_eval(
    source: str, *, steps: Sequence[int], out: str | Path, guidance_scale: float = 3.0, per_class: int = 8,
    seed: int = 0, data_root: str | Path = DEFAULT_ROOT, threads: int = 1, split: str = "evaluation",
) -> dict:
    """Write grids (rows = classes; held-out prompts, or validation prompts for ``split="validation"``)
    and the k-NN class agreement per step count."""
    check_split(split)
    torch.set_num_threads(threads)
    pipe = load_any(source)
    probe = KnnProbe(data_root=data_root)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    templates = cap.VALIDATION_TEMPLATES if split == "validation" else cap.HELDOUT_TEMPLATES
    prompts, labels = [], []
    for label, phrases in enumerate(cap.CLASS_PHRASES):
        for j in range(per_class):
            template = templates[j % len(templates)]
            prompts.append(template.format(phrases[j % len(phrases)]))
            labels.append(label)
    labels_t = torch.tensor(labels)
    results = {"source": str(source), "split": split, "guidance_scale": guidance_scale, "per_class": per_class,
               "runs": {}}
    for n in steps:
        gens = [torch.Generator().manual_seed(first_seed(seed, split) + i) for i in range(len(prompts))]
        t0 = time.perf_counter()
        images = pipe(prompts, num_inference_steps=n, guidance_scale=guidance_scale, generator=gens,
                      output_type="pt").images
        seconds = time.perf_counter() - t0
        acc = float((probe.predict(images) == labels_t).float().mean())
        grid_png(images, len(cap.CLASS_NAMES), out / f"grid_{n}steps.png")
        results["runs"][str(n)] = {"knn_class_agreement": round(acc, 4), "seconds": round(seconds, 1),
                                   "pixel_std": round(float(images.std()), 4)}
        print(f"{n} steps: knn class agreement {acc:.3f}, {seconds:.1f}s", flush=True)
    (out / "quick_eval.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def prompt_metrics(
    source: str, *, steps: Sequence[int], n_images: int = 300, guidance_scale: float = 3.0, seed: int = 0,
    threads: int = 1, out: str | Path | None = None, split: str = "evaluation",
) -> dict:
    """On held-out evaluation (or validation, see ``SPLITS``) prompts: FID-EffNet vs the test split (or
    the validation reference), and with the built-in CLIP (when present) zero-shot class accuracy,
    CLIP score and CLIP-IQA; per step count."""
    from qsched.builtin.fid import fid, reference_stats

    check_split(split)
    torch.set_num_threads(threads)
    pipe = load_any(source)
    per_class = max(1, n_images // len(cap.CLASS_NAMES))
    validation = split == "validation"
    pairs = cap.validation_prompts(per_class=per_class) if validation else cap.evaluation_prompts(per_class=per_class)
    reference = reference_stats("effnet", reference_set="validation") if validation else None
    prompts, labels = [p for p, _ in pairs], torch.tensor([lab for _, lab in pairs])
    clip = None
    try:
        from qsched.builtin import clip as bclip

        model, processor = bclip.load_builtin_clip()
        clip = (bclip, model, processor, bclip.class_text_embeddings(model, processor, heldout=True))
    except (ImportError, QSchedError) as exc:
        print(f"built-in CLIP not available ({exc}); CLIP metrics skipped", flush=True)
    results: dict = {"source": str(source), "split": split, "n_images": len(prompts), "guidance_scale": guidance_scale,
                     "runs": {}}
    # FID of N real training images (the first N: never in the validation reference): the floor
    # of FID at this sample size (small-N FID is biased upwards)
    real = load_split("train").images[: len(prompts)]
    real_pt = torch.from_numpy(real).float().div(255.0).unsqueeze(1).repeat(1, 3, 1, 1)
    results["fid_effnet_real_train_same_n"] = round(fid(real_pt, kind="effnet", reference=reference), 2)
    print(f"FID-EffNet of {len(prompts)} real training images (floor): {results['fid_effnet_real_train_same_n']}")
    for n in steps:
        gens = [torch.Generator().manual_seed(first_seed(seed, split) + i) for i in range(len(prompts))]
        images = pipe(prompts, num_inference_steps=n, guidance_scale=guidance_scale, generator=gens,
                      output_type="pt").images
        row = {"fid_effnet": round(fid(images, kind="effnet", reference=reference), 2)}
        if clip is not None:
            bclip, model, processor, class_emb = clip
            img = bclip.encode_images(model, images)
            row["zero_shot_accuracy"] = round(float(((img @ class_emb.T).argmax(1) == labels).float().mean()), 4)
            txt = bclip.encode_texts(model, processor, prompts)
            row["clip_score"] = round(float((100.0 * (img * txt).sum(1)).clamp(min=0).mean()), 3)
            for name, pair in bclip.QUALITY_PROMPTS.items():
                row[f"clip_iqa_{name}"] = round(float(bclip.iqa_scores(model, processor, images, pair).mean()), 4)
        results["runs"][str(n)] = row
        print(f"{n} steps: {row}", flush=True)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsched.builtin.quick_eval", description=__doc__.splitlines()[0])
    p.add_argument("source", help="pipeline folder, 'student', 'teacher' or a training checkpoint folder")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--out", required=True)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=str(DEFAULT_ROOT))
    p.add_argument("--metrics", type=int, default=0, metavar="N",
                   help="also compute FID-EffNet (+ CLIP metrics) on N prompts of --split")
    p.add_argument("--split", choices=SPLITS, default="evaluation",
                   help="grids and --metrics on the held-out evaluation prompts, FID against the test split "
                        "(default), or on validation prompts, FID against the last 10k training images "
                        "(to choose between runs or snapshots)")
    args = p.parse_args(argv)
    try:
        if args.metrics:
            prompt_metrics(args.source, steps=args.steps, n_images=args.metrics, guidance_scale=args.guidance_scale,
                           seed=args.seed, threads=args.threads, out=args.out, split=args.split)
        quick_eval(args.source, steps=args.steps, out=args.out, guidance_scale=args.guidance_scale,
                   per_class=args.per_class, seed=args.seed, data_root=args.data_root, threads=args.threads,
                   split=args.split)
    except QSchedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
