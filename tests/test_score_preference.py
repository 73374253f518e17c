"""PickScore and HPSv2 scorers: values equal a direct computation, cached text, named errors, CLI wiring.

PickScore runs on a tiny random CLIP saved in transformers format; HPSv2 on a tiny
model served by a fake ``open_clip`` module (the real one needs torchvision, which is
not a test dependency), its weights read back from a ``{"state_dict": ...}`` file.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from qsched.builtin import clip as C
from qsched.cli import main
from qsched.errors import QSchedError
from qsched.score import build_scorer, scorer_info, scorer_names
from qsched.score.clip import as_uint8
from qsched.score.jaq import JAQ
from qsched.score.preference import hps_pixels

TINY = C.ClipSpec(vision_width=32, vision_layers=1, vision_heads=2, vision_mlp=64, text_width=32,
                  text_layers=1, text_heads=2, text_mlp=64, projection_dim=16)
PROMPTS = ["a photo of a coat", "a sneaker", "an ankle boot"]
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def grid_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images on the uint8 grid (k/255), so the uint8 conversion is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    tokenizer = C.build_tokenizer(C.vocabulary_words(), max_length=TINY.max_text_length)
    path = tmp_path_factory.mktemp("tiny_pickscore")
    C.save_clip(C.new_clip(TINY, tokenizer, seed=5), C.build_processor(tokenizer), path)
    return path


# ---------------------------------------------------------------- registry


def test_both_scorers_are_registered_as_alignment_and_need_local_weights() -> None:
    assert {"pickscore", "hpsv2"} <= set(scorer_names())
    assert scorer_info("pickscore").kind == scorer_info("hpsv2").kind == "alignment"
    with pytest.raises(QSchedError, match=r"scorer 'pickscore' needs the PickScore weights in a local folder "
                       r"\(transformers format\): pass path=.*qsched never downloads.*huggingface-cli download "
                       r"yuvalkirstain/PickScore_v1"):
        build_scorer("pickscore")
    with pytest.raises(QSchedError, match=r"scorer 'hpsv2' needs an HPSv2 checkpoint file: pass checkpoint=.*"
                       r"qsched never downloads.*xswu/HPSv2"):
        build_scorer("hpsv2")


def test_per_image_log_is_refused_for_hpsv2_scale_and_kept_for_pickscore() -> None:
    with pytest.raises(QSchedError, match=r"hpsv2 scores are about 0.15-0.35: every image would score 0; "
                       r"use transform 'none' \(--transform none\) or criterion 'new'"):
        JAQ(criterion="per-image", alignment="hpsv2")
    assert JAQ(criterion="per-image", alignment="hpsv2", transform="none").formula == "mean(hpsv2 + 1 * clipiqa)"
    assert JAQ(criterion="per-image", alignment="pickscore").formula == "mean(log(max(pickscore, 1)) + 1 * clipiqa)"
    # the reference's criterion takes the log of the set's mean: no floor, so HPSv2's scale is fine
    assert JAQ(alignment="hpsv2").formula == "log(mean(hpsv2)) + 2 * mean(clipiqa)"


# ---------------------------------------------------------------- pickscore


def direct_pickscore(folder: Path, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The official snippet with transformers: logit_scale.exp() * (text_embs @ image_embs.T), per pair."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    processor = CLIPProcessor.from_pretrained(folder)

    def pooled(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        image_inputs = processor(images=list(as_uint8(images)), return_tensors="pt")
        text_inputs = processor(text=prompts, padding=True, truncation=True,
                                max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
        image_embs = pooled(model.get_image_features(**image_inputs))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = pooled(model.get_text_features(**text_inputs))
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        return torch.diagonal(model.logit_scale.exp() * (text_embs @ image_embs.T))


def test_pickscore_equals_the_official_formula_per_pair(tiny_clip: Path) -> None:
    images = grid_images(3)
    scorer = build_scorer("pickscore", path=str(tiny_clip), batch_size=2)
    ours = scorer(images, PROMPTS)
    assert ours.shape == (3,)
    assert torch.allclose(ours, direct_pickscore(tiny_clip, images, PROMPTS), atol=1e-5)
    # one image per prompt: the score of image i does not depend on the other images
    assert torch.allclose(scorer(images[1:2], PROMPTS[1:2]), ours[1:2], atol=1e-5)
    grey = images[:, :1]
    assert torch.allclose(scorer(grey, PROMPTS), scorer(grey.expand(-1, 3, -1, -1), PROMPTS))


def test_pickscore_text_is_processed_once_per_prompt(tiny_clip: Path) -> None:
    scorer = build_scorer("pickscore", path=str(tiny_clip))
    texts: list[list[str]] = []
    encodes: list[int] = []
    processor, encode = scorer.processor, scorer.model.get_text_features

    def counting_processor(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("text") is not None:
            texts.append(list(kwargs["text"]))
        return processor(*args, **kwargs)

    scorer.processor = counting_processor
    scorer.model.get_text_features = lambda *a, **k: encodes.append(1) or encode(*a, **k)
    first = scorer(grid_images(3), PROMPTS)
    second = scorer(grid_images(3), PROMPTS)
    scorer(grid_images(2, seed=1), [PROMPTS[0], "a bag"])
    assert torch.equal(first, second)
    assert texts == [PROMPTS, ["a bag"]] and len(encodes) == 2


def test_pickscore_processor_from_another_folder(tiny_clip: Path, tmp_path: Path) -> None:
    from transformers import CLIPModel

    weights = tmp_path / "PickScore_v1"
    CLIPModel.from_pretrained(tiny_clip).save_pretrained(weights)  # weights only, as the hub repo's model files
    with pytest.raises(QSchedError, match=r"cannot load a PickScore processor from .*pass processor_path="):
        build_scorer("pickscore", path=str(weights))
    scorer = build_scorer("pickscore", path=str(weights), processor_path=str(tiny_clip))
    images = grid_images(2)
    assert torch.allclose(scorer(images, PROMPTS[:2]), direct_pickscore(tiny_clip, images, PROMPTS[:2]), atol=1e-5)


def test_pickscore_missing_folder_and_uncached_hub_id_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-pickscore"
    with pytest.raises(QSchedError, match=f"PickScore folder {missing} does not exist.*qsched never downloads"):
        build_scorer("pickscore", path=str(missing))
    with pytest.raises(QSchedError, match=r"cannot load a PickScore processor from qsched-test/no-such-model "
                       r"\(qsched does not download: it must be a local folder or in the local cache\)"):
        build_scorer("pickscore", path="qsched-test/no-such-model")


# ---------------------------------------------------------------- hpsv2 (fake open_clip)

SIZE, DIM, VOCAB, CONTEXT = 16, 8, 97, 6


class TinyOpenClip(nn.Module):
    """The part of an open_clip CLIP that the scorer uses: visual.image_size/mean/std, encode_*."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.visual = nn.Linear(3 * SIZE * SIZE, dim)
        self.visual.image_size = (SIZE, SIZE)
        self.visual.image_mean = MEAN
        self.visual.image_std = STD
        self.token_embedding = nn.Embedding(VOCAB, dim)
        self.text_projection = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.visual(image.flatten(1))

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.text_projection(self.token_embedding(text).mean(1))


