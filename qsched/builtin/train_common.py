"""Shared training machinery for the built-in teacher and student.

Checkpoints are a folder with ``state.safetensors`` (weights, EMA, optimizer moments,
RNG state) and ``state.json`` (step, config, optimizer hyper-parameters, timing): no
pickle. All randomness flows from one ``torch.Generator`` whose state is checkpointed,
so a resumed run draws the same batches it would have drawn without the interruption.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from qsched.builtin import captions as cap
from qsched.builtin.data import DEFAULT_ROOT, load_split, to_model_range
from qsched.builtin.text import encode_prompts, load_text_encoder, load_tokenizer
from qsched.builtin.unet import patchify
from qsched.errors import QSchedError
from qsched.outdir import check_output_path, make_folder

logger = logging.getLogger("qsched.builtin.train")

CHECKPOINT_DIR = "checkpoint"
PIPELINE_DIR = "pipeline"
SNAPSHOT_DIR = "snapshots"


def snapshot_folder(out: Path, step: int) -> Path:
    """Where ``--snapshot-every`` puts the pipeline exported after ``step`` optimizer steps."""
    return out / SNAPSHOT_DIR / f"step-{step:05d}"


@dataclass(frozen=True)
class RunOptions:
    """Options shared by every stage."""

    out: str
    steps: int
    batch_size: int
    threads: int = 1
    lr: float = 3e-4
    seed: int = 0
    shape: str = "default"
    data_root: str = str(DEFAULT_ROOT)
    max_templates: int | None = None  # fewer caption templates: smoke runs and tests only
    checkpoint_minutes: float = 5.0
    log_every: int = 25
    resume: bool = False
    #: every N steps, also export the shadow (EMA / target) weights as a pipeline folder
    #: ``OUT/snapshots/step-NNNNN`` (0 = never): to pick a stopping point on validation prompts
    snapshot_every: int = 0


# ----------------------------------------------------------------------------- setup


def setup_run(opts: RunOptions) -> Path:
    """Create the output folder, configure threads and logging (file ``train.log`` + stderr)."""
    out = Path(opts.out)
    ckpt = out / CHECKPOINT_DIR
    if ckpt.exists() and not opts.resume:
        raise QSchedError(f"{ckpt} already exists; pass --resume to continue it or choose another --out")
    if opts.resume and not (ckpt / "state.json").is_file():
        raise QSchedError(f"--resume given but no checkpoint in {ckpt}; run without --resume to start")
    make_folder(out)
    torch.set_num_threads(opts.threads)
    log_to(out / "train.log")
    return out


def log_to(path: Path) -> None:
    """Send the training logger's records to ``path`` (appended) and stderr."""
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.FileHandler(path), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.propagate = False


# ----------------------------------------------------------------------------- data


class ImageBatches:
    """Random Fashion-MNIST training batches in UNet space, with random horizontal flips."""

    def __init__(self, *, data_root: str | Path, patch_size: int) -> None:
        split = load_split("train", root=data_root)
        self.images = torch.from_numpy(split.images)
        self.labels = torch.from_numpy(split.labels)
        self.patch_size = patch_size

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.labels), (batch_size,), generator=generator)
        x = to_model_range(self.images[idx])
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return patchify(x, self.patch_size), self.labels[idx]


