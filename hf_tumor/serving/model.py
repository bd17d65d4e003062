"""A timm backbone wrapped as a transformers ``TimmWrapperForImageClassification``.

The config carries everything needed to use the model elsewhere: labels (``label_names``), timm's
``pretrained_cfg`` (preprocessing) and ``model_args`` (dropout), so ``pipeline()``,
``AutoModelForImageClassification`` and ``timm.create_model`` all rebuild it from the folder alone.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification

from hf_tumor.contract import WEIGHTS_FILE
from hf_tumor.errors import UserError
from hf_tumor.serving.preprocessing import make_pretrained_cfg

logger = logging.getLogger("hf_tumor")

INIT_CHOICES = "'imagenet' (timm's pretrained weights from the Hub), 'scratch', or a path to a local checkpoint"


class ModelInitError(UserError, RuntimeError):
    """The requested initial weights cannot be had; the message names the alternatives."""


def create_model(
    model_name: str,
    class_names: list[str],
    image_size: int,
    init: str = "imagenet",
    drop_rate: float = 0.2,
) -> TimmWrapperForImageClassification:
    """A classifier for ``class_names`` with the preprocessing for ``image_size`` written into its config.

    ``init`` is ``imagenet``, ``scratch`` or a local checkpoint path (see ``load_init_weights``).
    """
    config = TimmWrapperConfig(
        architecture=model_name,
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
        model_args={"drop_rate": drop_rate},
        pretrained_cfg=make_pretrained_cfg(model_name, image_size),
    )
    model = TimmWrapperForImageClassification(config)
    load_init_weights(model, init)
    return model


def load_init_weights(model: TimmWrapperForImageClassification, init: str) -> None:
    """Give ``model.timm_model`` its starting weights; never falls back from one source to another.

    - ``scratch``: timm's own initialisation (transformers' generic init would reset every conv to
      N(0, 0.02), which trains worse from scratch than timm's fan-based init).
    - ``imagenet``: timm's pretrained weights from the Hub; unreachable Hub -> ModelInitError.
    - a path: a safetensors file, a model folder, or a PyTorch checkpoint read with weights-only
      unpickling. A classifier head of another shape is left at its fresh initialisation.
    """
    name, kwargs = model.config.architecture, dict(model.config.model_args or {})
    num_classes = model.config.num_labels
    if init == "scratch":
        state = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).state_dict()
    elif init == "imagenet":
        try:
            state = timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs).state_dict()
        except Exception as err:  # no network, no weights for this name, Hub down: all end here
            raise ModelInitError(
                f"Could not get ImageNet weights for '{name}' from the Hugging Face Hub "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                "Use --init scratch to train from random weights, or --init PATH with a local "
                "checkpoint (safetensors file or model folder)."
            ) from None
        # the new head was initialised by timm; keep it rather than ImageNet's 1000-class one
    else:
        state = _read_checkpoint(Path(init))
    _load_matching(model.timm_model, state, source=init)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ModelInitError(f"--init {path}: no such file or folder. Valid values: {INIT_CHOICES}.")
    if path.is_dir():
        for candidate in (WEIGHTS_FILE, "pytorch_model.bin"):
            if (path / candidate).is_file():
                return _read_checkpoint(path / candidate)
        raise ModelInitError(f"--init {path}: the folder has no {WEIGHTS_FILE} or pytorch_model.bin.")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ModelInitError(
                f"--init {path}: not loadable with weights-only unpickling ({type(err).__name__}). "
                "Pickled checkpoints that need arbitrary code are refused; convert it to safetensors."
            ) from None
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelInitError(f"--init {path}: not a state dict of tensors.")
    return {k.removeprefix("timm_model.").removeprefix("module."): v for k, v in state.items()}


def _load_matching(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = module.state_dict()
    reshaped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in reshaped}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in reshaped]
    if missing or unexpected:
        raise ModelInitError(
            f"--init {source}: checkpoint does not fit {type(module).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )
    if reshaped:
        logger.info("--init %s: kept fresh weights for %s (shape differs, e.g. the classifier head)", source, reshaped)


def load_model(model: str | os.PathLike, revision: str | None = None) -> TimmWrapperForImageClassification:
    """Load a trained classifier (local folder or Hub id) in fp32 for inference, in eval mode."""
    loaded = AutoModelForImageClassification.from_pretrained(str(model), revision=revision, dtype=torch.float32)
    return loaded.eval()


def class_names_of(config: Any) -> list[str]:
    """Label names in class-id order, from a model config."""
    return [config.id2label[i] for i in range(config.num_labels)]


class LogitsOnly(torch.nn.Module):
    """The classifier as a plain tensor -> logits function: what ONNX exporters and Grad-CAM want."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def save_model_atomically(model: torch.nn.Module, output_dir: Path) -> None:
    """Write config.json + model.safetensors into a temporary folder, then move them in place.

    A crash mid-write therefore never leaves a half-written model.safetensors where a loader looks.
    """
    staging = output_dir / ".model-staging"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    for item in staging.iterdir():
        os.replace(item, output_dir / item.name)
    staging.rmdir()
