"""The model folder's contract: the one place that names its files and reads the ones both sides share.

Training writes a model folder, serving reads it, the Hub and the browser page copy it; each of them
takes the file names, the class names, the input size, the split settings and the parity record from
here. Standard library only, so that serving and a staged Space import it without the training stack.

    config.json               transformers' TimmWrapperConfig: class names, timm's pretrained_cfg
    model.safetensors         the weights
    train_args.json           the resolved arguments of the training run (``hf-tumor train``)
    eval_results.json         ``hf-tumor evaluate``
    domain_features.npz       the feature-space domain check's reference and threshold (``evaluate``)
    onnx/model.onnx, onnx/model_quantized.onnx, onnx/parity.json      ``hf-tumor export``
    external_results.json     ``hf-tumor external --output``
    patients_results.json     ``hf-tumor patients``
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_tumor.errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ARGS_FILE = "train_args.json"  # the resolved arguments of a training run, in its model folder
EVAL_RESULTS_FILE = "eval_results.json"
FEATURES_FILE = "domain_features.npz"
ONNX_DIR = "onnx"
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model_quantized.onnx"}
PARITY_FILE = "parity.json"  # written by `hf-tumor export`: which ONNX files may be used
EXTERNAL_FILE = "external_results.json"  # `hf-tumor external --output MODEL/external_results.json`
PATIENTS_FILE = "patients_results.json"  # `hf-tumor patients` writes it into a local model folder

HEALTHY_LABEL = "notumor"  # the class that means "no tumour": scan verdicts and the suites count against it


class ModelConfigError(UserError, ValueError):
    """A model folder whose config.json cannot be read as a classifier's; the message says what is wrong."""


# --------------------------------------------------------------------------- the model's config


@dataclass(frozen=True)
class ModelConfig:
    """What serving needs of a model's ``config.json``, read as JSON: transformers' ``AutoConfig`` would
    import PyTorch, and the ONNX backends need none. For the torch backend it is read from the same file."""

    id2label: dict[int, str]
    pretrained_cfg: dict[str, Any]
    ood_energy_threshold: float | None = None  # written by `hf-tumor evaluate` (``hf_tumor.serving.domain``)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def class_names(self) -> list[str]:
        """Label names in class-id order."""
        return [self.id2label[i] for i in range(self.num_labels)]


def read_config(model_dir: str | os.PathLike) -> ModelConfig:
    """A model folder's ``config.json`` as ``TimmWrapperConfig`` reads it: class names from ``label_names``
    (``id2label`` where a config has that instead), timm's ``pretrained_cfg``, the domain check's threshold."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelConfigError(f"{path} is not a JSON model config ({type(err).__name__}).") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path} is not a JSON model config (no object at its top).")
    names, id2label = raw.get("label_names"), raw.get("id2label")
    if isinstance(names, list) and names:
        labels = dict(enumerate(map(str, names)))
    elif isinstance(id2label, dict) and id2label:
        try:
            labels = {int(k): str(v) for k, v in id2label.items()}
        except ValueError:
            raise ModelConfigError(f"{path}: id2label has keys that are not class ids.") from None
    else:
        raise ModelConfigError(f"{path} names no classes (label_names or id2label): not a classifier trained here.")
    if sorted(labels) != list(range(len(labels))):
        raise ModelConfigError(f"{path}: the class ids are not 0 to {len(labels) - 1}.")
    if not isinstance(raw.get("pretrained_cfg"), dict):
        raise ModelConfigError(f"{path} has no pretrained_cfg: the preprocessing the model expects is unknown.")
    threshold = raw.get("ood_energy_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise ModelConfigError(f"{path}: ood_energy_threshold is {threshold!r}, not a number.")
    return ModelConfig(labels, raw["pretrained_cfg"], None if threshold is None else float(threshold))


def image_size_of(pretrained_cfg: dict[str, Any]) -> int:
    """The square input size stored in a ``pretrained_cfg``."""
    return int(pretrained_cfg["input_size"][-1])


# --------------------------------------------------------------------------- the training run's split


def training_split_settings(model_dir: Path) -> dict[str, Any]:
    """The split seed, validation fraction and subset size the model was trained with (train_args.json)."""
    settings = {"validation_fraction": 0.15, "split_seed": 42, "limit_per_class": None}
    args_file = Path(model_dir) / ARGS_FILE
    if args_file.is_file():
        resolved = json.loads(args_file.read_text())
        data_args = resolved.get("DataArguments", {})
        settings["validation_fraction"] = data_args.get("validation_fraction", 0.15)
        settings["limit_per_class"] = data_args.get("limit_per_class")
        split_seed = data_args.get("split_seed")  # None, or absent in older files: the training seed
        settings["split_seed"] = resolved.get("TrainingArguments", {}).get("seed", 42) if split_seed is None else split_seed
    return settings


# --------------------------------------------------------------------------- the parity record


def read_parity(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``onnx/parity.json`` of a model folder, or {} where none was written."""
    path = Path(model_dir) / ONNX_DIR / PARITY_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelConfigError(f"{path} is not a readable parity record ({err}); re-run hf-tumor export") from err


def passed_backends(model_dir: str | os.PathLike, parity: dict[str, Any] | None = None) -> list[str]:
    """The ONNX backends whose file exists and whose parity check passed on that very file."""
    parity = read_parity(model_dir) if parity is None else parity
    passed = []
    for name, file in ONNX_FILES.items():
        path, entry = Path(model_dir) / ONNX_DIR / file, parity.get(name, {})
        # the size ties the verdict to the file it was measured on: a re-export without a check is not used
        if entry.get("passed") and path.is_file() and path.stat().st_size == entry.get("bytes"):
            passed.append(name)
    return passed
