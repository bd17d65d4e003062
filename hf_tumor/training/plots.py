"""PNG figures for the model folder: training curves and confusion matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from hf_tumor.training.calibration import reliability_bins  # noqa: E402


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: list[str], path: Path, title: str) -> Path:
    """Write a confusion-matrix PNG (rows: true class, columns: predicted class)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=class_names).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d"
    )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curves(log_history: list[dict[str, Any]], path: Path) -> Path:
    """Write loss (train and validation) and validation accuracy / macro-F1 per epoch, from Trainer's log."""
    train = [(h["epoch"], h["loss"]) for h in log_history if "loss" in h and "epoch" in h]
    evals = [h for h in log_history if "eval_loss" in h]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot(*zip(*train), label="train loss", alpha=0.8)
    if evals:
        epochs = [h["epoch"] for h in evals]
        ax_loss.plot(epochs, [h["eval_loss"] for h in evals], "o-", label="validation loss")
        for key, label in (("eval_accuracy", "validation accuracy"), ("eval_f1_macro", "validation macro-F1")):
            if key in evals[0]:
                ax_score.plot(epochs, [h[key] for h in evals], "o-", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_score.set(xlabel="epoch", ylabel="score", title="Validation")
    for ax in (ax_loss, ax_score):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, n_bins: int = 15) -> Path:
    """Reliability diagram: accuracy against confidence per bin, one line per (probabilities, labels) entry."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    edges = np.linspace(0, 1, n_bins + 1)
    for name, (probs, labels) in curves.items():
        confidence, accuracy, _ = zip(*reliability_bins(probs, labels, n_bins))
        ax.plot(confidence, accuracy, "o-", label=name)
    ax.set(xlabel="confidence", ylabel="accuracy", title="Reliability (official test)", xlim=(0, 1), ylim=(0, 1.02),
           xticks=edges[::3])
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
