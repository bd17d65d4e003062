"""The serving layer: a model folder (or Hub id) in, probabilities and domain flags out.

Everything that turns an image into an answer lives here and is shared: ``hf-tumor predict``, the
Space, ``hf-tumor export``'s parity check and evaluation all get their logits through the forwards
below. Reading a file (``image_io``), the preprocessing stored in the model's config
(``preprocessing``), the backend whose ONNX parity check passed, and the domain check (``domain``).

Serving imports no training stack: no datasets, accelerate, evaluate, scikit-learn or matplotlib; and
with an ONNX backend no PyTorch, timm or transformers either (the config is read as JSON, the
preprocessing is Pillow and NumPy): those load only for the torch backend.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import PIL.Image

from hf_tumor.contract import ONNX_DIR, ONNX_FILES, PARITY_FILE, ModelConfig, passed_backends, read_config, read_parity
from hf_tumor.errors import UserError
from hf_tumor.serving.domain import DomainCheck
from hf_tumor.serving.image_io import InputError, read_image
from hf_tumor.serving.neighbours import NeighbourCheck
from hf_tumor.serving.preprocessing import create_eval_transform

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("hf_tumor")

BACKENDS = ("auto", "onnx-int8", "onnx", "torch")
FASTEST_FIRST = ("onnx-int8", "onnx")  # docs/benchmarks.md; torch is the fallback of 'auto' only
MODEL_ENV = "HF_TUMOR_MODEL"
BUNDLED_MODEL = Path(__file__).resolve().parents[2] / "models" / "resnetv2_50-scratch-128"


Forward = Callable[[np.ndarray], np.ndarray]  # normalized NCHW float32 batch -> logits
# the same batch -> (logits, pooled penultimate features, or None where the backend has none)
Outputs = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
FEATURES_OUTPUT = "features"  # the ONNX files' second output (hf_tumor.training.export adds it)


class BackendError(UserError, RuntimeError):
    """The requested backend cannot be used for this model; the message says how to make it usable."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def default_model() -> str:
    """``$HF_TUMOR_MODEL`` (Hub id or folder), else the model bundled in this repository."""
    return os.environ.get(MODEL_ENV) or str(BUNDLED_MODEL)


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


# --------------------------------------------------------------------------- forwards


def torch_forward(model: torch.nn.Module) -> Forward:
    """The PyTorch model's logits in fp32, on whatever device it sits."""
    outputs = torch_outputs(model)
    return lambda pixel_values: outputs(pixel_values)[0]


def torch_outputs(model: torch.nn.Module) -> Outputs:
    """The PyTorch model's logits and pooled penultimate features (what the classifier reads), in fp32."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    timm_model = model.timm_model

    def outputs(pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            maps = timm_model.forward_features(torch.as_tensor(pixel_values).to(device))
            logits = timm_model.forward_head(maps)
            features = timm_model.forward_head(maps, pre_logits=True)
            return logits.float().cpu().numpy(), features.float().flatten(1).cpu().numpy()

    return outputs


def onnx_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session with full graph optimization."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting between runs: spinning ORT threads starve the decode and preprocessing that
    # follow each request on a small CPU
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_forward(session: Any) -> Forward:
    """An ONNX Runtime session's logits."""
    return lambda pixel_values: session.run(["logits"], {"pixel_values": np.asarray(pixel_values)})[0]


