"""Prediction on images with the fastest backend whose parity check passed: ONNX Runtime int8, ONNX
Runtime fp32, or PyTorch. Every backend uses the preprocessing stored in the model's config.

``hf-tumor predict`` and the Space both go through ``load_predictor``; the choice is reported at start-up.
So is the way JPEGs are read: in full, or at a reduced DCT scale where ``hf-tumor export`` checked that
this changes no more answers than int8 may (reading and preprocessing a 512 px slice: 0.9 -> 0.5 ms).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch
from transformers import AutoConfig

from hf_tumor.calibration import softmax
from hf_tumor.export import (
    ONNX_DIR, ONNX_FILES, PARITY_FILE, REDUCED_DECODE, onnx_session, passed_backends, reduced_decode_passed,
)
from hf_tumor.model import class_names_of, load_model
from hf_tumor.image_io import InputError, read_image
from hf_tumor.preprocessing import create_eval_transform, reduced_read_size

logger = logging.getLogger("hf_tumor")

BACKENDS = ("auto", "onnx-int8", "onnx", "torch")
FASTEST_FIRST = ("onnx-int8", "onnx")  # measured in benchmarks/inference.json; torch is the fallback of 'auto' only
DECODES = ("auto", "full", "reduced")


class BackendError(RuntimeError):
    """The requested backend cannot be used for this model; the message says how to make it usable."""


def resolve_model_dir(model: str | os.PathLike, revision: str | None = None) -> Path:
    """A local model folder as is; a Hub repo id downloaded (pinned to ``revision``) into the HF cache."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), revision=revision))
    except Exception as err:  # not an id, no network, no such repo or revision: all end here
        raise FileNotFoundError(
            f"No model '{model}': not a local folder, and not loadable from the Hugging Face Hub "
            f"({type(err).__name__}). Pass a model folder or a Hub repo id."
        ) from None


def choose_backend(model_dir: Path, requested: str = "auto") -> str:
    """``requested`` if it may be used here, the fastest passed backend for 'auto'; never a silent substitute."""
    if requested not in BACKENDS:
        raise BackendError(f"Unknown backend '{requested}'; choose one of {', '.join(BACKENDS)}.")
    passed = passed_backends(model_dir)
    has_runtime = importlib.util.find_spec("onnxruntime") is not None
    if requested == "auto":
        if passed and not has_runtime:
            logger.warning("%s has checked ONNX files but onnxruntime is not installed "
                           "(pip install 'hf-tumor[onnx]'): using PyTorch", model_dir)
            return "torch"
        return next((name for name in FASTEST_FIRST if name in passed), "torch")
    if requested != "torch" and not has_runtime:
        raise BackendError(f"--backend {requested} needs onnxruntime: pip install 'hf-tumor[onnx]'.")
    if requested != "torch" and requested not in passed:
        how = f"hf-tumor export --model {model_dir}" + (" --quantize int8" if requested == "onnx-int8" else "")
        raise BackendError(
            f"The model in {model_dir} has no {ONNX_DIR}/{ONNX_FILES[requested]} that passed its parity check "
            f"({ONNX_DIR}/{PARITY_FILE}). Create it with `{how}`, or use --backend torch."
        )
    return requested


def choose_decode(model_dir: Path, backend: str, requested: str = "auto") -> bool:
    """Whether to read JPEGs at reduced scale with ``backend``: 'auto' where its check passed, never silently."""
    if requested not in DECODES:
        raise BackendError(f"Unknown decode '{requested}'; choose one of {', '.join(DECODES)}.")
    passed = requested != "full" and reduced_decode_passed(model_dir, backend)
    if requested == "reduced" and not passed:
        raise BackendError(
            f"Reading JPEGs at reduced scale has not passed its check for {model_dir} with backend {backend} "
            f"({ONNX_DIR}/{PARITY_FILE}, '{REDUCED_DECODE}'). Check it with `hf-tumor export --model {model_dir} "
            f"--quantize int8`, or use --decode full."
        )
    return passed


