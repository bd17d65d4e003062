"""Training with the transformers ``Trainer``: ``hf-tumor train`` and ``accelerate launch scripts/train.py``.

Arguments are dataclasses read by ``HfArgumentParser`` (plus ``TrainingArguments``); a JSON or YAML
file may give them too, with command-line flags overriding it. The defaults are the recipe of the
bundled model (``models/resnetv2_50-scratch-128``) but for one field: its healthy slices also came from
a Debian package, so ``hf-tumor train --init scratch --healthy_sources mni152 itk_t1`` trains it again.
``main()`` reads top to bottom: parse, load data, build the model, train, save the model folder,
evaluate on test once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import timm
import torch
import transformers
import yaml
from datasets import Dataset, DatasetDict, concatenate_datasets
from transformers import EarlyStoppingCallback, EvalPrediction, HfArgumentParser, Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_tumor.contract import ARGS_FILE, HEALTHY_LABEL
from hf_tumor.serving.model import INIT_CHOICES, create_model, save_model_atomically
from hf_tumor.serving.preprocessing import make_pretrained_cfg
from hf_tumor.training.audit import run_audit, train_groups
from hf_tumor.training.augment import AugmentConfig
from hf_tumor.training.data import (
    DataError,
    attach_transforms,
    cached_rows,
    class_names,
    collate,
    iterate_batches,
    load_splits,
    resolve_data_dir,
)
from hf_tumor.training.evaluation import classification_metrics, evaluate_model
from hf_tumor.training.plots import plot_training_curves
from hf_tumor.training.runtime import accelerator_available, bf16_available, hardware_description, setup_logging

logger = logging.getLogger("hf_tumor")


@dataclass
class DataArguments:
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with Training/ and Testing/ class folders. Default: $HF_TUMOR_DATA, else a Kaggle download."},
    )
    image_size: int = field(default=128, metadata={"help": "Square input size in pixels (stored in the model config)."})
    validation_fraction: float = field(
        default=0.05,
        metadata={"help": "Stratified share of Training held out for validation (near-duplicate groups kept together). "
                          "It chooses nothing in the default recipe (the last epoch is kept); it fits the calibration "
                          "temperature and the out-of-distribution threshold."},
    )
    split_seed: int | None = field(
        default=None,
        metadata={"help": "Seed that draws the validation split (default: --seed). Fix it to compare training "
                          "seeds on one validation split."},
    )
    limit_per_class: int | None = field(
        default=None, metadata={"help": "Use only the first N images of each class per split (quick runs, tests)."}
    )
    healthy_sources: list[str] = field(
        default_factory=lambda: ["mni152"],
        metadata={"help": "Healthy MRI volumes of `hf-tumor external` whose slices, in all three planes from skull "
                          "base to vertex, join Training as extra notumor examples (needs hf-tumor[external]). The "
                          "default needs PyPI packages only; 'mni152 itk_t1' is the bundled model's run (itk_t1 needs "
                          "Debian's insighttoolkit5-examples). `hf-tumor external` then leaves them out of the "
                          "model's report. 'none': the Kaggle folders alone."},
    )
    healthy_per_plane: int = field(
        default=16, metadata={"help": "Evenly spaced slices per plane and volume taken from --healthy_sources."}
    )
    patient_sources: list[str] = field(
        default_factory=list,
        metadata={"help": "Real patients with a tumour mask (folder names under --patients_dir) whose axial slices join "
                          "Training: lesion slices as glioma, tumour-free slices of the same scans as notumor. "
                          "`hf-tumor patients` then reports them apart. Default: none."},
    )
    patients_dir: str | None = field(
        default=None, metadata={"help": "Folder holding the patients' folders. Default: $HF_TUMOR_PATIENTS, else "
                                        "shared/data beside the repository."},
    )
    evaluate_test: bool = field(
        default=True,
        metadata={"help": "After training, calibrate on validation and evaluate the final model once on the Testing split."},
    )

    def __post_init__(self) -> None:
        if [source.lower() for source in self.healthy_sources] == ["none"]:  # a command-line list cannot be empty
            self.healthy_sources = []


@dataclass
class ModelArguments:
    model_name: str = field(default="resnetv2_50", metadata={"help": "Any timm architecture name."})
    init: str = field(
        default="imagenet",
        metadata={"help": f"Initial weights: {INIT_CHOICES}. Without the Hub, 'imagenet' stops and names the other "
                          "two (no silent fallback). The bundled model was trained with 'scratch'."},
    )
    drop_rate: float = field(default=0.2, metadata={"help": "Dropout before the classifier."})
    channels_last: bool = field(
        default=True, metadata={"help": "Train in channels-last memory format (1.2x faster on an AVX2 CPU, faster on GPUs)."}
    )
    precise_bn_images: int = field(
        default=512,
        metadata={"help": "Recompute BatchNorm statistics on this many (unaugmented) training images before each "
                          "evaluation and at the end (0: off). Running averages lag badly early in from-scratch training."},
    )
    decay_norm_and_bias: bool = field(
        default=True,
        metadata={"help": "Apply weight decay to biases and norm weights too, as a bare "
                          "torch.optim.AdamW(model.parameters()) does (false: the Trainer's default, which exempts them)."},
    )
    early_stopping_patience: int = field(
        default=0,
        metadata={"help": "Stop after this many evaluations without a better validation macro-F1 (0: never). Use it "
                          "with --load_best_model_at_end true."},
    )


# Defaults of ours for TrainingArguments fields; any of them can still be set on the command line.
# With the dataclass defaults above they are the bundled model's recipe (docs/experiments.md, candidate 3):
# one 24-epoch cosine cycle from scratch at 128 px, no gradient clipping, the last epoch kept; TorchIO's
# MRI artefacts at 0.15 and healthy whole-head slices among the notumor examples. One difference: the
# bundled run cut its 96 healthy slices from mni152 and itk_t1, the defaults take 48 from mni152 alone
# so that a bare run needs nothing outside PyPI (`--healthy_sources mni152 itk_t1` is the bundled run).
TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/resnetv2_50",
    "num_train_epochs": 24,
    "learning_rate": 2e-3,
    "weight_decay": 0.05,
    "warmup_steps": 200,
    "lr_scheduler_type": "cosine",
    "label_smoothing_factor": 0.1,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "max_grad_norm": 0.0,  # no clipping: clipping at 1.0 was measured worse (run 13)
    # the last epoch's weights, where one cosine cycle ends at zero; choosing the best validation
    # checkpoint cost test images on four of five seeds (run 20)
    "load_best_model_at_end": False,
    "metric_for_best_model": "f1_macro",
    "greater_is_better": True,
    "logging_steps": 20,
    "report_to": "none",
    "remove_unused_columns": False,  # the dataset's transform makes pixel_values; nothing to drop
    "dataloader_num_workers": 1,
    "ddp_find_unused_parameters": False,  # every parameter is used; skips an extra graph traversal
    "seed": 42,
}


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((DataArguments, ModelArguments, AugmentConfig, TrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS, bf16=bf16_available(), use_cpu=not accelerator_available())
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[DataArguments, ModelArguments, AugmentConfig, TrainingArguments]:
    """Parse flags; a first argument ending in .json/.yaml/.yml is a file of defaults that flags override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        path = Path(argv.pop(0))
        if not path.is_file():
            raise SystemExit(f"error: argument file {path} not found")
        values = yaml.safe_load(path.read_text()) or {}  # JSON is YAML too
        known = {f.name for dc in parser.dataclass_types for f in dataclasses.fields(dc)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"error: unknown argument(s) in {path}: {', '.join(unknown)}")
        parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=argv)