def onnx_outputs(session: Any) -> Outputs:
    """An ONNX Runtime session's logits, and its features where the file has that output (older exports do not)."""
    if FEATURES_OUTPUT not in {o.name for o in session.get_outputs()}:
        forward = onnx_forward(session)
        return lambda pixel_values: (forward(pixel_values), None)

    def outputs(pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = session.run(["logits", FEATURES_OUTPUT], {"pixel_values": np.asarray(pixel_values)})
        return logits, features.reshape(len(features), -1)

    return outputs


# --------------------------------------------------------------------------- choosing the backend


def choose_backend(model_dir: Path, requested: str = "auto", parity: dict[str, Any] | None = None) -> str:
    """``requested`` if it may be used here, the fastest passed backend for 'auto'; never a silent substitute."""
    if requested not in BACKENDS:
        raise BackendError(f"Unknown backend '{requested}'; choose one of {', '.join(BACKENDS)}.")
    passed = passed_backends(model_dir, parity)
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


# --------------------------------------------------------------------------- prediction


@dataclass
class Prediction:
    """One image's answer: the label and every class probability, the domain flags (empty when nothing is
    wrong), or the reason the file could not be read."""

    path: str | None = None
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def trusted(self) -> bool:
        """A label worth showing: the file was read and nothing flagged it."""
        return self.error is None and not self.flags

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Predictor:
    """A classifier loaded once: the backend's forward behind the config's preprocessing."""

    source: str  # what the user named: a folder or a Hub repo id
    model_dir: Path  # where its files are (the Hub cache for a repo id)
    backend: str
    config: ModelConfig
    outputs: Outputs = field(repr=False)
    parity: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.class_names = self.config.class_names
        self.transform = create_eval_transform(self.config.pretrained_cfg)
        self.domain = DomainCheck.of(self.config, NeighbourCheck.load(self.model_dir))

    def forward(self, pixel_values: np.ndarray) -> np.ndarray:
        """Logits of a normalized NCHW batch."""
        return self.outputs(pixel_values)[0]

    def preprocess(self, images: Sequence[PIL.Image.Image]) -> np.ndarray:
        """RGB or grayscale images to the normalized NCHW float32 batch the model takes (timm's transform, in NumPy)."""
        return np.stack([self.transform.to_array(image) for image in images])

    def probabilities(self, images: Sequence[PIL.Image.Image]) -> np.ndarray:
        """Softmax probabilities, one row per image, columns in ``class_names`` order."""
        return softmax(self.forward(self.preprocess(images)))

    def predict(self, images: Sequence[PIL.Image.Image], pixel_values: np.ndarray | None = None) -> list[Prediction]:
        """Label, probabilities and domain flags for each image (``pixel_values``: their ``preprocess``, if
        the caller needs it too)."""
        if not images:
            return []
        x = self.preprocess(images) if pixel_values is None else pixel_values
        logits, features = self.outputs(x)
        pixels = (x * self.transform.std + self.transform.mean) * 255  # what the model sees, in 0-255
        return [
            Prediction(label=self.class_names[int(probs.argmax())],
                       probabilities=dict(zip(self.class_names, map(float, probs))), flags=flags)
            for probs, flags in zip(softmax(logits), self.domain.flags(pixels, logits, features))
        ]

    def predict_files(self, paths: Sequence[str | os.PathLike], batch_size: int = 8) -> list[Prediction]:
        """Predict every readable file; unreadable ones get an error and do not stop the others."""
        results = [Prediction(path=str(path)) for path in paths]
        readable: list[tuple[Prediction, PIL.Image.Image]] = []
        for result in results:
            try:
                readable.append((result, read_image(result.path)))
            except InputError as err:  # hostile or broken file: say why, and go on with the others
                result.error = str(err)
        for start in range(0, len(readable), batch_size):
            chunk = readable[start : start + batch_size]
            for (result, _), answer in zip(chunk, self.predict([image for _, image in chunk])):
                result.label, result.probabilities, result.flags = answer.label, answer.probabilities, answer.flags
        return results

    def describe(self) -> str:
        """One line for start-up logs: model, backend and its parity figure."""
        line = f"model {self.source}, backend {self.backend}"
        if self.backend != "torch":
            entry = self.parity[self.backend]
            line += (f" (top-1 agreement with PyTorch {entry['top1_agreement']:.2%} on "
                     f"{self.parity['num_images']} test images)")
        return line


def load_predictor(model: str | os.PathLike, backend: str = "auto", revision: str | None = None) -> Predictor:
    """Load ``model`` (folder or Hub id) with ``backend`` ('auto': the fastest whose parity check passed).

    Only the torch backend imports PyTorch (and timm and transformers)."""
    model_dir = resolve_model_dir(model, revision)
    parity = read_parity(model_dir)
    chosen = choose_backend(model_dir, backend, parity)
    config = read_config(model_dir)
    if chosen == "torch":
        from hf_tumor.serving.model import load_model

        outputs = torch_outputs(load_model(model_dir))
    else:
        path = model_dir / ONNX_DIR / ONNX_FILES[chosen]
        session = onnx_session(path)
        if NeighbourCheck.load(model_dir) is not None and FEATURES_OUTPUT not in {o.name for o in session.get_outputs()}:
            raise BackendError(f"{path} has no {FEATURES_OUTPUT!r} output, which the model's domain check needs; "
                               f"export it again (hf-tumor export --model {model_dir}) or use --backend torch.")
        outputs = onnx_outputs(session)
    return Predictor(str(model), model_dir, chosen, config, outputs, parity)
