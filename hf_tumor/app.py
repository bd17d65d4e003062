"""What the Gradio Space does, as plain functions: prediction, Grad-CAM, non-MRI checks, batch tables.

``space/app.py`` only lays out the UI and calls these; tests call them directly too.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from hf_tumor.calibration import softmax
from hf_tumor.evaluation import energy_scores
from hf_tumor.image_io import InputError
from hf_tumor.inference import load_predictor
from hf_tumor.model import LogitsOnly, default_model, load_model

# --------------------------------------------------------------------------- is it an MRI slice?


def image_checks(image: PIL.Image.Image) -> list[str]:
    """Reasons, from image statistics alone, why this does not look like a brain MRI slice."""
    small = np.asarray(image.convert("RGB").resize((128, 128)), dtype=np.float32)
    reasons = []
    chroma = np.abs(small - small.mean(axis=2, keepdims=True)).mean()
    if chroma > 6:  # MRI slices are grayscale, even when stored as RGB (measured <= 2 on the dataset)
        reasons.append("it is a colour image (MRI slices are grayscale)")
    gray = small.mean(axis=2)
    if gray.std() < 4:
        reasons.append("it is blank or nearly uniform")
    elif (gray < 20).mean() < 0.05:  # slices sit on a black background
        reasons.append("it has no dark background around the anatomy")
    return reasons


# --------------------------------------------------------------------------- the classifier


@dataclass
class Result:
    """One image's outcome for the UI and the API."""

    probabilities: dict[str, float]
    label: str
    cam: np.ndarray | None  # Grad-CAM of the predicted class in [0, 1], at the model's input size
    energy: float
    flags: list[str] = field(default_factory=list)

    @property
    def trusted(self) -> bool:
        return not self.flags


class Classifier:
    """The model loaded once through ``load_predictor`` (fastest checked backend), plus a PyTorch copy
    for Grad-CAM on its last stage (gradients need PyTorch, whatever backend gives the probabilities)."""

    def __init__(self, model: str | os.PathLike | None = None, revision: str | None = None, backend: str = "auto",
                 decode: str = "auto"):
        from pytorch_grad_cam import GradCAM

        self.predictor = load_predictor(model or default_model(), backend, revision, decode)
        self.source = self.predictor.source
        self.class_names = self.predictor.class_names
        self.energy_threshold = getattr(self.predictor.config, "ood_energy_threshold", None)
        # a copy of its own: GradCAM's hooks on a shared model would also fire on other requests' forward passes
        self._cam_model = load_model(self.predictor.model_dir)
        self._cam = GradCAM(model=LogitsOnly(self._cam_model), target_layers=[self._cam_model.timm_model.norm])
        # GradCAM keeps the hooked activations and gradients on itself and on the model: two requests
        # at once would read each other's (found by the load test); the probabilities need no lock
        self._cam_lock = threading.Lock()

    def predict(self, image: PIL.Image.Image, with_cam: bool = True) -> Result:
        """Probabilities, Grad-CAM (unless ``with_cam`` is False) and out-of-distribution checks for one RGB or grayscale image."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        x = self.predictor.preprocess([image])
        logits = self.predictor.logits(x)
        probs = softmax(logits)[0]
        index = int(np.argmax(probs))
        # Grad-CAM costs a forward and a backward pass in PyTorch: only when a heatmap is shown
        cam = None
        if with_cam:
            with self._cam_lock:
                cam = self._cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(index)])[0]
        energy = float(energy_scores(logits)[0])
        flags = image_checks(image)
        if self.energy_threshold is not None and energy > self.energy_threshold:
            flags.append("the model finds it unlike the training slices (energy score above the validation threshold)")
        return Result(dict(zip(self.class_names, probs.tolist())), self.class_names[index], cam, energy, flags)


def overlay(image: PIL.Image.Image, cam: np.ndarray, opacity: float = 0.45, max_side: int = 512) -> np.ndarray:
    """The Grad-CAM heatmap blended over the image (uint8 RGB, longest side at most ``max_side``)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    shown = image.convert("RGB")  # a copy, also for grayscale uploads
    shown.thumbnail((max_side, max_side))
    base = np.asarray(shown, dtype=np.float32) / 255
    heat = np.asarray(PIL.Image.fromarray((cam * 255).astype(np.uint8)).resize(shown.size, PIL.Image.BILINEAR)) / 255
    return show_cam_on_image(base, heat.astype(np.float32), use_rgb=True, image_weight=1 - float(opacity))


