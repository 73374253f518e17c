"""Scorer registry and the CLIP scorers: per-image values equal torchmetrics', cached text, named errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qsched.builtin import clip as C
from qsched.errors import QSchedError
from qsched.score import build_scorer, check_scores, register_scorer, scorer_names
from qsched.score.clip import as_uint8, resolve_iqa_prompts

TINY = C.ClipSpec(vision_width=32, vision_layers=1, vision_heads=2, vision_mlp=64, text_width=32,
                  text_layers=1, text_heads=2, text_mlp=64, projection_dim=16)
PROMPTS = ["a photo of a coat", "a sneaker", "an ankle boot"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    tokenizer = C.build_tokenizer(C.vocabulary_words(), max_length=TINY.max_text_length)
    path = tmp_path_factory.mktemp("tiny_clip")
    C.save_clip(C.new_clip(TINY, tokenizer, seed=3), C.build_processor(tokenizer), path)
    return path


def grid_images(n: int, seed: int = 0) -> torch.Tensor:
    """Images on the uint8 grid (k/255), so the uint8 conversion is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 255


def test_registry_lists_known_names_and_rejects_unknown_ones() -> None:
    assert {"clip", "clipiqa"} <= set(scorer_names())
    with pytest.raises(QSchedError, match=r"unknown scorer 'imagereward'; known scorers: .*clip, clipiqa"):
        build_scorer("imagereward")
    with pytest.raises(QSchedError, match="has no option\\(s\\) colour; allowed: path, device, batch_size"):
        build_scorer("clip", colour="red")
    register_scorer("test-registry", lambda: (lambda images, prompts: images.mean((1, 2, 3))), replace=True)
    with pytest.raises(QSchedError, match="already registered"):
        register_scorer("test-registry", lambda: None)
    assert build_scorer("test-registry")(torch.ones(2, 3, 4, 4), ["a", "b"]).tolist() == [1.0, 1.0]


def test_check_scores_refuses_nan_and_wrong_shapes() -> None:
    with pytest.raises(QSchedError, match="non-finite"):
        check_scores("x", torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(QSchedError, match="returned 1 scores for 2 images"):
        check_scores("x", torch.tensor([1.0]), 2)


def test_clip_score_per_image_equals_torchmetrics(tiny_clip: Path) -> None:
    from torchmetrics.multimodal import CLIPScore

    scorer = build_scorer("clip", path=str(tiny_clip))
    images = grid_images(3)
    ours = scorer(images, PROMPTS)
    model, processor = C.load_builtin_clip(tiny_clip)
    for i, prompt in enumerate(PROMPTS):  # torchmetrics averages a batch; one image at a time is per-image
        metric = CLIPScore(model_name_or_path=lambda: (model, processor))
        metric.update(as_uint8(images[i : i + 1]), [prompt])
        assert ours[i].item() == pytest.approx(metric.compute().item(), abs=1e-3)
    assert ours.shape == (3,) and bool((ours >= 0).all())


def test_clip_text_features_are_computed_once_per_prompt(tiny_clip: Path) -> None:
    scorer = build_scorer("clip", path=str(tiny_clip))
    calls = []
    original = scorer.model.get_text_features
    scorer.model.get_text_features = lambda *a, **k: calls.append(1) or original(*a, **k)
    first = scorer(grid_images(3), PROMPTS)
    second = scorer(grid_images(3), PROMPTS)
    assert len(calls) == 1 and torch.equal(first, second)


def test_grey_images_score_like_their_rgb_repeat(tiny_clip: Path) -> None:
    scorer = build_scorer("clip", path=str(tiny_clip))
    grey = grid_images(2)[:, :1]
    assert torch.allclose(scorer(grey, PROMPTS[:2]), scorer(grey.expand(-1, 3, -1, -1), PROMPTS[:2]))


def test_clipiqa_is_the_softmax_over_each_pair_and_the_mean_over_pairs(tiny_clip: Path) -> None:
    pairs = [("a good photo", "a bad photo"), ("a sharp photo", "a blurry photo")]
    images = grid_images(4, seed=1)
    model, processor = C.load_builtin_clip(tiny_clip)
    expected = torch.stack([C.iqa_scores(model, processor, images, p) for p in pairs]).mean(0)
    scorer = build_scorer("clipiqa", path=str(tiny_clip), prompts=pairs)
    assert torch.allclose(scorer(images, [""] * 4), expected, atol=1e-5)
    one = build_scorer("clipiqa", path=str(tiny_clip), prompts=[pairs[0]])(images, [""] * 4)
    assert torch.allclose(one, C.iqa_scores(model, processor, images, pairs[0]), atol=1e-5)


def test_clipiqa_prompt_names_map_to_the_builtin_pairs() -> None:
    assert resolve_iqa_prompts(None, builtin=True) == (C.QUALITY_PROMPTS["quality"],)
    assert resolve_iqa_prompts(["quality"], builtin=False) == ("quality",)  # torchmetrics' own table
    with pytest.raises(QSchedError, match="positive, negative"):
        resolve_iqa_prompts([("only one",)], builtin=True)


def test_missing_weights_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-clip"
    with pytest.raises(QSchedError, match=f"CLIP folder {missing} does not exist"):
        build_scorer("clip", path=str(missing))
    monkeypatch.setattr(C, "ASSET_DIR", tmp_path / "assets" / "clip")
    with pytest.raises(QSchedError, match=f"built-in CLIP weights are missing: {tmp_path / 'assets' / 'clip'}"):
        build_scorer("clipiqa")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QSchedError, match="has no config.json"):
        build_scorer("clip", path=str(empty))
