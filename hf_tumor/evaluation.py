"""Evaluate a trained model folder on the Testing split and write ``eval_results.json`` and PNGs beside it."""

from __future__ import annotations

import json
import logging
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
import torch
from datasets import Dataset

from hf_tumor.data import (
    attach_transforms,
    cache_resized,
    first_per_class,
    iterate_batches,
    load_image_folder,
    resolve_data_dir,
)
from hf_tumor.model import class_names_of, load_model
from hf_tumor.plots import plot_confusion_matrix

logger = logging.getLogger("hf_tumor")

METRIC_DIR = Path(__file__).parent / "metrics" / "classification_report"


@lru_cache(maxsize=1)
def classification_metric() -> evaluate.EvaluationModule:
    """The project's local `evaluate` module (works offline, unlike `evaluate.load("accuracy")`)."""
    return evaluate.load(str(METRIC_DIR))


def classification_metrics(predictions: np.ndarray, references: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    return classification_metric().compute(
        predictions=np.asarray(predictions).tolist(), references=np.asarray(references).tolist(), label_names=class_names
    )


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, view: Dataset, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every row of an ``attach_transforms`` view, in order, in fp32."""
    model.eval()
    logits, labels = [], []
    for batch in iterate_batches(view, batch_size):
        logits.append(model(pixel_values=batch["pixel_values"]).logits.float())
        labels.append(batch["labels"])
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate_model(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    limit_per_class: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` on the Testing split of ``data_dir``; write eval_results.json and a PNG there.

    ``limit_per_class`` evaluates only the first N test images of each class (quick checks).
    """
    model_dir = Path(model_dir)
    model = load_model(model_dir)
    pretrained_cfg = model.config.pretrained_cfg
    class_names = class_names_of(model.config)
    data_dir = resolve_data_dir(data_dir)
    test = load_image_folder(data_dir)["test"]
    if limit_per_class:
        test = first_per_class(test, limit_per_class)
    test = cache_resized(test, pretrained_cfg, "test")
    data_classes = list(test.features["label"].names)
    if data_classes != class_names:
        raise ValueError(f"The model's classes {class_names} differ from the data's class folders {data_classes}.")

    start = time.perf_counter()
    logits, labels = predict_logits(model, attach_transforms(test, pretrained_cfg), batch_size)
    seconds = time.perf_counter() - start
    report = classification_metrics(logits.argmax(1), labels, class_names)
    results = {
        "model": str(model_dir),
        "data_dir": str(Path(data_dir).resolve()),
        "class_names": class_names,
        "image_size": int(pretrained_cfg["input_size"][-1]),
        "splits": {"test": {"num_images": int(len(labels)), **report}},
        "seconds": round(seconds, 2),
    }
    (model_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_confusion_matrix(
        report["confusion_matrix"], class_names, model_dir / "confusion_matrix.png",
        f"Official test: accuracy {report['accuracy']:.2%}",
    )
    logger.info("test accuracy %.4f, macro-F1 %.4f on %d images", report["accuracy"], report["f1_macro"], len(labels))
    return results
