"""ECE, temperature scaling and its folding into the classifier, on inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_tumor.serving.model import create_model
from hf_tumor.training.calibration import (
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    fold_temperature,
    negative_log_likelihood,
    softmax,
)
from hf_tumor.training.evaluation import bootstrap_ci


def test_ece_known_values():
    # 10 samples at confidence 0.9 of which 6 are right: one bin, |0.6 - 0.9| = 0.3
    probs = np.tile([0.9, 0.1], (10, 1))
    labels = np.array([0] * 6 + [1] * 4)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.3)
    # perfectly calibrated in two bins: 0.8 confidence with 80% right, 0.6 with 60% right
    probs = np.vstack([np.tile([0.8, 0.2], (10, 1)), np.tile([0.4, 0.6], (10, 1))])
    labels = np.array([0] * 8 + [1] * 2 + [1] * 6 + [0] * 4)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_temperature_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (20000, 4))
    labels = np.array([rng.choice(4, p=p) for p in softmax(true_logits)])
    overconfident = true_logits * 3.0
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.05)
    report = calibration_report(overconfident, labels, temperature)
    assert report["nll_after"] < report["nll_before"]
    assert report["ece_after"] < 0.02 < report["ece_before"]
    assert negative_log_likelihood(overconfident / temperature, labels) == pytest.approx(report["nll_after"])


def test_folded_temperature_equals_dividing_the_logits():
    torch.manual_seed(0)
    model = create_model("resnetv2_50", ["a", "b", "c", "d"], 32, init="scratch").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(pixel_values=x).logits
        fold_temperature(model, 2.5)
        after = model(pixel_values=x).logits
        fold_temperature(model, 2.0)
    torch.testing.assert_close(after, before / 2.5, rtol=1e-5, atol=1e-5)
    assert model.config.calibration_temperature == pytest.approx(5.0)


def test_bootstrap_interval_contains_the_point_estimate():
    rng = np.random.default_rng(1)
    references = rng.integers(0, 4, 500)
    predictions = np.where(rng.random(500) < 0.9, references, (references + 1) % 4)
    ci = bootstrap_ci(predictions, references, n=300)
    accuracy = np.mean(predictions == references)
    assert ci["accuracy_ci95"][0] < accuracy < ci["accuracy_ci95"][1]
    assert ci["accuracy_ci95"][1] - ci["accuracy_ci95"][0] < 0.08
