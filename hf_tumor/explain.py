"""Grad-CAM heatmaps of the predicted class (pytorch-grad-cam), whatever backend gave the probabilities.

Gradients need the PyTorch weights, so the explainer holds a PyTorch copy of its own: GradCAM's hooks
on a shared model would also fire on other requests' forward passes.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import PIL.Image
import torch


class GradCamExplainer:
    """Grad-CAM at the backbone's last norm layer, one request at a time."""

    def __init__(self, model_dir: str | Path):
        from pytorch_grad_cam import GradCAM

        from hf_tumor.model import LogitsOnly, load_model

        self.model = load_model(model_dir)
        self._cam = GradCAM(model=LogitsOnly(self.model), target_layers=[self.model.timm_model.norm])
        # GradCAM keeps the hooked activations and gradients on itself: two requests at once would read
        # each other's (found by the load test)
        self._lock = threading.Lock()

    def heatmap(self, pixel_values: np.ndarray, class_index: int) -> np.ndarray:
        """The map of ``class_index`` for one preprocessed image (1, 3, H, W), in [0, 1] at H x W."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        with self._lock:
            return self._cam(input_tensor=torch.from_numpy(pixel_values), targets=[ClassifierOutputTarget(class_index)])[0]


def overlay(image: PIL.Image.Image, cam: np.ndarray, opacity: float = 0.45, max_side: int = 512) -> np.ndarray:
    """The heatmap blended over the image (uint8 RGB, longest side at most ``max_side``)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    shown = image.convert("RGB")  # a copy, also for grayscale uploads
    shown.thumbnail((max_side, max_side))
    base = np.asarray(shown, dtype=np.float32) / 255
    heat = np.asarray(PIL.Image.fromarray((cam * 255).astype(np.uint8)).resize(shown.size, PIL.Image.BILINEAR)) / 255
    return show_cam_on_image(base, heat.astype(np.float32), use_rgb=True, image_weight=1 - float(opacity))