def tokenize(texts: list[str]) -> torch.Tensor:
    rows = [[ord(c) % VOCAB for c in t[:CONTEXT]] + [0] * (CONTEXT - len(t[:CONTEXT])) for t in texts]
    return torch.tensor(rows, dtype=torch.long)


@pytest.fixture
def fake_open_clip(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    calls = types.SimpleNamespace(models=[], tokenized=[])
    module = types.ModuleType("open_clip")

    def create_model(model_name: str, pretrained: str | None = None, **kwargs: Any) -> TinyOpenClip:
        assert pretrained is None  # weights come from the checkpoint, never a download
        calls.models.append((model_name, kwargs))
        return TinyOpenClip()

    def get_tokenizer(model_name: str) -> Any:
        return lambda texts: calls.tokenized.append(list(texts)) or tokenize(list(texts))

    module.create_model = create_model
    module.get_tokenizer = get_tokenizer
    module.OPENAI_DATASET_MEAN, module.OPENAI_DATASET_STD = MEAN, STD
    monkeypatch.setitem(sys.modules, "open_clip", module)
    return calls


@pytest.fixture
def hps_checkpoint(tmp_path: Path) -> tuple[Path, TinyOpenClip]:
    torch.manual_seed(11)
    reference = TinyOpenClip().eval()
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": reference.state_dict()}, path)
    return path, reference


def test_hpsv2_is_the_diagonal_of_normalised_features(fake_open_clip, hps_checkpoint) -> None:
    path, reference = hps_checkpoint
    scorer = build_scorer("hpsv2", checkpoint=str(path), model_name="ViT-H-14", batch_size=2)
    assert fake_open_clip.models == [("ViT-H-14", {"precision": "fp32", "device": "cpu"})]
    images = grid_images(3, size=SIZE)
    ours = scorer(images, PROMPTS)
    with torch.no_grad():
        pixels = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        image_features = nn.functional.normalize(reference.encode_image(pixels), dim=-1)
        text_features = nn.functional.normalize(reference.encode_text(tokenize(PROMPTS)), dim=-1)
        expected = torch.diagonal(image_features @ text_features.T)
    assert ours.shape == (3,) and torch.allclose(ours, expected, atol=1e-5)
    scorer(images, PROMPTS)
    scorer(images[:1], ["a bag"])
    assert fake_open_clip.tokenized == [PROMPTS, ["a bag"]]  # text features cached per prompt


def test_kclip2_with_the_stand_in_hpsv2_is_mean_quality_plus_2_mean_hpsv2(fake_open_clip, hps_checkpoint,
                                                                        tiny_clip: Path) -> None:
    """The reference's kclip2 (quality map + k * HPSv2, k = 2), with CLIP-IQA standing in for its AQ-Map."""
    path, reference = hps_checkpoint
    jaq = JAQ(criterion="kclip2", quality="clipiqa", alignment_options={"checkpoint": str(path)},
              quality_options={"path": str(tiny_clip)})
    images = grid_images(3, size=SIZE)
    result = jaq.build()(images, PROMPTS)
    hps = build_scorer("hpsv2", checkpoint=str(path))(images, PROMPTS).double()
    iqa = build_scorer("clipiqa", path=str(tiny_clip))(images, PROMPTS).double()
    expected = sum(iqa.tolist()) / 3 + 2 * sum(hps.tolist()) / 3
    assert result.value == pytest.approx(expected, abs=1e-9)
    assert jaq.to_dict()["formula"] == "mean(clipiqa) + 2 * mean(hpsv2)"


def test_hps_pixels_resize_the_longer_side_and_pad_black_like_hpsv2() -> None:
    black = (-torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1)
    colour = torch.tensor([0.2, 0.6, 1.0]).view(1, 3, 1, 1)
    wide = colour.expand(1, 3, 16, 32).clone()  # H=16, W=32 -> 8 x 16, padded 4 rows above and below
    pixels = hps_pixels(wide, size=16, mean=MEAN, std=STD)[0]
    inner = ((torch.tensor([51, 153, 255]) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)).view(3, 1, 1)
    assert pixels.shape == (3, 16, 16)
    assert torch.allclose(pixels[:, :4].flatten(1), black.expand(3, 64))
    assert torch.allclose(pixels[:, 12:].flatten(1), black.expand(3, 64))
    assert torch.allclose(pixels[:, 4:12], inner.expand(3, 8, 16), atol=1e-6)
    tall = colour.expand(2, 3, 16, 8).clone()  # already fits: only padded left and right
    pixels = hps_pixels(tall, size=16, mean=MEAN, std=STD)
    assert torch.allclose(pixels[:, :, :, :4].reshape(2, 3, -1), black.expand(2, 3, 64))
    assert torch.allclose(pixels[:, :, :, 4:12], inner.expand(2, 3, 16, 8), atol=1e-6)
    big = grid_images(1, size=48)
    assert hps_pixels(big, size=16, mean=MEAN, std=STD).shape == (1, 3, 16, 16)


def test_hpsv2_errors_name_the_missing_piece(fake_open_clip, hps_checkpoint, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = hps_checkpoint
    missing = tmp_path / "HPS_v2_compressed.pt"
    with pytest.raises(QSchedError, match=f"scorer 'hpsv2': checkpoint {missing} does not exist"):
        build_scorer("hpsv2", checkpoint=str(missing))
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": TinyOpenClip(dim=4).state_dict()}, wrong)
    with pytest.raises(QSchedError, match=f"checkpoint {wrong} does not fit open_clip ViT-H-14"):
        build_scorer("hpsv2", checkpoint=str(wrong))
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(QSchedError, match="holds no state dict"):
        build_scorer("hpsv2", checkpoint=str(empty))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(QSchedError, match=f"cannot read the HPSv2 checkpoint {garbage}"):
        build_scorer("hpsv2", checkpoint=str(garbage))
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    with pytest.raises(QSchedError, match=r"scorer 'hpsv2' needs open_clip: pip install open-clip-torch"):
        build_scorer("hpsv2", checkpoint=str(path))


# ---------------------------------------------------------------- CLI


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_cli_alignment_path_reaches_the_scorer(tiny_pipeline_path, tiny_clip, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a shoe\na coat\n")
    base = ["calibrate", "--model", str(tiny_pipeline_path("lcm")), "--steps", "2", "--height", "32", "--width", "32",
            "--prompts", str(prompts), "--no-progress", "--clip", str(tiny_clip)]
    capsys.readouterr()  # what building the tiny pipeline printed
    for extra, message in [
        (["--alignment", "pickscore"], "scorer 'pickscore' needs the PickScore weights in a local folder"),
        (["--alignment", "pickscore", "--alignment-path", str(tmp_path / "nope")],
         f"PickScore folder {tmp_path / 'nope'} does not exist"),
        (["--criterion", "per-image", "--alignment", "hpsv2", "--alignment-path", str(tmp_path / "HPS.pt")],
         "use transform 'none' (--transform none)"),
        (["--alignment", "hpsv2", "--alignment-path", str(tmp_path / "HPS.pt")], f"checkpoint {tmp_path / 'HPS.pt'} does not exist"),
        (["--criterion", "kclip2", "--quality", "clipiqa"], "scorer 'hpsv2' needs an HPSv2 checkpoint file"),
        (["--criterion", "kclip2", "--alignment-path", str(tmp_path / "HPS.pt")], "name the quality scorer"),
        (["--alignment", "hpsv2", "--transform", "none", "--alignment-path", str(tmp_path / "HPS.pt")],
         f"checkpoint {tmp_path / 'HPS.pt'} does not exist"),
    ]:
        out = tmp_path / "refused"
        code, err = cli(capsys, *base, "--out", str(out), *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists()
    out = tmp_path / "out"
    code, err = cli(capsys, *base, "--out", str(out), "--alignment", "pickscore", "--alignment-path", str(tiny_clip),
                    "--search", "random", "--trials", "2")
    assert code == 0, err
    objective = json.loads((out / "card.json").read_text())["objective"]
    assert objective["formula"] == "log(mean(pickscore)) + 2 * mean(clipiqa)"
    assert objective["alignment_options"] == {"path": str(tiny_clip)}
    assert objective["quality_options"] == {"path": str(tiny_clip)}