class CaptionBank:
    """Text-encoder states of every training caption, computed once (the encoder is frozen).

    ``max_length``: tokens per caption (default: the tokenizer's, 32).
    """

    def __init__(self, *, max_templates: int | None = None, max_length: int | None = None) -> None:
        templates = cap.TRAIN_TEMPLATES[: max_templates or None]
        pairs = [(t.format(p), label) for label, ps in enumerate(cap.CLASS_PHRASES) for p in ps for t in templates]
        prompts = [p for p, _ in pairs] + [""]  # last = unconditional
        self.prompts = prompts  #: the caption of each index
        tokenizer, encoder = load_tokenizer(), load_text_encoder()
        t0 = time.perf_counter()
        states, masks = [], []
        for i in range(0, len(prompts), 64):
            s, m = encode_prompts(prompts[i : i + 64], tokenizer=tokenizer, text_encoder=encoder, max_length=max_length)
            states.append(s)
            masks.append(m)
        self.states = torch.cat(states)
        self.masks = torch.cat(masks)
        self.null_index = len(prompts) - 1
        labels = torch.tensor([label for _, label in pairs])
        self.by_class = [torch.nonzero(labels == c).flatten() for c in range(len(cap.CLASS_NAMES))]
        logger.info("encoded %d captions in %.1fs", len(prompts), time.perf_counter() - t0)

    def sample(
        self, labels: torch.Tensor, generator: torch.Generator, *, drop_prob: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random caption per label; with ``drop_prob`` the empty caption. Returns (states, mask, index)."""
        u = torch.rand(len(labels), generator=generator)
        idx = torch.stack(
            [self.by_class[int(c)][int(r * len(self.by_class[int(c)]))] for c, r in zip(labels, u)]
        )
        drop = torch.rand(len(labels), generator=generator) < drop_prob
        idx = torch.where(drop, torch.full_like(idx, self.null_index), idx)
        return self.states[idx], self.masks[idx], idx

    def null(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """States and mask of the empty caption, repeated."""
        i = torch.full((batch_size,), self.null_index)
        return self.states[i], self.masks[i]


# ----------------------------------------------------------------------------- weights


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` for its EMA / consistency target: same weights, eval mode, no gradients."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source (parameters and buffers)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, 1.0 - decay)
    for t, s in zip(target.buffers(), source.buffers()):
        t.copy_(s)


def module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}


def load_module(prefix: str, module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    sd = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    module.load_state_dict(sd, strict=True)


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Optimizer moments as flat tensors plus JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {
        f"optim.{i}.{name}": torch.as_tensor(value).contiguous()
        for i, state in sd["state"].items()
        for name, value in state.items()
    }
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value.clone()
    opt.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(out: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``out/checkpoint`` atomically (to a temporary folder, then rename)."""
    from safetensors.torch import save_file

    final = out / CHECKPOINT_DIR
    tmp = out / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta, indent=2, default=list) + "\n")
    old = out / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("state.safetensors", "state.json"):
        if not (folder / name).is_file():
            raise QSchedError(f"checkpoint file {folder / name} is missing")
    try:
        tensors = load_file(str(folder / "state.safetensors"))
        meta = json.loads((folder / "state.json").read_text())
    except Exception as exc:  # safetensors raises its own error types
        raise QSchedError(f"checkpoint in {folder} is corrupt ({exc}); delete it or restore a copy") from exc
    return tensors, meta


def write_checkpoint(
    out: Path, *, stage: str, step: int, opts: RunOptions, config: Mapping[str, Any], total: float,
    modules: Mapping[str, torch.nn.Module], opt: torch.optim.Optimizer, gen: torch.Generator,
) -> None:
    """Save ``modules`` (by prefix), the optimizer and the data RNG; :func:`resume_from_checkpoint` reads it."""
    tensors = {k: v for prefix, module in modules.items() for k, v in module_tensors(prefix, module).items()}
    opt_tensors, groups = optimizer_state(opt)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = gen.get_state()
    meta = run_meta(stage, step, opts, config, total)
    meta["param_groups"] = groups
    save_checkpoint(out, tensors, meta)


#: run options that may change when a run is resumed; every other option and the stage's whole
#: config must equal the checkpoint's, or the resumed run would not be the run it continues
RESUMABLE_CHANGES = ("steps", "threads", "checkpoint_minutes", "log_every", "snapshot_every")


def check_same_run(meta: Mapping[str, Any], *, stage: str, opts: RunOptions, config: Mapping[str, Any]) -> None:
    """Refuse to resume a checkpoint written by another stage, recipe or data order.

    Values are compared as the checkpoint stores them (JSON); keys the checkpoint does not
    record (written before the option existed) are not checked.
    """
    def as_json(d: Mapping[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps(dict(d)))

    if meta.get("stage", stage) != stage:
        raise QSchedError(f"the checkpoint is of stage {meta['stage']!r}, not {stage!r}; choose another --out")
    then = {**meta.get("options", {}), **meta.get("config", {})}
    now = {**as_json(asdict(opts)), **as_json(config)}
    differ = [f"{k}: {then[k]!r} -> {now[k]!r}" for k in sorted(then.keys() & now.keys())
              if k not in (*RESUMABLE_CHANGES, "out", "resume") and then[k] != now[k]]
    if differ:
        may = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE_CHANGES)
        raise QSchedError(f"--resume with other settings than the checkpoint's ({'; '.join(differ)}); pass the "
                          f"run's own options (only {may} may change) or choose another --out")


