"""Honest evaluation of a model folder: official and leak-free test, a lookup floor, calibration, intervals.

``evaluate_model`` writes ``eval_results.json`` (keys documented in EVAL_RESULTS_KEYS) and PNGs into
the model folder, and folds a temperature fitted on validation into the classifier so that the saved
model gives calibrated probabilities in plain ``pipeline()``.
"""

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
from sklearn.metrics import f1_score

from hf_tumor.contract import ARGS_FILE, EVAL_RESULTS_FILE, training_split_settings
from hf_tumor.serving.domain import energy_scores, energy_threshold
from hf_tumor.serving.inference import softmax, torch_forward, torch_outputs
from hf_tumor.serving.model import class_names_of, load_model, save_model_atomically
from hf_tumor.serving.neighbours import NeighbourCheck, fit
from hf_tumor.training.audit import fingerprints, run_audit, standardize, train_groups
from hf_tumor.training.calibration import calibration_report, fit_temperature, fold_temperature
from hf_tumor.training.data import attach_transforms, iterate_batches, load_splits, resolve_data_dir
from hf_tumor.training.plots import plot_confusion_matrix, plot_reliability

logger = logging.getLogger("hf_tumor")

METRIC_DIR = Path(__file__).parent / "metrics" / "classification_report"

EVAL_RESULTS_KEYS = """
eval_results.json
  model, data_dir             as given when relative, else the folder's name (no machine's absolute paths)
  class_names, image_size, seconds
  temperature                 fitted on validation and folded into the saved weights (1.0 = none)
  ood_energy_threshold        energy (-logsumexp of logits) above which the app flags an input;
                              the 99th percentile on validation slices (stored in config.json too)
  neighbour_check             k, threshold, reference_slices of the feature-space check (domain_features.npz):
                              cosine distance to the k-th nearest training slice; threshold on validation
  audit                       measure, threshold, num_images (train/test), test_with_train_twin,
                              exact_test_twins, clean_test (counts over the whole data folder)
  splits.{validation,test,clean_test}
    num_images
    accuracy, accuracy_ci95   bootstrap 95% interval (1000 resamples)
    f1_macro, f1_macro_ci95, precision_macro, recall_macro
    per_class.{name}          precision, recall, f1, support
    confusion_matrix          rows = true class, columns = predicted
    calibration               ece_before, ece_after (15 bins), nll_before, nll_after
    flagged_by_energy         (test splits) share of real test slices above the energy threshold
    flagged_by_neighbours     (test splits) share of real test slices beyond the neighbour threshold
    nn_baseline               (test splits) 1-nearest-neighbour lookup on 32x32 thumbnails:
                              accuracy, f1_macro, per_class, confusion_matrix
"""


@lru_cache(maxsize=1)
def classification_metric() -> evaluate.EvaluationModule:
    """The project's local `evaluate` module (works offline, unlike `evaluate.load("accuracy")`)."""
    return evaluate.load(str(METRIC_DIR))


