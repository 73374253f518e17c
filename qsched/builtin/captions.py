"""Captions for Fashion-MNIST: class phrases x templates, four disjoint sets of templates.

Training captions use ``TRAIN_TEMPLATES``; evaluation prompts use only
``HELDOUT_TEMPLATES``, calibration prompts only ``CALIBRATION_TEMPLATES`` and validation
prompts (picking a training run's stopping point) only ``VALIDATION_TEMPLATES``. The
template sets share no template and no template can produce another's prompt, so the
prompt sets are disjoint by construction: generation is measured on phrasings never seen
in training or model selection, and Q-Sched is calibrated on prompts the evaluation never uses.
Run ``python -m qsched.builtin.captions`` to rewrite the prompt text files.
"""

from __future__ import annotations

from pathlib import Path

#: Fashion-MNIST label order.
CLASS_NAMES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

#: Noun phrases per class (article included where English wants one).
CLASS_PHRASES: tuple[tuple[str, ...], ...] = (
    ("a t-shirt", "a tee", "a short-sleeved top", "a t-shirt top"),
    ("a pair of trousers", "pants", "jeans", "a pair of slacks"),
    ("a pullover", "a sweater", "a jumper", "a knitted sweater"),
    ("a dress", "a summer dress", "a long dress", "a sleeveless dress"),
    ("a coat", "a jacket", "a winter coat", "an overcoat"),
    ("a sandal", "sandals", "a summer sandal", "an open-toe sandal"),
    ("a shirt", "a button-up shirt", "a blouse", "a long-sleeved shirt"),
    ("a sneaker", "running shoes", "a trainer", "a sports shoe"),
    ("a bag", "a handbag", "a purse", "a tote bag"),
    ("an ankle boot", "a boot", "ankle boots", "a short boot"),
)

TRAIN_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a photo of {}",
    "a picture of {}",
    "an image of {}",
    "a product photo of {}",
    "a black and white photo of {}",
    "a grayscale image of {}",
    "a catalogue image of {}",
    "a centered photo of {}",
    "a low resolution photo of {}",
    "a studio photo of {}",
    "a fashion photo of {}",
    "{} on a black background",
    "a small photo of {}",
)

HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a clean photo of {}",
    "a snapshot of {}",
    "a monochrome picture of {}",
    "a shop photo of {}",
    "a thumbnail of {}",
    "a simple image of {}",
)

#: Calibration-only templates: in neither the training nor the evaluation set, made of
#: words the built-in CLIP's vocabulary already holds (each stays a single token).
CALIBRATION_TEMPLATES: tuple[str, ...] = (
    "a simple photo of {}",
    "a clean picture of {}",
    "a shop image of {}",
)

#: Validation-only templates (model selection, e.g. a distillation's stopping point), in no other
#: set; words the built-in CLIP's vocabulary holds.
VALIDATION_TEMPLATES: tuple[str, ...] = (
    "a small picture of {}",
    "a studio image of {}",
    "a monochrome photo of {}",
)

PACKAGE_DIR = Path(__file__).resolve().parent
CALIBRATION_FILE = PACKAGE_DIR / "calibration_prompts.txt"
EVALUATION_FILE = PACKAGE_DIR / "evaluation_prompts.txt"
EVALUATION_LABELS_FILE = PACKAGE_DIR / "evaluation_labels.txt"


def training_captions() -> list[tuple[str, int]]:
    """Every training caption with its class index (classes x phrases x TRAIN_TEMPLATES)."""
    return [
        (template.format(phrase), label)
        for label, phrases in enumerate(CLASS_PHRASES)
        for phrase in phrases
        for template in TRAIN_TEMPLATES
    ]


def _heldout(label: int, k: int) -> str:
    """The k-th held-out caption of a class; cycles phrases and templates so both vary."""
    phrases = CLASS_PHRASES[label]
    template = HELDOUT_TEMPLATES[(k + label) % len(HELDOUT_TEMPLATES)]
    phrase = phrases[(k // len(HELDOUT_TEMPLATES) + k) % len(phrases)]
    return template.format(phrase)


def evaluation_prompts(*, per_class: int = 30) -> list[tuple[str, int]]:
    """Held-out prompts with labels, balanced and interleaved over classes (class-major order per round)."""
    return [(_heldout(label, k), label) for k in range(per_class) for label in range(len(CLASS_NAMES))]


def validation_prompts(*, per_class: int = 30) -> list[tuple[str, int]]:
    """Validation prompts with labels (``VALIDATION_TEMPLATES`` only), ordered as :func:`evaluation_prompts`.

    There are 12 distinct prompts per class (3 templates x 4 phrases); beyond that they repeat
    (with other noise seeds where the caller seeds per image)."""
    def prompt(label: int, k: int) -> str:
        template = VALIDATION_TEMPLATES[k % len(VALIDATION_TEMPLATES)]
        return template.format(CLASS_PHRASES[label][(k // len(VALIDATION_TEMPLATES)) % len(CLASS_PHRASES[label])])

    return [(prompt(label, k), label) for k in range(per_class) for label in range(len(CLASS_NAMES))]


def calibration_prompts(*, n: int = 16) -> list[str]:
    """Prompts for Q-Sched calibration: classes cycled, ``CALIBRATION_TEMPLATES`` only (so never an evaluation prompt)."""
    out = []
    for i in range(n):
        label = i % len(CLASS_NAMES)
        phrases = CLASS_PHRASES[label]
        template = CALIBRATION_TEMPLATES[i % len(CALIBRATION_TEMPLATES)]
        out.append(template.format(phrases[(i // len(CLASS_NAMES) + i) % len(phrases)]))
    return out


def write_prompt_files() -> None:
    """Write the packaged prompt text files (one prompt per line) for CLI use."""
    CALIBRATION_FILE.write_text("\n".join(calibration_prompts()) + "\n")
    ev = evaluation_prompts()
    EVALUATION_FILE.write_text("\n".join(p for p, _ in ev) + "\n")
    EVALUATION_LABELS_FILE.write_text("\n".join(CLASS_NAMES[lab] for _, lab in ev) + "\n")


if __name__ == "__main__":
    write_prompt_files()
