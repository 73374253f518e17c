"""Train the built-in CLIP contrastively on Fashion-MNIST captions and degraded copies.

Half of each batch is degraded (noise, salt-and-pepper, blotches, blur, blockiness,
contrast loss, posterization; mild or strong) and captioned with true quality claims
("a slightly noisy photo of a coat", "a blurry photo", "a good photo"), the rest with
class captions. Many captions in a batch are true of many images, so the loss is a
multi-positive InfoNCE: each image's target over the batch captions is proportional to how
true each caption is of it (and vice versa); graded antonym pairs ("clean"/"noisy") share
the weight by severity (see ``degrade.claim_weights``). The logit scale is fixed at 100, the
scale CLIPScore and CLIP-IQA apply, so the pair probabilities CLIP-IQA reports are the ones
trained. Resumable: weights and optimizer state in safetensors, progress in JSON.

    python -m qsched.builtin.clip_train --threads 1 --out runs/builtin/clip \
        --final qsched/builtin/assets/clip
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qsched.builtin import degrade as D
from qsched.builtin.clip import (
    ClipSpec,
    PooledCLIP,
    build_processor,
    build_tokenizer,
    class_text_embeddings,
    encode_images,
    encode_texts,
    new_clip,
    save_clip,
    to_pixel_values,
    vocabulary_words,
    QUALITY_PROMPTS,
)
from qsched.errors import QSchedError
from qsched.outdir import make_folder

#: caption forms that state a quality claim, with or without the class phrase
QUALITY_CLASS_TEMPLATES = ("{a} {q} photo of {p}", "{a} {q} image of {p}", "{a} {q} picture of {p}")
QUALITY_TEMPLATES = ("{a} {q} photo", "{a} {q} image", "{a} {q} picture", "{q} photo.")


@dataclass(frozen=True)
class TrainConfig:
    """Recipe of one CLIP training run (the checkpoint refuses to resume under another)."""

    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 150
    p_clean: float = 0.5
    seed: int = 0
    spec: ClipSpec = ClipSpec()


@dataclass(frozen=True)
class CaptionPool:
    """All training captions, tokenized once, with (class or -1, claim index) labels."""

    input_ids: torch.Tensor  # [M, L]
    attention_mask: torch.Tensor  # [M, L]
    cls: torch.Tensor  # [M]
    claim: torch.Tensor  # [M]
    buckets: dict[tuple[int, int], list[int]]  # (class or -1, claim) -> caption rows


def build_caption_pool(tokenizer: Any) -> CaptionPool:
    """Class captions (training templates), class + quality captions, and quality-only captions."""
    from qsched.builtin import captions

    rows: list[tuple[str, int, int]] = [(text, label, 0) for text, label in captions.training_captions()]
    for ci, name in enumerate(D.CLAIM_NAMES[1:], start=1):
        words = D.CLAIMS[name][0]
        for q in words:
            for t in QUALITY_TEMPLATES:
                rows.append((t.format(a=D.article(q), q=q), -1, ci))
            for label, phrases in enumerate(captions.CLASS_PHRASES):
                for p in phrases:
                    for t in QUALITY_CLASS_TEMPLATES:
                        rows.append((t.format(a=D.article(q), q=q, p=p), label, ci))
    tok = tokenizer([r[0] for r in rows], padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt")
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, (_, label, ci) in enumerate(rows):
        buckets.setdefault((label, ci), []).append(i)
    return CaptionPool(
        input_ids=tok["input_ids"],
        attention_mask=tok["attention_mask"],
        cls=torch.tensor([r[1] for r in rows]),
        claim=torch.tensor([r[2] for r in rows]),
        buckets=buckets,
    )


def sample_captions(labels: torch.Tensor, kinds: torch.Tensor, levels: torch.Tensor, pool: CaptionPool, rng: random.Random) -> torch.Tensor:
    """One true caption row per image: class-only, quality + class, or quality-only."""
    out = []
    for label, k, s in zip(labels.tolist(), kinds.tolist(), levels.tolist()):
        if rng.random() < (0.45 if k == 0 else 0.3):
            claim = "none"
        elif k == 0:
            claim = rng.choice(D.CLEAN_CLAIMS)
        else:
            true = D.true_claims(D.KINDS[k], s)
            claim = rng.choice(true if rng.random() < 0.2 else [c for c in true if c not in D.CLEAN_CLAIMS])
        with_class = claim == "none" or rng.random() < 0.5
        out.append(rng.choice(pool.buckets[(label if with_class else -1, D.CLAIM_NAMES.index(claim))]))
    return torch.tensor(out)


def pair_weights(img_cls: torch.Tensor, img_claims: torch.Tensor, cap_cls: torch.Tensor, cap_claim: torch.Tensor) -> torch.Tensor:
    """Float [images, captions]: how true caption j is of image i (class must match or be unstated)."""
    cls_ok = (cap_cls[None, :] == -1) | (cap_cls[None, :] == img_cls[:, None])
    return cls_ok.to(img_claims.dtype) * img_claims[:, cap_claim]


def multi_positive_loss(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE whose targets are proportional to ``weights`` (truth of each pair) per row / column."""
    t = weights.to(logits.dtype)
    i2t = -(t / t.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    t2i = -(t / t.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return 0.5 * (i2t + t2i)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a shift of up to 2 pixels (zero padding) of [N, 1, H, W] images."""
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = F.pad(x, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=gen).tolist()
    dy = torch.randint(0, 5, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 2% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


# ----------------------------------------------------------------------------- checkpoints


def _config_json(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg)))


def _config_from_json(data: dict[str, Any]) -> TrainConfig:
    spec = ClipSpec(**data.pop("spec"))
    return TrainConfig(spec=spec, **data)


def save_checkpoint(folder: Path, model: PooledCLIP, processor: Any, opt: torch.optim.Optimizer, cfg: TrainConfig, step: int, history: list[dict[str, Any]], elapsed: float) -> None:
    """Weights (save_pretrained), optimizer tensors (safetensors) and JSON state, written atomically."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        for p in tmp.iterdir():
            p.unlink()
    save_clip(model, processor, tmp)
    sd = opt.state_dict()
    tensors = {f"{idx}.{key}": val.contiguous() for idx, st in sd["state"].items() for key, val in st.items() if isinstance(val, torch.Tensor)}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "config": _config_json(cfg), "param_groups": sd["param_groups"], "history": history, "elapsed_s": elapsed}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            for p in old.iterdir():
                p.unlink()
            old.rmdir()
        folder.rename(old)
        tmp.rename(folder)
        for p in old.iterdir():
            p.unlink()
        old.rmdir()
    else:
        tmp.rename(folder)


def load_checkpoint(folder: Path, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer state from ``folder``; returns the JSON state (step, config, history)."""
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = val
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: PooledCLIP, processor: Any, test_images: torch.Tensor, test_labels: torch.Tensor, *, n_iqa: int = 300) -> dict[str, Any]:
    """Zero-shot class accuracy (held-out templates) and CLIP-IQA per kind at clean / mild / strong."""
    model.eval()
    classes = class_text_embeddings(model, processor, heldout=True)
    feats = encode_images(model, test_images)
    acc = (feats @ classes.T).argmax(1).eq(test_labels).float().mean().item()
    if n_iqa == 0:
        model.train()
        return {"zero_shot_acc": round(acc, 4), "iqa": {}}
    gen = torch.Generator().manual_seed(1234)
    x = test_images[:n_iqa]
    anchors = {name: encode_texts(model, processor, list(pair)) for name, pair in QUALITY_PROMPTS.items()}
    sets = {("none", 0): encode_images(model, x)}
    for kind in D.KINDS[1:]:
        for level in (1, 2):
            y = torch.round(D.degrade(x, kind, D.level_midpoint(level), generator=gen) * 255) / 255
            sets[(kind, level)] = encode_images(model, y)
    iqa: dict[str, dict[str, list[float]]] = {}
    for name, anchor in anchors.items():
        score = {key: (100.0 * f @ anchor.T).softmax(-1)[:, 0].mean().item() for key, f in sets.items()}
        iqa[name] = {kind: [round(score[(k, s)], 4) for k, s in (("none", 0), (kind, 1), (kind, 2))] for kind in D.KINDS[1:]}
    model.train()
    return {"zero_shot_acc": round(acc, 4), "iqa": iqa}


@torch.no_grad()
def evaluate_folder(path: str | Path | None = None, *, n_eval: int = 10_000, n_iqa: int = 1000) -> dict[str, Any]:
    """Held-out numbers of a saved CLIP: zero-shot accuracy, CLIPScore match vs mismatch, CLIP-IQA orderings.

    CLIP score and CLIP-IQA are computed by torchmetrics itself on uint8 [0, 255] images.
    """
    from torchmetrics.functional.multimodal import clip_score
    from torchmetrics.multimodal import CLIPImageQualityAssessment

    from qsched.builtin import captions
    from qsched.builtin.clip import load_builtin_clip
    from qsched.builtin.data import load_split

    model, processor = load_builtin_clip(path)
    test = load_split("test")
    x = torch.from_numpy(test.images[:n_eval]).unsqueeze(1)
    y = torch.from_numpy(test.labels[:n_eval])
    metrics = evaluate(model, processor, x.float() / 255, y, n_iqa=0)
    factory = lambda: (model, processor)  # noqa: E731
    k = min(200, n_eval)
    matched = [captions.HELDOUT_TEMPLATES[i % 6].format(captions.CLASS_PHRASES[int(y[i])][i % 4]) for i in range(k)]
    wrong = [captions.HELDOUT_TEMPLATES[i % 6].format(captions.CLASS_PHRASES[(int(y[i]) + 1 + i % 9) % 10][i % 4]) for i in range(k)]
    s_match = torch.stack([clip_score(x[i], matched[i], factory) for i in range(k)])
    s_wrong = torch.stack([clip_score(x[i], wrong[i], factory) for i in range(k)])
    metrics["clip_score"] = {"matched": round(float(s_match.mean()), 2), "mismatched": round(float(s_wrong.mean()), 2), "matched_higher": round(float((s_match > s_wrong).float().mean()), 4), "n": k}
    iqa = CLIPImageQualityAssessment(model_name_or_path=factory, data_range=1.0, prompts=tuple(QUALITY_PROMPTS.values()))
    gen = torch.Generator().manual_seed(4321)
    clean = x[:n_iqa]
    table: dict[str, dict[str, list[float]]] = {name: {} for name in QUALITY_PROMPTS}

    def score(images: torch.Tensor) -> list[float]:
        iqa.reset()
        iqa.update(images.float())
        out = iqa.compute()
        return [float(out[f"user_defined_{i}"].mean()) for i in range(len(QUALITY_PROMPTS))]

    base = score(clean)
    for kind in D.KINDS[1:]:
        levels = [base]
        for level in (1, 2):
            bad = D.degrade(clean.float() / 255, kind, D.level_midpoint(level), generator=gen)
            levels.append(score(torch.round(bad * 255)))
        for i, name in enumerate(QUALITY_PROMPTS):
            table[name][kind] = [round(v[i], 4) for v in levels]
    metrics["iqa"] = table
    metrics["ordered_kinds"] = {name: ordering_ok(v) for name, v in table.items()}
    metrics["n_iqa"] = n_iqa
    return metrics


def ordering_ok(iqa_kind: dict[str, list[float]]) -> int:
    """How many kinds satisfy clean > mild > strong."""
    return sum(1 for v in iqa_kind.values() if v[0] > v[1] > v[2])


# ----------------------------------------------------------------------------- training


def _optimizer(model: PooledCLIP, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (not embeddings, norms, biases); the logit scale stays fixed at 100."""
    model.clip.logit_scale.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def train(cfg: TrainConfig, *, out: Path, final: Path | None, eval_every: int = 200, ckpt_every: int = 100, n_eval: int = 2000, fresh: bool = False, log=print) -> dict[str, Any]:
    """Run (or resume) training; writes checkpoints to ``out/ckpt`` and the final model to ``final``."""
    from tqdm import tqdm

    from qsched.builtin.data import load_split

    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "ckpt"
    train_split, test_split = load_split("train"), load_split("test")
    train_x = torch.from_numpy(train_split.images).unsqueeze(1)  # uint8 [N, 1, 32, 32]
    train_y = torch.from_numpy(train_split.labels)
    test_x = torch.from_numpy(test_split.images[:n_eval]).unsqueeze(1).float() / 255
    test_y = torch.from_numpy(test_split.labels[:n_eval])

    tokenizer = build_tokenizer(vocabulary_words(), max_length=cfg.spec.max_text_length)
    processor = build_processor(tokenizer, image_size=cfg.spec.image_size)
    model = PooledCLIP(new_clip(cfg.spec, tokenizer, seed=cfg.seed)).train()
    opt = _optimizer(model, cfg)

    step, history, elapsed = 0, [], 0.0
    if ckpt.is_dir() and (ckpt / "state.json").is_file() and not fresh:
        saved = json.loads((ckpt / "state.json").read_text())
        if saved["config"] != _config_json(cfg):
            diff = {k: (saved["config"].get(k), v) for k, v in _config_json(cfg).items() if saved["config"].get(k) != v}
            raise QSchedError(f"checkpoint {ckpt} was made with another recipe (saved, given): {diff}; use --fresh or another --out")
        from transformers import CLIPModel

        model = PooledCLIP(CLIPModel.from_pretrained(ckpt, dtype=torch.float32)).train()
        opt = _optimizer(model, cfg)
        state = load_checkpoint(ckpt, opt)
        step, history, elapsed = state["step"], state["history"], state["elapsed_s"]
        log(f"resumed from {ckpt} at step {step} ({elapsed / 60:.1f} min trained)")

    pool = build_caption_pool(tokenizer)
    log(f"CLIP params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M; captions: {len(pool.cls)}; vocab: {len(tokenizer)}")
    bar = tqdm(total=cfg.steps, initial=step, desc="clip", mininterval=30, file=sys.stderr)
    t0 = time.perf_counter() - elapsed
    running = None
    while step < cfg.steps:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        rng = random.Random(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, train_x.shape[0], (cfg.batch_size,), generator=gen)
        x = augment(train_x[idx].float() / 255, gen)
        x, kinds, levels, severity = D.random_degrade(x, p_clean=cfg.p_clean, generator=gen)
        x = torch.round(x * 255) / 255  # what an 8-bit image would carry
        labels = train_y[idx]
        rows = sample_captions(labels, kinds, levels, pool, rng)
        weights = pair_weights(labels, D.claim_weights(kinds, levels, severity), pool.cls[rows], pool.claim[rows])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        img = F.normalize(model.get_image_features(to_pixel_values(x)), dim=-1)
        mask = pool.attention_mask[rows]
        length = int(mask.sum(1).max())  # trim the padding shared by the whole batch
        txt = F.normalize(model.get_text_features(pool.input_ids[rows, :length], mask[:, :length]), dim=-1)
        logits = model.clip.logit_scale.exp() * img @ txt.T
        loss = multi_positive_loss(logits, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        if step % 50 == 0 or step == cfg.steps:
            log(f"step {step}/{cfg.steps} loss {running:.4f} scale {model.clip.logit_scale.exp().item():.1f} lr {lr_at(step - 1, cfg):.2e} {(time.perf_counter() - t0) / 60:.1f} min")
        if step % eval_every == 0 or step == cfg.steps:
            metrics = evaluate(model, processor, test_x, test_y)
            metrics.update(step=step, loss=round(running, 4), minutes=round((time.perf_counter() - t0) / 60, 2))
            history.append(metrics)
            log("eval " + json.dumps({"step": step, "zero_shot_acc": metrics["zero_shot_acc"], "quality": metrics["iqa"]["quality"], "ordered_kinds": {k: ordering_ok(v) for k, v in metrics["iqa"].items()}}))
        if step % ckpt_every == 0 or step == cfg.steps:
            save_checkpoint(ckpt, model, processor, opt, cfg, step, history, time.perf_counter() - t0)
    bar.close()
    minutes = (time.perf_counter() - t0) / 60
    if final is not None:
        save_clip(model, processor, final)
        summary = {"config": _config_json(cfg), "train_minutes": round(minutes, 1), "threads": torch.get_num_threads(), "final_eval": history[-1] if history else None}
        (final / "training.json").write_text(json.dumps(summary, indent=1))
        log(f"saved the trained CLIP to {final}")
    return {"step": step, "minutes": minutes, "history": history}


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m qsched.builtin.clip_train [--steps N] [--threads T] --out DIR [--final DIR]``."""
    ap = argparse.ArgumentParser(prog="python -m qsched.builtin.clip_train", description=__doc__.split("\n")[0])
    defaults = TrainConfig()
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--tiny", action="store_true", help="a tiny model (for smoke tests)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/builtin/clip"))
    ap.add_argument("--final", type=Path, default=None, help="folder for the trained model (e.g. qsched/builtin/assets/clip)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    ap.add_argument("--evaluate", type=Path, default=None, metavar="DIR", help="only print held-out metrics of the CLIP saved in DIR")
    args = ap.parse_args(argv)
    if args.evaluate is not None:
        torch.set_num_threads(args.threads)
        try:
            print(json.dumps(evaluate_folder(args.evaluate), indent=1))
        except QSchedError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.steps < 1 or args.batch_size < 2 or args.threads < 1:
        ap.error("--steps and --threads must be >= 1 and --batch-size >= 2")
    torch.set_num_threads(args.threads)
    spec = ClipSpec(vision_width=32, vision_layers=1, vision_heads=2, vision_mlp=64, text_width=32, text_layers=1, text_heads=2, text_mlp=64, projection_dim=32) if args.tiny else ClipSpec()
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, spec=spec)
    log_file = (args.out / "train.log")
    try:
        make_folder(args.out)
    except QSchedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with log_file.open("a") as f:
            f.write(line + "\n")

    try:
        train(cfg, out=args.out, final=args.final, eval_every=args.eval_every, ckpt_every=args.ckpt_every, fresh=args.fresh, log=log)
    except QSchedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
