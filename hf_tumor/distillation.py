"""Knowledge distillation from an ensemble of trained model folders (``--teachers``).

Six seeds of one recipe, averaged, score 845 of 857 on the validation split where each alone scores
837-840: the ensemble knows more than any member, and distillation hands that to one model of the
same size and speed (Hinton et al., 2015). The teachers' soft targets are computed once, on the
unaugmented training images, and travel with the training split as a ``teacher_probs`` column; the
student sees them beside its augmented views (the augmentation is mild and label-preserving).

A teacher must have been trained on this run's training split and nothing else: one trained with
another validation split has seen validation images, and the student would learn them through it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoConfig

from hf_tumor.data import TEACHER_COLUMN, attach_transforms
from hf_tumor.evaluation import ARGS_FILE, predict_logits, run_folder, training_split_settings
from hf_tumor.model import class_names_of, load_model
from hf_tumor.preprocessing import image_size_of

logger = logging.getLogger("hf_tumor")

class TeacherError(ValueError):
    """A teacher that cannot be used for this run; the message says why."""


def check_teachers(teachers: Sequence[str], split: dict[str, Any], image_size: int, names: list[str]) -> None:
    """Raise TeacherError unless every teacher is a model folder trained on this split (``split`` as
    ``training_split_settings`` gives it), at this image size, with these classes."""
    for teacher in map(Path, teachers):
        if not (teacher / "config.json").is_file():
            raise TeacherError(f"teacher {teacher} is not a model folder (no config.json)")
        config = AutoConfig.from_pretrained(teacher)
        args_dir = run_folder(teacher)
        if args_dir is None:
            raise TeacherError(f"teacher {teacher} has no {ARGS_FILE} (nor has its parent folder): "
                               "which images it was trained on cannot be checked")
        settings = dict(training_split_settings(args_dir), image_size=image_size_of(config.pretrained_cfg))
        expected = dict(split, image_size=image_size)
        differing = {k: (settings[k], v) for k, v in expected.items() if settings[k] != v}
        if differing:
            shown = ", ".join(f"{k} {have} (this run: {want})" for k, (have, want) in differing.items())
            raise TeacherError(f"teacher {teacher} was trained on another split or size: {shown}")
        if class_names_of(config) != names:
            raise TeacherError(f"teacher {teacher} has classes {class_names_of(config)}, this run {names}")


def ensemble_probabilities(teachers: Sequence[str], train: Dataset, pretrained_cfg: dict[str, Any],
                           temperature: float, batch_size: int = 64, bf16: bool = False,
                           device: str | torch.device = "cpu") -> np.ndarray:
    """The teachers' mean softmax(logits / ``temperature``) on the unaugmented ``train`` images, [N, classes].

    A folder whose evaluation folded a calibration temperature into its classifier gets it undone first,
    so every teacher contributes its raw logits, and the validation labels that calibration saw stay out.
    """
    view = attach_transforms(train, pretrained_cfg)
    total = None
    for teacher in teachers:
        model = load_model(teacher).to(device)
        folded = float(getattr(model.config, "calibration_temperature", 1.0))
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            logits, labels = predict_logits(model, view, batch_size)
        probs = torch.softmax(torch.from_numpy(logits * folded) / temperature, dim=-1).numpy()
        logger.info("teacher %s: %.2f%% of the training images right", teacher, 100 * np.mean(logits.argmax(1) == labels))
        total = probs if total is None else total + probs
    return (total / len(teachers)).astype(np.float32)


def add_teacher_targets(train: Dataset, teachers: Sequence[str], pretrained_cfg: dict[str, Any],
                        temperature: float, bf16: bool = False, device: str | torch.device = "cpu") -> Dataset:
    """``train`` with a ``teacher_probs`` column: the ensemble's soft targets, row by row."""
    probs = ensemble_probabilities(teachers, train, pretrained_cfg, temperature, bf16=bf16, device=device)
    agree = np.mean(probs.argmax(1) == np.asarray(train["label"]))
    logger.info("%d teachers' ensemble: %.2f%% of the training images right (temperature %g)", len(teachers), 100 * agree, temperature)
    return train.add_column(TEACHER_COLUMN, [row.tolist() for row in probs])


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target term: temperature^2 * KL(teacher || softmax(student / temperature)), batch mean.

    The temperature^2 keeps its gradients on the scale of the hard-label loss whatever the temperature.
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_student, teacher_probs.float(), reduction="batchmean")