@dataclass
class Predictor:
    """A classifier loaded once: the backend's forward pass behind the config's preprocessing."""

    source: str  # what the user named: a folder or a Hub repo id
    model_dir: Path  # where its files are (the Hub cache for a repo id)
    backend: str
    config: Any
    _forward: Any = field(repr=False)
    reduced_decode: bool = False  # JPEGs decoded at reduced scale (checked by `hf-tumor export`)

    def __post_init__(self) -> None:
        self.class_names = class_names_of(self.config)
        self.transform = create_eval_transform(self.config.pretrained_cfg)

    def read(self, path: str | os.PathLike) -> PIL.Image.Image:
        """``read_image`` as this predictor reads files: at reduced scale where that was checked."""
        return read_image(path, reduced_read_size(self.config.pretrained_cfg) if self.reduced_decode else None)

    def preprocess(self, images: Sequence[PIL.Image.Image]) -> np.ndarray:
        """RGB or grayscale images to the normalized NCHW float32 batch the model takes (timm's transform, in NumPy)."""
        return np.stack([self.transform.to_array(image) for image in images])

    def logits(self, pixel_values: np.ndarray) -> np.ndarray:
        """The model's logits for a normalized NCHW float32 batch."""
        return self._forward(pixel_values)

    def probabilities(self, images: Sequence[PIL.Image.Image]) -> np.ndarray:
        """Softmax probabilities, one row per image, columns in ``class_names`` order."""
        return softmax(self.logits(self.preprocess(images)))

    def describe(self) -> str:
        """One line for start-up logs: model, backend and its parity figure."""
        line = f"model {self.source}, backend {self.backend}"
        parity_file = self.model_dir / ONNX_DIR / PARITY_FILE
        report = json.loads(parity_file.read_text()) if parity_file.is_file() else {}
        if self.backend != "torch" and report:
            line += (f" (top-1 agreement with PyTorch {report[self.backend]['top1_agreement']:.2%} on "
                     f"{report['num_images']} test images)")
        if self.reduced_decode:
            entry = report[REDUCED_DECODE]
            line += (f", JPEGs read at reduced scale (with it, top-1 agreement with PyTorch on full reads "
                     f"{entry[self.backend]['top1_agreement']:.2%} on {entry['num_images']} test images)")
        else:
            line += ", JPEGs read in full"
        return line


def load_predictor(model: str | os.PathLike, backend: str = "auto", revision: str | None = None,
                   decode: str = "auto") -> Predictor:
    """Load ``model`` (folder or Hub id) with ``backend`` ('auto': the fastest whose parity passed) and
    ``decode`` ('auto': JPEGs at reduced scale where that passed its check with this backend)."""
    model_dir = resolve_model_dir(model, revision)
    chosen = choose_backend(model_dir, backend)
    reduced = choose_decode(model_dir, chosen, decode)
    if chosen == "torch":
        torch_model = load_model(model_dir)

        def forward(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return torch_model(pixel_values=torch.from_numpy(x)).logits.float().numpy()

        config = torch_model.config
    else:
        session = onnx_session(model_dir / ONNX_DIR / ONNX_FILES[chosen])

        def forward(x: np.ndarray) -> np.ndarray:
            return session.run(["logits"], {"pixel_values": x})[0]

        config = AutoConfig.from_pretrained(model_dir)
    return Predictor(str(model), model_dir, chosen, config, forward, reduced)


@dataclass
class Prediction:
    """One file's result: the label and every class probability, or the reason it could not be read."""

    path: str
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def predict_files(predictor: Predictor, paths: list[str | os.PathLike], batch_size: int = 8) -> list[Prediction]:
    """Predict every readable file; unreadable ones get an error and do not stop the others."""
    results = [Prediction(path=str(path)) for path in paths]
    readable: list[tuple[Prediction, PIL.Image.Image]] = []
    for prediction in results:
        try:
            readable.append((prediction, predictor.read(prediction.path)))
        except InputError as err:  # hostile or broken file: say why, and go on with the others
            prediction.error = str(err)
    for start in range(0, len(readable), batch_size):
        chunk = readable[start : start + batch_size]
        probs = predictor.probabilities([image for _, image in chunk])
        for (prediction, _), row in zip(chunk, probs):
            prediction.probabilities = dict(zip(predictor.class_names, map(float, row)))
            prediction.label = predictor.class_names[int(row.argmax())]
    return results
