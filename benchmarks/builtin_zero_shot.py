"""Zero-shot class accuracy of the images of a `qsched evaluate` run on the built-in model.

Reads OUT/images/<config>/NNNNN.png and their records, takes each prompt's class from
the built-in evaluation prompt/label files, and classifies the images with the
built-in CLIP (mean text embedding of each class over the held-out templates).

    python benchmarks/builtin_zero_shot.py out/eval-builtin-4 [out/eval-builtin-2 ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qsched.builtin import captions
from qsched.builtin import clip as bclip


def prompt_labels() -> dict[str, int]:
    prompts = captions.EVALUATION_FILE.read_text().splitlines()
    names = captions.EVALUATION_LABELS_FILE.read_text().splitlines()
    return {p: captions.CLASS_NAMES.index(n) for p, n in zip(prompts, names) if p}


def config_accuracy(folder: Path, labels: dict[str, int], model, class_emb: torch.Tensor) -> tuple[float, int]:
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("[0-9]*.json"))]
    images = torch.stack([
        torch.from_numpy(np.asarray(Image.open(folder / r["file"]).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        for r in records
    ])
    truth = torch.tensor([labels[r["prompt"]] for r in records])
    predicted = (bclip.encode_images(model, images) @ class_emb.T).argmax(1)
    return float((predicted == truth).float().mean()), len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    labels = prompt_labels()
    model, processor = bclip.load_builtin_clip()
    class_emb = bclip.class_text_embeddings(model, processor, heldout=True)
    for run in args.runs:
        print(f"{run}:")
        for folder in sorted(p for p in (run / "images").iterdir() if p.is_dir()):
            accuracy, count = config_accuracy(folder, labels, model, class_emb)
            print(f"  {folder.name:14s} zero-shot accuracy {accuracy:.3f} ({count} images)")


if __name__ == "__main__":
    main()