@torch.no_grad()
def recompute_batchnorm_stats(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace BatchNorm running statistics by their exact average over ``batches`` ("precise BN").

    Early in from-scratch training at a high learning rate the weights move faster than the running
    averages (momentum 0.1) follow: measured here, a checkpoint scored 30% on validation in eval
    mode and 79% once its statistics were recomputed. Returns the number of images used.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches below
    model.train()
    device = next(model.parameters()).device
    seen = 0
    for pixel_values in batches:
        model(pixel_values=pixel_values.to(device))
        seen += len(pixel_values)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return seen


class RecipeTrainer(Trainer):
    """The ``Trainer`` with the two changes this recipe makes to it:

    - **precise BN**: before every evaluation (so before every checkpoint, and before the final
      validation), BatchNorm statistics are recomputed on ``bn_view``, unaugmented training images
      (``--precise_bn_images``; see ``recompute_batchnorm_stats``);
    - **weight decay on every parameter** with ``decay_everything`` (``--decay_norm_and_bias``), as a
      bare ``torch.optim.AdamW(model.parameters())`` does, instead of the Trainer's exemption of biases
      and norm weights.

    Everything else (loss, label smoothing, optimizer, schedule, checkpoints) is the Trainer's own.
    """

    def __init__(self, *args, bn_view: Dataset | None = None, decay_everything: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.bn_view = bn_view
        self.decay_everything = decay_everything

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        if self.decay_everything:
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    def evaluate(self, *args, **kwargs):
        if self.bn_view is not None and len(self.bn_view):
            batches = (b["pixel_values"] for b in iterate_batches(self.bn_view, self.args.per_device_eval_batch_size))
            recompute_batchnorm_stats(self.model, batches)
        return super().evaluate(*args, **kwargs)


def compute_metrics_for(class_names: list[str]):
    """``compute_metrics`` for the Trainer: validation accuracy and macro-F1 (scalars only)."""

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        report = classification_metrics(np.argmax(prediction.predictions, axis=-1), prediction.label_ids, class_names)
        return {"accuracy": report["accuracy"], "f1_macro": report["f1_macro"]}

    return compute


def save_resolved_args(output_dir: Path, argv: Sequence[str], *groups: Any, program: str = "hf-tumor train") -> None:
    """The arguments this run actually used, with the versions and hardware, for the model card and for reproducing it."""
    resolved: dict[str, Any] = {"command": f"{program} " + " ".join(shlex.quote(a) for a in argv)}
    for group in groups:
        values = group.to_dict() if isinstance(group, TrainingArguments) else dataclasses.asdict(group)
        resolved[type(group).__name__] = values
    resolved["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "timm": timm.__version__}
    resolved["hardware"] = hardware_description()
    (output_dir / ARGS_FILE).write_text(json.dumps(resolved, indent=2, default=str) + "\n")


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint that was fully written, or None.

    The Trainer writes ``trainer_state.json`` last in each checkpoint, and not atomically: a run killed
    while saving leaves a folder without it (or with a truncated one). Resuming from that folder would
    crash, so such folders are skipped (and left on disk for inspection).
    """
    steps = {int(p.name.rsplit("-", 1)[1]): p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()}
    for checkpoint in (steps[step] for step in sorted(steps, reverse=True)):
        try:
            json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
            return str(checkpoint)
        except (OSError, ValueError):
            logger.warning("skipping %s: incompletely written (the run was stopped while saving it)", checkpoint)
    return None


def given_explicitly(argv: Sequence[str], name: str) -> bool:
    """Whether ``--name`` is set on the command line or in its argument file, not left to a default."""
    flag = f"--{name}"
    if any(arg == flag or arg.startswith(flag + "=") for arg in argv):
        return True
    if argv and argv[0].endswith((".json", ".yaml", ".yml")) and Path(argv[0]).is_file():
        return name in (yaml.safe_load(Path(argv[0]).read_text()) or {})
    return False


def precision_name(bf16: bool) -> str:
    return "bf16 autocast" if bf16 else "fp32"


def check_resume_precision(checkpoint: str, bf16: bool, explicit: bool) -> None:
    """Refuse to resume ``checkpoint`` in another precision than it was trained in, unless asked to.

    ``--bf16`` defaults to what the machine does natively (``bf16_available``), so a run resumed on
    another machine (say an AVX2-only CPU after one with AVX512-BF16) would otherwise switch precision
    in the middle of its schedule without a word.
    """
    saved = Path(checkpoint) / TRAINING_ARGS_NAME
    if explicit or not saved.is_file():
        return
    started = bool(getattr(torch.load(saved, weights_only=False), "bf16", False))  # our own file, a pickle
    if started != bf16:
        raise SystemExit(
            f"error: {checkpoint} was trained in {precision_name(started)}, and this machine's default is "
            f"{precision_name(bf16)} ({hardware_description()}). Resuming would change precision in the "
            f"middle of the run. Pass --bf16 {started} to go on as it started"
            f"{' (emulated bf16 on a CPU without native bf16 is about 17x slower)' if started else ''}, or "
            f"--bf16 {bf16} to go on in {precision_name(bf16)} ({ARGS_FILE} then records it)."
        )


@dataclass
class PreparedData:
    """What a training loop needs from the data folder; the audit is kept for the test evaluation."""

    data_dir: Path
    pretrained_cfg: dict[str, Any]
    audit: dict[str, Any]
    splits: DatasetDict  # train / validation / test, decoded, resized and cached
    names: list[str]


def split_seed_of(data_args: DataArguments, training_args: TrainingArguments) -> int:
    """The seed of the validation split: ``--split_seed`` if given, else the training seed."""
    return training_args.seed if data_args.split_seed is None else data_args.split_seed


def prepare_data(data_args: DataArguments, model_args: ModelArguments, training_args: TrainingArguments) -> PreparedData:
    """Audit the data folder, then decode, cache and split it, as every training loop here sees it."""
    data_dir = resolve_data_dir(data_args.data_dir)
    pretrained_cfg = make_pretrained_cfg(model_args.model_name, data_args.image_size)
    with training_args.main_process_first(desc="audit, decode and cache the images"):
        # near-duplicate groups stay on one side of the train/validation split, so that model
        # selection does not reward memorising copies
        audit = run_audit(data_dir)
        groups = train_groups(audit, data_dir)
        splits = load_splits(
            data_dir, pretrained_cfg, data_args.validation_fraction, split_seed_of(data_args, training_args),
            groups=groups, limit_per_class=data_args.limit_per_class,
        )
    names = class_names(splits["train"])
    if data_args.healthy_sources:
        splits["train"] = add_healthy_slices(splits["train"], data_args, pretrained_cfg)
    if data_args.patient_sources:
        splits["train"] = add_patient_slices(splits["train"], data_args, pretrained_cfg)
    logger.info("classes %s; train %d, validation %d, test %d images",
                names, len(splits["train"]), len(splits["validation"]), len(splits["test"]))
    return PreparedData(data_dir, pretrained_cfg, audit, splits, names)


def add_healthy_slices(train: Dataset, data_args: DataArguments, pretrained_cfg: dict[str, Any]) -> Dataset:
    """Training plus slices of healthy volumes at every level, labelled as the healthy class.

    Trained on the Kaggle folders alone, the model called healthy skull-base, vertex and outer
    coronal or sagittal slices of other scanners tumours: it had learnt each class's typical level
    and framing. Slices of whole healthy heads say otherwise. Validation stays Kaggle only, so that
    it measures what it always has.
    """
    from hf_tumor.checks.external import build_suite
    from hf_tumor.serving.volumes import PLANES, VolumeError

    names = class_names(train)
    if HEALTHY_LABEL not in names:
        raise DataError(f"--healthy_sources needs a {HEALTHY_LABEL!r} class; the classes are {names} "
                        "(--healthy_sources none: no healthy slices)")
    try:
        suite = build_suite(data_args.healthy_sources, per_plane={plane: data_args.healthy_per_plane for plane in PLANES})
    except VolumeError as error:
        raise DataError(f"{error} (or train on the Kaggle folders alone: --healthy_sources none)") from error
    extra = cached_rows(
        [s.image for s in suite],
        [f"external:{s.source}/{s.plane}/{s.index:03d}" for s in suite],
        names.index(HEALTHY_LABEL),
        train.features,
        pretrained_cfg,
    )
    logger.info("added %d healthy slices of %s as %s training examples", len(extra), ", ".join(data_args.healthy_sources), HEALTHY_LABEL)
    return concatenate_datasets([train, extra])


def add_patient_slices(train: Dataset, data_args: DataArguments, pretrained_cfg: dict[str, Any]) -> Dataset:
    """Training plus the masked patients' axial slices: lesion slices as glioma, tumour-free ones as the
    healthy class (:mod:`hf_tumor.training.patient_slices`). Validation stays Kaggle only."""
    from hf_tumor.checks.patients import PatientDataError
    from hf_tumor.training.patient_slices import collect

    names = class_names(train)
    try:
        found = collect(data_args.patient_sources, data_args.patients_dir)
    except PatientDataError as error:
        raise DataError(str(error)) from error
    parts = [train]
    for label in sorted({HEALTHY_LABEL} | {s.label for s in found if s.lesion}):
        if label not in names:
            raise DataError(f"--patient_sources labels slices {label!r}, which is not one of the classes {names}")
        chosen = [s for s in found if (s.label if s.lesion else HEALTHY_LABEL) == label]
        parts.append(cached_rows([s.image for s in chosen],
                                 [f"patient:{s.patient}/{s.sequence}/{s.index:03d}" for s in chosen],
                                 names.index(label), train.features, pretrained_cfg))
        logger.info("added %d slices of patients %s as %s", len(chosen), ", ".join(data_args.patient_sources), label)
    return concatenate_datasets(parts)


def main(argv: Sequence[str] | None = None) -> Path:
    """Train a model folder from the command line; returns its path."""
    argv = list(sys.argv[1:] if argv is None else argv)
    data_args, model_args, augment, training_args = parse_args(argv)
    setup_logging(training_args.should_log)
    transformers.set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    logger.info("training on %s in %s", hardware_description(), precision_name(training_args.bf16))
    resume = training_args.resume_from_checkpoint
    if resume is None and output_dir.is_dir():
        resume = last_complete_checkpoint(output_dir)
        if resume:
            logger.info("resuming from %s (delete the output folder to start afresh)", resume)
    if resume:
        check_resume_precision(resume, training_args.bf16, given_explicitly(argv, "bf16"))

    data = prepare_data(data_args, model_args, training_args)
    splits, pretrained_cfg = data.splits, data.pretrained_cfg

    model = create_model(model_args.model_name, data.names, data_args.image_size, model_args.init, model_args.drop_rate)
    if model_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    callbacks = []
    if model_args.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=model_args.early_stopping_patience))
    bn_view = None
    if model_args.precise_bn_images > 0:
        subset = splits["train"].shuffle(seed=training_args.seed)
        bn_view = attach_transforms(subset.select(range(min(model_args.precise_bn_images, len(subset)))), pretrained_cfg)
    trainer = RecipeTrainer(
        bn_view=bn_view,
        decay_everything=model_args.decay_norm_and_bias,
        model=model,
        args=training_args,
        train_dataset=attach_transforms(splits["train"], pretrained_cfg, augment),
        eval_dataset=attach_transforms(splits["validation"], pretrained_cfg),
        data_collator=collate,
        compute_metrics=compute_metrics_for(data.names),
        callbacks=callbacks,
    )

    start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - start

    # the final model (the last epoch's, or the best with --load_best_model_at_end true) on validation; "eval_" keys so that callbacks recognise them
    validation_metrics = {k.replace("eval_", "validation_", 1): v for k, v in trainer.evaluate().items()}
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        save_model_atomically(trainer.model, output_dir)
        metrics = dict(train_result.metrics, train_wall_seconds=round(wall, 1), world_size=training_args.world_size)
        trainer.save_metrics("train", metrics)
        trainer.save_metrics("validation", validation_metrics)
        trainer.save_state()
        save_resolved_args(output_dir, argv, data_args, model_args, augment, training_args)
        plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
        logger.info("model folder written to %s", output_dir)
        if data_args.evaluate_test:
            evaluate_model(output_dir, data.data_dir, audit=data.audit)
    return output_dir