def verdict(result: Result) -> str:
    """The sentence shown under the probabilities."""
    if not result.trusted:
        return "⚠️ This does not look like a brain MRI slice: " + "; ".join(result.flags) + ". The label is not meaningful."
    return f"Predicted: **{result.label}** ({result.probabilities[result.label]:.1%})."


def batch_rows(classifier: Classifier, paths: list[str]) -> tuple[list[list[Any]], str]:
    """Table rows (file, label, probabilities, note) and the same as CSV text."""
    header = ["file", "label", *classifier.class_names, "note"]
    rows = []
    for path in paths:
        name = Path(path).name
        try:
            result = classifier.predict(classifier.predictor.read(path), with_cam=False)
            note = "" if result.trusted else "not like an MRI slice: " + "; ".join(result.flags)
            rows.append([name, result.label if result.trusted else "", *(round(result.probabilities[c], 4)
                                                                           for c in classifier.class_names), note])
        except InputError as err:
            rows.append([name, "", *([None] * len(classifier.class_names)), str(err)])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return rows, buffer.getvalue()


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process; returns whether it applied (glibc only).

    Gradio serves requests from a pool of threads, and glibc gives each its own arena: under 16
    clients the server's memory grew 13.9% in 60 s without the cap, 1.8% and 7.2% in two runs with
    it (benchmarks/load.json holds the latest). Same as MALLOC_ARENA_MAX=2, set from inside.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-8, arenas))  # -8: M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to cap
        return False


def model_summary(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Official and leak-free test accuracy from the model folder's eval_results.json, if it is local."""
    results_file = Path(model_dir) / "eval_results.json"
    if not results_file.is_file():
        return {}
    splits = json.loads(results_file.read_text())["splits"]
    return {name: splits[name]["accuracy"] for name in ("test", "clean_test") if name in splits}


def non_mri_images(seed: int = 0) -> dict[str, PIL.Image.Image]:
    """Images that are not brain MRI slices, all available offline: scikit-learn's sample photos,
    synthetic documents, noise, blank and colour images. Used to measure the out-of-distribution check."""
    from PIL import ImageDraw
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    images = {name: PIL.Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")}
    for name in ("china.jpg", "flower.jpg"):
        images[f"gray {name}"] = images[name].convert("L")
    for i in range(3):
        page = PIL.Image.new("L", (420, 560), 255)
        draw = ImageDraw.Draw(page)
        for line in range(25):
            draw.text((24, 20 + 21 * line), " ".join("lorem ipsum dolor" for _ in range(rng.integers(1, 4))), fill=0)
        images[f"document {i}"] = page
        images[f"gray noise {i}"] = PIL.Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8))
        images[f"colour noise {i}"] = PIL.Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    images["blank white"] = PIL.Image.new("RGB", (256, 256), (255, 255, 255))
    images["blank black"] = PIL.Image.new("RGB", (256, 256), (0, 0, 0))
    gradient = np.linspace(0, 255, 256, dtype=np.uint8)
    red, green = np.meshgrid(gradient, gradient)
    images["colour gradient"] = PIL.Image.fromarray(np.stack([red, green, 255 - red], -1))
    return images


def ood_report(classifier: Classifier, mri_paths: list[str]) -> dict[str, Any]:
    """Share of real MRI slices wrongly flagged, and of non-MRI images caught, by the app's checks."""
    flagged = [bool(classifier.predict(classifier.predictor.read(p), with_cam=False).flags) for p in mri_paths]
    caught = {name: bool(classifier.predict(image.convert("RGB"), with_cam=False).flags)
              for name, image in non_mri_images().items()}
    return {
        "mri_images": len(mri_paths),
        "mri_wrongly_flagged": float(np.mean(flagged)) if flagged else None,
        "non_mri_images": len(caught),
        "non_mri_caught": float(np.mean(list(caught.values()))),
        "non_mri_missed": sorted(name for name, hit in caught.items() if not hit),
        "energy_threshold": classifier.energy_threshold,
    }
