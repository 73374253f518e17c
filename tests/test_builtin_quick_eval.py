"""quick_eval's held-out metrics: which prompts, seeds and FID reference each split uses."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from qsched.builtin import captions as cap
from qsched.builtin import fid as FID
from qsched.builtin import quick_eval as QE
from qsched.errors import QSchedError


class RecordingPipe:
    """Stands in for a pipeline: records prompts and generator seeds, returns seeded gray images."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[int]]] = []

    def __call__(self, prompts, *, num_inference_steps, guidance_scale, generator, output_type):
        seeds = [g.initial_seed() for g in generator]
        self.calls.append((list(prompts), seeds))
        images = torch.stack([torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return SimpleNamespace(images=images.repeat(1, 3, 1, 1))


@pytest.fixture
def recorded(monkeypatch):
    pipe = RecordingPipe()
    references: list[object] = []
    sets: list[str] = []
    monkeypatch.setattr(QE, "load_any", lambda source: pipe)

    def fake_reference_stats(kind="effnet", *, reference_set="test", **kwargs):
        sets.append(reference_set)
        return f"stats-{reference_set}"

    def fake_fid(images, *, kind="effnet", reference=None, **kwargs):
        references.append(reference)
        return float(images.mean())

    monkeypatch.setattr(FID, "reference_stats", fake_reference_stats)
    monkeypatch.setattr(FID, "fid", fake_fid)
    return pipe, references, sets


def test_evaluation_split_uses_the_evaluation_prompts_and_the_test_reference(recorded, tmp_path):
    pipe, references, sets = recorded
    result = QE.prompt_metrics("x", steps=[4], n_images=20, out=tmp_path)
    prompts, seeds = pipe.calls[0]
    assert prompts == [p for p, _ in cap.evaluation_prompts(per_class=2)] and seeds == list(range(20))
    assert references == [None, None] and sets == []  # fid()'s default reference: the test split
    assert result["split"] == "evaluation" and 0 <= result["runs"]["4"]["zero_shot_accuracy"] <= 1
    assert json.loads((tmp_path / "metrics.json").read_text())["runs"]["4"]["fid_effnet"] == result["runs"]["4"]["fid_effnet"]


def test_validation_split_uses_other_prompts_seeds_and_reference(recorded):
    pipe, references, sets = recorded
    result = QE.prompt_metrics("x", steps=[2], n_images=20, split="validation")
    prompts, seeds = pipe.calls[0]
    assert prompts == [p for p, _ in cap.validation_prompts(per_class=2)]
    assert not set(prompts) & set(cap.EVALUATION_FILE.read_text().splitlines())
    assert seeds == [QE.VALIDATION_SEED_OFFSET + i for i in range(20)]
    assert sets == ["validation"] and references == ["stats-validation", "stats-validation"]
    assert result["split"] == "validation"


def test_unknown_split_is_refused(recorded):
    with pytest.raises(QSchedError, match="allowed"):
        QE.prompt_metrics("x", steps=[1], n_images=10, split="test")
    with pytest.raises(SystemExit) as exc:  # the CLI refuses it before loading anything (argparse: exit 2)
        QE.main(["x", "--out", "unused", "--metrics", "10", "--split", "test"])
    assert exc.value.code == 2 and recorded[0].calls == []


def test_grids_of_the_validation_split_use_validation_templates(recorded, tmp_path, monkeypatch):
    pipe, _, _ = recorded
    class ClassZeroProbe:
        def __init__(self, **kwargs) -> None:
            pass

        def predict(self, images):
            return torch.zeros(len(images), dtype=torch.long)

    monkeypatch.setattr(QE, "KnnProbe", ClassZeroProbe)
    QE.quick_eval("x", steps=[1], out=tmp_path, per_class=2, split="validation")
    prompts = pipe.calls[0][0]
    assert len(prompts) == 20 and all(any(p.startswith(t.split("{}")[0]) for t in cap.VALIDATION_TEMPLATES) for p in prompts)
    assert pipe.calls[0][1] == [QE.VALIDATION_SEED_OFFSET + i for i in range(20)]
    assert (tmp_path / "grid_1steps.png").is_file()