def resume_from_checkpoint(
    out: Path, *, modules: Mapping[str, torch.nn.Module], opt: torch.optim.Optimizer, gen: torch.Generator,
    stage: str, opts: RunOptions, config: Mapping[str, Any],
) -> tuple[int, float]:
    """Restore ``modules`` (by checkpoint prefix), the optimizer and the data RNG; returns (step, seconds).

    The checkpoint must be of the same run (:func:`check_same_run`)."""
    tensors, meta = load_checkpoint(out / CHECKPOINT_DIR)
    check_same_run(meta, stage=stage, opts=opts, config=config)
    for prefix, module in modules.items():
        load_module(prefix, module, tensors)
    load_optimizer(opt, tensors, meta["param_groups"])
    gen.set_state(tensors["rng.torch"])
    start, elapsed = int(meta["step"]), float(meta["elapsed_s"])
    logger.info("resumed from step %d (%.1f min trained)", start, elapsed / 60)
    return start, elapsed


def run_meta(stage: str, step: int, opts: RunOptions, extra: Mapping[str, Any], elapsed: float) -> dict[str, Any]:
    import diffusers
    import transformers

    return {
        "stage": stage,
        "step": step,
        "elapsed_s": round(elapsed, 1),
        "options": asdict(opts),
        "config": dict(extra),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
    }


# ----------------------------------------------------------------------------- loop


