"""Calibration: expected calibration error, NLL, temperature scaling folded into the classifier.

Label smoothing leaves a model under-confident; one temperature fitted on validation logits fixes
most of that without changing any prediction (argmax is invariant to a positive scale).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hf_tumor.serving.inference import softmax


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> list[tuple[float, float, float]]:
    """(mean confidence, accuracy, share of samples) of each non-empty equal-width confidence bin."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)  # bin i holds (i/n, (i+1)/n]
    return [
        (float(confidence[bins == b].mean()), float(correct[bins == b].mean()), float((bins == b).mean()))
        for b in range(n_bins)
        if (bins == b).any()
    ]


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| x bin share."""
    return float(sum(share * abs(accuracy - confidence) for confidence, accuracy, share in reliability_bins(probs, labels, n_bins)))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of the true labels."""
    return float(F.cross_entropy(torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels)).item())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising NLL(logits / T) (optimised over log T with L-BFGS)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp().item())


@torch.no_grad()
def fold_temperature(model: torch.nn.Module, temperature: float) -> None:
    """Divide the classifier's weight and bias by ``temperature`` so its logits come out already scaled.

    The cumulative temperature is recorded in ``model.config.calibration_temperature`` (``temperature``
    is a reserved generation parameter in transformers configs).
    """
    head = model.timm_model.get_classifier()
    head.weight.div_(temperature)
    if head.bias is not None:
        head.bias.div_(temperature)
    model.config.calibration_temperature = float(getattr(model.config, "calibration_temperature", 1.0)) * temperature


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    """ECE (15 bins) and NLL before and after dividing the logits by ``temperature``."""
    scaled = np.asarray(logits) / temperature
    return {
        "ece_before": expected_calibration_error(softmax(logits), labels),
        "ece_after": expected_calibration_error(softmax(scaled), labels),
        "nll_before": negative_log_likelihood(logits, labels),
        "nll_after": negative_log_likelihood(scaled, labels),
    }