def classification_metrics(predictions: np.ndarray, references: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    return classification_metric().compute(
        predictions=np.asarray(predictions).tolist(), references=np.asarray(references).tolist(), label_names=class_names
    )


def bootstrap_ci(predictions: np.ndarray, references: np.ndarray, n: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile bootstrap intervals of accuracy and macro-F1."""
    rng = np.random.default_rng(seed)
    labels = np.unique(references)
    accuracy, f1 = [], []
    for _ in range(n):
        idx = rng.integers(0, len(references), len(references))
        accuracy.append(np.mean(predictions[idx] == references[idx]))
        f1.append(f1_score(references[idx], predictions[idx], labels=labels, average="macro", zero_division=0))
    interval = lambda v: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]  # noqa: E731
    return {"accuracy_ci95": interval(accuracy), "f1_macro_ci95": interval(f1)}


def predict_logits(model: torch.nn.Module, view: Dataset, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every row of an ``attach_transforms`` view, in order, in fp32."""
    forward = torch_forward(model)
    logits, labels = [], []
    for batch in iterate_batches(view, batch_size):
        logits.append(forward(batch["pixel_values"]))
        labels.append(batch["labels"].numpy())
    return np.concatenate(logits), np.concatenate(labels)


def predict_features(model: torch.nn.Module, view: Dataset, batch_size: int = 32) -> np.ndarray:
    """Pooled penultimate features for every row of an ``attach_transforms`` view, in order."""
    outputs = torch_outputs(model)
    return np.concatenate([outputs(batch["pixel_values"])[1] for batch in iterate_batches(view, batch_size)])


def reference_slices(model_dir: Path, train: Dataset, pretrained_cfg: dict[str, Any]) -> Dataset:
    """The model's training slices: the Kaggle training split plus the healthy and patient slices its run
    added (train_args.json), so that the neighbour check knows every kind of slice the model has seen."""
    from types import SimpleNamespace

    from hf_tumor.training.train import add_healthy_slices, add_patient_slices  # training imports this module

    args_file = model_dir / ARGS_FILE
    data_args = json.loads(args_file.read_text()).get("DataArguments", {}) if args_file.is_file() else {}
    extra = SimpleNamespace(healthy_sources=data_args.get("healthy_sources") or [],
                            healthy_per_plane=data_args.get("healthy_per_plane", 16),
                            patient_sources=data_args.get("patient_sources") or [],
                            patients_dir=data_args.get("patients_dir"))
    if extra.healthy_sources:
        train = add_healthy_slices(train, extra, pretrained_cfg)
    if extra.patient_sources:
        train = add_patient_slices(train, extra, pretrained_cfg)
    return train


def fit_neighbour_check(model: torch.nn.Module, model_dir: Path, train: Dataset, validation_features: np.ndarray,
                        pretrained_cfg: dict[str, Any], batch_size: int = 32, max_reference: int = 2000) -> NeighbourCheck:
    """The neighbour check of ``hf_tumor.serving.neighbours``: up to ``max_reference`` training slices as the
    reference, the threshold on validation; saved into the model folder."""
    reference = reference_slices(model_dir, train, pretrained_cfg).shuffle(seed=0)
    reference = reference.select(range(min(max_reference, len(reference))))
    check = fit(predict_features(model, attach_transforms(reference, pretrained_cfg), batch_size), validation_features,
                max_reference=max_reference)
    check.save(model_dir)
    return check


def nearest_neighbour_labels(data_dir: str | os.PathLike, query_paths: list[str]) -> list[str]:
    """Label of the most correlated Training image (32x32 grayscale thumbnails) for each query path.

    Query paths are as ``load_image_folder`` gives them: under the resolved data folder.

    The floor any model must beat to show it learned more than a lookup of near copies.
    """
    fp = fingerprints(data_dir)
    root = Path(data_dir).resolve()
    index = {str(root / p): i for i, p in enumerate(fp.paths)}
    train = [i for i, s in enumerate(fp.splits) if s == "train"]
    thumbs = standardize(fp.nn_thumbs)
    queries = thumbs[[index[p] for p in query_paths]]
    nearest = (queries @ thumbs[train].T).argmax(dim=1).tolist()
    return [fp.labels[train[j]] for j in nearest]


def portable_path(path: str | os.PathLike) -> str:
    """A path fit to be written into a model folder: as given when relative, else only its last part, so
    that a folder copied or published names no directory of the machine that wrote it."""
    path = Path(path)
    return str(path) if not path.is_absolute() else path.name


def _split_report(
    logits: np.ndarray, labels: np.ndarray, class_names: list[str], temperature: float
) -> dict[str, Any]:
    predictions = logits.argmax(1)
    return {
        "num_images": int(len(labels)),
        **classification_metrics(predictions, labels, class_names),
        **bootstrap_ci(predictions, labels),
        "calibration": calibration_report(logits, labels, temperature),
    }


def evaluate_model(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    calibrate: bool = True,
    audit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model_dir``; write eval_results.json and PNGs there; fold the fitted temperature in.

    Validation is rebuilt exactly as in training (same split seed, fraction, subset and near-duplicate
    groups, read from train_args.json) and used only to fit the temperature. ``audit`` is the
    report of ``run_audit(data_dir)`` when the caller has it already.
    """
    model_dir = Path(model_dir)
    model = load_model(model_dir)
    pretrained_cfg = model.config.pretrained_cfg
    class_names = class_names_of(model.config)
    data_dir = resolve_data_dir(data_dir)
    audit = audit or run_audit(data_dir)
    settings = training_split_settings(model_dir)
    splits = load_splits(
        data_dir, pretrained_cfg, settings["validation_fraction"], settings["split_seed"],
        groups=train_groups(audit, data_dir), limit_per_class=settings["limit_per_class"],
    )
    if splits["test"].features["label"].names != class_names:
        raise ValueError(
            f"The model's classes {class_names} differ from the data's class folders {splits['test'].features['label'].names}."
        )

    start = time.perf_counter()
    val_logits, val_labels = predict_logits(model, attach_transforms(splits["validation"], pretrained_cfg), batch_size)
    test_logits, test_labels = predict_logits(model, attach_transforms(splits["test"], pretrained_cfg), batch_size)
    seconds = time.perf_counter() - start
    val_features = predict_features(model, attach_transforms(splits["validation"], pretrained_cfg), batch_size)
    test_features = predict_features(model, attach_transforms(splits["test"], pretrained_cfg), batch_size)

    temperature = fit_temperature(val_logits, val_labels) if calibrate else 1.0
    if calibrate:
        if abs(temperature - 1.0) > 1e-3:
            fold_temperature(model, temperature)
            logger.info("folded temperature %.3f (fitted on validation) into the classifier", temperature)
        model.config.ood_energy_threshold = energy_threshold(val_logits / temperature)
        save_model_atomically(model, model_dir)
        neighbours = fit_neighbour_check(model, model_dir, splits["train"], val_features, pretrained_cfg, batch_size)
    else:
        neighbours = NeighbourCheck.load(model_dir)

    root = Path(data_dir).resolve()
    test_paths = list(splits["test"]["path"])
    leaked = {str(root / p) for p in audit["test_with_train_twin"]["paths"]}
    clean = np.array([p not in leaked for p in test_paths])
    nn_labels = np.array([class_names.index(n) for n in nearest_neighbour_labels(data_dir, test_paths)])

    results: dict[str, Any] = {
        "model": portable_path(model_dir),
        "data_dir": portable_path(data_dir),
        "class_names": class_names,
        "image_size": int(pretrained_cfg["input_size"][-1]),
        "temperature": float(getattr(model.config, "calibration_temperature", temperature)),
        "audit": {
            "measure": audit["measure"],
            "threshold": audit["threshold"],
            "num_images": audit["num_images"],
            "test_with_train_twin": audit["test_with_train_twin"]["count"],
            "exact_test_twins": audit["test_with_train_twin"]["exact"],
            "clean_test": audit["clean_test"]["count"],
        },
        "ood_energy_threshold": getattr(model.config, "ood_energy_threshold", None),
        "neighbour_check": None if neighbours is None else {"k": neighbours.k, "threshold": neighbours.threshold,
                                                             "reference_slices": int(len(neighbours.reference))},
        "splits": {"validation": _split_report(val_logits, val_labels, class_names, temperature)},
        "seconds": round(seconds, 2),
    }
    for name, mask in (("test", np.ones_like(clean)), ("clean_test", clean)):
        if not mask.any():
            continue
        report = _split_report(test_logits[mask], test_labels[mask], class_names, temperature)
        baseline = classification_metrics(nn_labels[mask], test_labels[mask], class_names)
        report["nn_baseline"] = {k: baseline[k] for k in ("accuracy", "f1_macro", "per_class", "confusion_matrix")}
        if results["ood_energy_threshold"] is not None:
            energies = energy_scores(test_logits[mask] / temperature)
            report["flagged_by_energy"] = float(np.mean(energies > results["ood_energy_threshold"]))
        if neighbours is not None:
            far = neighbours.distances(test_features[mask]) > neighbours.threshold
            report["flagged_by_neighbours"] = float(np.mean(far))
        results["splits"][name] = report

    _write_report(model_dir, results, test_logits, test_labels, temperature)
    return results


def _write_report(model_dir: Path, results: dict[str, Any], logits: np.ndarray, labels: np.ndarray, temperature: float) -> None:
    (model_dir / EVAL_RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    names = results["class_names"]
    for split, filename, title in (("test", "confusion_matrix.png", "Official test"),
                                   ("clean_test", "confusion_matrix_clean.png", "Leak-free test")):
        if split in results["splits"]:
            r = results["splits"][split]
            plot_confusion_matrix(r["confusion_matrix"], names, model_dir / filename, f"{title}: accuracy {r['accuracy']:.2%}")
    plot_reliability(
        {"before temperature scaling": (softmax(logits), labels),
         f"after (T = {temperature:.2f})": (softmax(logits / temperature), labels)},
        model_dir / "reliability_diagram.png",
    )
    for split in ("test", "clean_test"):
        if split in results["splits"]:
            r = results["splits"][split]
            logger.info(
                "%s: accuracy %.4f [%.4f, %.4f], macro-F1 %.4f, ECE %.4f -> %.4f; nearest-neighbour floor %.4f (%d images)",
                split, r["accuracy"], *r["accuracy_ci95"], r["f1_macro"], r["calibration"]["ece_before"],
                r["calibration"]["ece_after"], r["nn_baseline"]["accuracy"], r["num_images"],
            )