def train_loop(
    *,
    start_step: int,
    steps: int,
    step_fn: Callable[[int], float],
    checkpoint_fn: Callable[[int, float], None],
    elapsed_before: float,
    opts: RunOptions,
    snapshot_fn: Callable[[int], None] | None = None,
) -> float:
    """Run ``step_fn(step) -> loss`` from ``start_step`` to ``steps``; log, checkpoint and (every
    ``opts.snapshot_every`` steps, before the last) call ``snapshot_fn(step)``. Returns total elapsed s."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    t_ckpt = t_start
    t_log, step_log = t_start, start_step
    loss_avg = math.nan
    bar = tqdm(total=steps, initial=start_step, disable=None, file=sys.stderr, dynamic_ncols=True)
    step = start_step
    while step < steps:
        loss = step_fn(step)
        if not math.isfinite(loss):
            raise RuntimeError(f"loss is {loss} at step {step}; lower --lr and resume from the last checkpoint")
        loss_avg = loss if math.isnan(loss_avg) else 0.95 * loss_avg + 0.05 * loss
        step += 1
        bar.update(1)
        now = time.perf_counter()
        if step % opts.log_every == 0 or step == steps:
            rate = (step - step_log) / max(now - t_log, 1e-9)
            eta = (steps - step) / max(rate, 1e-9)
            logger.info(
                "step %d/%d loss %.4f (avg %.4f) %.2f it/s eta %dm%02ds",
                step, steps, loss, loss_avg, rate, int(eta // 60), int(eta % 60),
            )
            t_log, step_log = now, step
        if snapshot_fn is not None and opts.snapshot_every and step % opts.snapshot_every == 0 and step < steps:
            snapshot_fn(step)
        if now - t_ckpt > opts.checkpoint_minutes * 60 and step < steps:
            checkpoint_fn(step, elapsed_before + now - t_start)
            logger.info("checkpoint at step %d", step)
            t_ckpt = time.perf_counter()
    bar.close()
    total = elapsed_before + time.perf_counter() - t_start
    checkpoint_fn(step, total)
    logger.info("finished %d steps; training time %.1f min", step, total / 60)
    return total


def fit(
    out: Path, opts: RunOptions, *, stage: str, model: torch.nn.Module, shadow: tuple[str, torch.nn.Module],
    loss_fn: Callable[[int], torch.Tensor], shadow_decay: Callable[[int], float], warmup_steps: int,
    grad_clip: float, config: Mapping[str, Any], gen: torch.Generator,
    export: Callable[[Path], Path] | None = None,
) -> None:
    """Train ``model`` (resuming from ``out`` when ``opts.resume``): AdamW, linear warm-up, gradient clipping.

    ``shadow`` = (checkpoint prefix, module) is an exponential moving average of ``model``
    (the teacher's EMA, a consistency student's target), updated after every step with
    ``shadow_decay(step)``. ``loss_fn(step)`` draws its batch from ``gen`` (checkpointed with
    the weights, so a resumed run draws what an uninterrupted one would have drawn).
    ``export(folder)`` writes the shadow as a pipeline folder: used for ``opts.snapshot_every``.
    """
    shadow_name, shadow_module = shadow
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.0)
    modules = {"model": model, shadow_name: shadow_module}
    start, elapsed = (resume_from_checkpoint(out, modules=modules, opt=opt, gen=gen, stage=stage, opts=opts,
                                             config=config) if opts.resume else (0, 0.0))

    def step_fn(step: int) -> float:
        for group in opt.param_groups:
            group["lr"] = opts.lr * min(1.0, (step + 1) / warmup_steps)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        ema_update(shadow_module, model, shadow_decay(step))
        return float(loss.detach())

    def checkpoint_fn(step: int, total: float) -> None:
        write_checkpoint(out, stage=stage, step=step, opts=opts, config=config, total=total, modules=modules,
                         opt=opt, gen=gen)

    def snapshot_fn(step: int) -> None:
        export(snapshot_folder(out, step))  # the shadow is a frozen_copy: already in eval mode

    if opts.snapshot_every and export is None:
        raise ValueError(f"stage {stage} cannot export snapshots")
    model.train()
    t0 = time.perf_counter()
    train_loop(start_step=start, steps=opts.steps, step_fn=step_fn, checkpoint_fn=checkpoint_fn,
               elapsed_before=elapsed, opts=opts, snapshot_fn=snapshot_fn if opts.snapshot_every else None)
    logger.info("wall time this run %.1f min", (time.perf_counter() - t0) / 60)


def save_pipeline(folder: Path, pipe: Any) -> Path:
    """``pipe.save_pretrained(folder)`` (the text encoder stays in its pip package), logged."""
    pipe.save_pretrained(str(folder))
    logger.info("pipeline written to %s", folder)
    return folder


def export_pipeline(folder: Path, *, unet: torch.nn.Module, scheduler: Any) -> Path:
    """Save ``unet`` + ``scheduler`` as a QSchedBuiltinPipeline folder (text encoder from the pip package)."""
    from qsched.builtin.pipeline import QSchedBuiltinPipeline

    return save_pipeline(folder, QSchedBuiltinPipeline(unet=unet, scheduler=scheduler))


def env_threads_note() -> str:
    return f"threads={torch.get_num_threads()} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"


#: The denoiser components of the built-in pipeline folders, as saved by diffusers.
DENOISERS = ("unet", "transformer")


def ship_pipeline(src: str | Path, dst: str | Path, *, fp16: bool = True) -> Path:
    """Copy a pipeline folder to ``dst`` (e.g. ``qsched/builtin/assets/student``), weights in fp16.

    fp16 halves the shipped size; ``from_pretrained`` loads the weights back as float32.
    Works for both built-in pipelines (denoiser ``unet`` or ``transformer``).
    """
    import diffusers

    src, dst = Path(src), Path(dst)
    if not (src / "model_index.json").is_file():
        raise QSchedError(f"{src} is not a pipeline folder (no model_index.json)")
    index = json.loads((src / "model_index.json").read_text(encoding="utf-8"))
    denoiser = next((name for name in DENOISERS if name in index), None)
    if denoiser is None:
        raise QSchedError(f"{src} has no denoiser component ({' or '.join(DENOISERS)}) in its model_index.json")
    cls = getattr(diffusers, str(index[denoiser][1]), None)
    if cls is None:
        raise QSchedError(f"{src}: diffusers {diffusers.__version__} has no model class {index[denoiser][1]!r}")
    check_output_path(dst, option="DST")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(denoiser))
    model = cls.from_pretrained(str(src / denoiser))
    if fp16:
        model = model.half()  # not .to(float16): diffusers 0.42 warns on every dtype .to() (empty fp32 list)
    model.save_pretrained(str(dst / denoiser))
    return dst
