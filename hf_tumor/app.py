"""What the Gradio Space does, as plain functions: safe reading of uploads, prediction, Grad-CAM, checks.

``space/app.py`` only lays out the UI and calls these; tests call them directly too.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from hf_tumor.model import class_names_of, default_model, load_model
from hf_tumor.preprocessing import create_eval_transform

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 50_000_000  # a 7,000 x 7,000 image; anything larger is refused before decoding
MIN_SIDE = 32


class InputError(ValueError):
    """An upload that cannot be classified; the message is shown to the user as is."""


# --------------------------------------------------------------------------- reading uploads


def _is_dicom(head: bytes, path: Path) -> bool:
    return path.suffix.lower() == ".dcm" or head[128:132] == b"DICM"


def _read_dicom(path: Path) -> PIL.Image.Image:
    import pydicom
    from pydicom.pixels import apply_voi_lut

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as err:
        raise InputError(f"Not a readable DICOM file ({type(err).__name__}).") from None
    if "PixelData" not in ds:
        raise InputError("This DICOM file has no image (no pixel data).")
    try:
        pixels = ds.pixel_array
    except Exception as err:
        raise InputError(f"The DICOM pixel data cannot be decoded ({type(err).__name__}).") from None
    if pixels.ndim == 3 and pixels.shape[-1] not in (3, 4):
        pixels = pixels[pixels.shape[0] // 2]  # a multi-frame series: the middle slice
    pixels = apply_voi_lut(pixels, ds) if pixels.ndim == 2 else pixels
    return _to_8bit(np.asarray(pixels, dtype=np.float64))


def _to_8bit(pixels: np.ndarray) -> PIL.Image.Image:
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / (high - low) * 255 if high > low else np.zeros_like(pixels)
    mode = "RGB" if scaled.ndim == 3 else "L"
    return PIL.Image.fromarray(scaled.round().astype(np.uint8)[..., :3] if mode == "RGB" else scaled.round().astype(np.uint8), mode)


def read_upload(path: str | os.PathLike) -> PIL.Image.Image:
    """Open an uploaded file as an upright RGB image, or raise InputError saying why not.

    Handles JPEG/PNG/other PIL formats and DICOM; 16-bit, palette, CMYK, RGBA and animated images
    are converted (first frame); EXIF rotation is applied. Files over MAX_UPLOAD_BYTES and images
    over MAX_PIXELS are refused before their pixels are decoded, so a decompression bomb costs nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("No file was received.")
    size = path.stat().st_size
    if size == 0:
        raise InputError("The file is empty.")
    if size > MAX_UPLOAD_BYTES:
        raise InputError(f"The file is {size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB.")
    with open(path, "rb") as f:
        head = f.read(132)
    if _is_dicom(head, path):
        image = _read_dicom(path)
    else:
        if head.startswith(b"%PDF"):
            raise InputError("This is a PDF document, not an image. Upload a JPEG, PNG or DICOM slice.")
        try:
            image = PIL.Image.open(path)  # reads the header only
        except PIL.Image.DecompressionBombError:
            raise InputError(f"The image is too large to process safely (over {MAX_PIXELS:,} pixels).") from None
        except Exception:
            raise InputError("This file is not an image that can be read (JPEG, PNG, DICOM and other common formats).") from None
        if image.width * image.height > MAX_PIXELS:
            raise InputError(
                f"The image is {image.width:,} x {image.height:,} pixels; the limit is {MAX_PIXELS:,} pixels."
            )
        try:
            image.seek(0)  # animated images: the first frame
            image.load()
        except Exception as err:
            raise InputError(f"The image file is truncated or corrupt ({type(err).__name__}).") from None
        image = PIL.ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            image = _to_8bit(np.asarray(image, dtype=np.float64))
        elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255))  # MRI background is black
            image = PIL.Image.alpha_composite(background, rgba)
    if min(image.size) < MIN_SIDE:
        raise InputError(f"The image is {image.width} x {image.height} pixels; at least {MIN_SIDE} x {MIN_SIDE} is needed.")
    return image.convert("RGB")


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
    """The model loaded once, with the preprocessing from its config and a Grad-CAM on its last stage."""

    def __init__(self, model: str | os.PathLike | None = None, revision: str | None = None):
        from pytorch_grad_cam import GradCAM

        self.source = str(model or default_model())
        self.model = load_model(self.source, revision=revision)
        self.class_names = class_names_of(self.model.config)
        self.transform = create_eval_transform(self.model.config.pretrained_cfg)
        self.energy_threshold = getattr(self.model.config, "ood_energy_threshold", None)
        self._cam = GradCAM(model=_LogitsOnly(self.model), target_layers=[self.model.timm_model.norm])

    def predict(self, image: PIL.Image.Image, with_cam: bool = True) -> Result:
        """Probabilities, Grad-CAM (unless ``with_cam`` is False) and out-of-distribution checks for one RGB image."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        x = self.transform(image).unsqueeze(0)
        with torch.inference_mode():
            logits = self.model(pixel_values=x).logits[0].float()
        probs = torch.softmax(logits, -1).tolist()
        index = int(np.argmax(probs))
        # Grad-CAM costs a second forward and a backward pass: only when a heatmap is shown
        cam = self._cam(input_tensor=x, targets=[ClassifierOutputTarget(index)])[0] if with_cam else None
        energy = -float(torch.logsumexp(logits, 0))
        flags = image_checks(image)
        if self.energy_threshold is not None and energy > self.energy_threshold:
            flags.append("the model finds it unlike the training slices (energy score above the validation threshold)")
        return Result(dict(zip(self.class_names, probs)), self.class_names[index], cam, energy, flags)


class _LogitsOnly(torch.nn.Module):
    """pytorch-grad-cam wants a module that maps a tensor to a logits tensor."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def overlay(image: PIL.Image.Image, cam: np.ndarray, opacity: float = 0.45, max_side: int = 512) -> np.ndarray:
    """The Grad-CAM heatmap blended over the image (uint8 RGB, longest side at most ``max_side``)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    shown = image.copy()
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
            result = classifier.predict(read_upload(path), with_cam=False)
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


def model_summary(source: str) -> dict[str, Any]:
    """Official and leak-free test accuracy from the model folder's eval_results.json, if it is local."""
    results_file = Path(source) / "eval_results.json"
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
    flagged = [bool(classifier.predict(read_upload(p), with_cam=False).flags) for p in mri_paths]
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
