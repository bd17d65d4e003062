"""Class-activation maps of the predicted class, whatever backend gave the probabilities.

The map is HiResCAM (Draelos & Carin, 2020: the class score's gradient times the activation, summed over
channels, so each cell is that location's first-order share of the score) at the backbone's stride-8
stage (16 x 16 cells at 128 px), scaled 0-1 inside the head and blanked outside. Why this method and
stage, with the sanity checks that chose it: docs/experiments.md ("Explanations worth looking at").

It is computed here in a few lines of torch rather than with pytorch-grad-cam: importing that library
loads matplotlib, scikit-learn and scipy, which serving must not; tests/test_explain.py checks that the
maps equal the library's ``HiResCAM`` (and ``overlay`` its ``show_cam_on_image``). Gradients are taken
for the activation only, so backpropagation stops at the stage. The explainer holds a PyTorch copy of
the model of its own: gradients need the PyTorch weights, and a hook on a shared model would fire on
other requests' forward passes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import PIL.ImageFilter

if TYPE_CHECKING:
    import torch

# shown under the heatmap in the app (Markdown): what the map is and what it is not
MAP_NOTE = (
    "**About the heatmap.** It is a class-activation map (HiResCAM: gradient × activation) of the predicted "
    "label, on a grid of 1/8 of the model's input (16 × 16 cells for the bundled 128-pixel model), scaled "
    "from 0 to 1 inside the head outline; everything outside the head is blanked. "
    "Warm cells are where the network found features that raised this label's score, ranked within this "
    "slice only (there is always a hottest cell, however weak the evidence): it is not a tumour outline, "
    "a measure of size or a probability. "
    "A hot spot on a lesion does not prove the label right, and one elsewhere does not prove it wrong."
)

CAM_STRIDE = 8  # the map's cell size in input pixels: the deepest stage at this stride or finer is used
HEAD_THRESHOLD = 0.1  # head mask: blurred intensity above this fraction of the slice's range


class CamExplainer:
    """HiResCAM at the backbone's stride-8 stage, normalised inside the head; one request at a time.

    ``layer`` overrides the stage (a module name inside the timm model, e.g. ``"stages.2"``).
    """

    def __init__(self, model_dir: str | Path, layer: str | None = None):
        from hf_tumor.serving.model import load_model

        self.model = load_model(model_dir)
        for parameter in self.model.parameters():  # gradients are wanted for the activation only
            parameter.requires_grad_(False)
        timm_model = self.model.timm_model
        self.layer, self._channels = cam_layer(timm_model) if layer is None else (layer, None)
        self._module = timm_model.get_submodule(self.layer)
        # the hook is registered per request, and two requests at once would see each other's
        self._lock = threading.Lock()

    def grid(self, pixel_values: np.ndarray, class_index: int) -> np.ndarray:
        """The map of ``class_index`` at the stage's own resolution (h, w), >= 0, not normalised."""
        import torch  # here, not at the top: MAP_NOTE, head_mask and overlay serve without PyTorch

        x = torch.from_numpy(np.ascontiguousarray(pixel_values[:1], dtype=np.float32))
        captured: list[torch.Tensor] = []

        def keep(module, args, output):
            # a leaf that wants its gradient: backpropagation stops here, below it nothing is computed
            # (the copy passed on may be changed in place by the next layer; the leaf may not)
            leaf = output.detach().requires_grad_()
            captured.append(leaf)
            return leaf.clone()

        with self._lock:
            handle = self._module.register_forward_hook(keep)
            try:
                with torch.enable_grad():
                    logits = self.model(pixel_values=x).logits
                    (grad,) = torch.autograd.grad(logits[0, int(class_index)], captured[0])
            finally:
                handle.remove()
        activation = captured[0]
        if activation.ndim != 4:
            raise ValueError(f"layer {self.layer} gives {activation.ndim}-D outputs; a CAM needs (N, C, H, W)")
        if self._channels is not None and activation.shape[1] != self._channels == activation.shape[-1]:
            activation, grad = activation.permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)  # NHWC stages
        with torch.no_grad():
            return torch.relu((grad * activation).sum(1))[0].numpy()

    def heatmap(self, pixel_values: np.ndarray, class_index: int, inside_head: bool = True) -> np.ndarray:
        """The map of ``class_index`` for one preprocessed image (1, 3, H, W), in [0, 1] at H x W.

        ``inside_head``: 0 outside ``head_mask(pixel_values)``, min-max scaled inside it (the default);
        otherwise min-max scaled over the whole image.
        """
        import torch

        height, width = pixel_values.shape[-2:]
        cells = torch.from_numpy(self.grid(pixel_values, class_index))
        cam = torch.nn.functional.interpolate(cells[None, None], size=(height, width), mode="bilinear",
                                              align_corners=False)[0, 0].numpy()
        region = head_mask(pixel_values) if inside_head else np.ones(cam.shape, bool)
        inside = cam[region]
        low, high = float(inside.min()), float(inside.max())
        if high <= low:
            return np.zeros(cam.shape, np.float32)
        return np.where(region, (cam - low) / (high - low), 0).astype(np.float32)


def cam_layer(timm_model: torch.nn.Module, stride: int = CAM_STRIDE) -> tuple[str, int | None]:
    """The module name (and channel count) of the deepest feature stage of at most ``stride``, from timm's
    ``feature_info``; for resnetv2_50 that is ``stages.1`` (16 x 16 at 128 px)."""
    info = getattr(timm_model, "feature_info", None)
    stages = [f for f in info if f.get("reduction", 0) <= stride] if info else []
    if not stages:
        raise ValueError(f"{type(timm_model).__name__} has no feature stage at stride <= {stride}; pass layer=")
    return stages[-1]["module"], stages[-1].get("num_chs")


def head_mask(image: np.ndarray, threshold: float = HEAD_THRESHOLD) -> np.ndarray:
    """Where the head is in a slice: (H, W) bool, for an image (H, W), (C, H, W) or (1, C, H, W) in any
    affine scaling (raw or normalised pixels; channels are averaged).

    The blurred image above ``threshold`` of its range, opened (frames and labels go), its largest
    4-connected component, holes filled.
    NumPy and Pillow only (scipy is not a serving dependency); 5-10 ms at 128 px on one core. A blank image is all head.
    """
    gray = np.asarray(image, np.float32)
    gray = gray.reshape(-1, *gray.shape[-2:]).mean(0)
    low, high = float(gray.min()), float(gray.max())
    if not high > low:
        return np.ones(gray.shape, bool)
    side = max(gray.shape)
    scaled = PIL.Image.fromarray(np.uint8(np.round((gray - low) / (high - low) * 255)))
    blurred = np.asarray(scaled.filter(PIL.ImageFilter.GaussianBlur(side / 64)))
    foreground = blurred > max(threshold * float(blurred.max()), 1.0)
    # an opening: lines thinner than ``size`` go (frames, burnt-in labels, thin bridges between them and the
    # head); zero padding, as Pillow's filters clamp at the edge, where a frame would then survive
    size = 2 * round(side / 32) + 1
    padded = PIL.Image.fromarray(np.pad(np.uint8(foreground) * 255, size))
    opened = padded.filter(PIL.ImageFilter.MinFilter(size)).filter(PIL.ImageFilter.MaxFilter(size))
    foreground = np.asarray(opened)[size:-size, size:-size] > 0
    if not foreground.any():
        return np.ones(gray.shape, bool)
    # the largest component: grown first from the densest part of the foreground (the head, nearly always),
    # then from whatever is left, until what is left could not hold a bigger one
    density = np.asarray(PIL.Image.fromarray(np.uint8(foreground) * 255).filter(PIL.ImageFilter.BoxBlur(side / 16)))
    start = int(np.argmax(np.where(foreground, density, -1)))
    left, largest = foreground.copy(), None
    while True:
        seed = np.zeros_like(foreground)
        seed.flat[start] = True
        part = _grow(seed, left)
        if largest is None or part.sum() > largest.sum():
            largest = part
        left &= ~part
        if left.sum() <= largest.sum():
            break
        start = int(np.argmax(left))
    border = np.zeros_like(foreground)
    border[0] = border[-1] = border[:, 0] = border[:, -1] = True
    return ~_grow(border & ~largest, ~largest)  # the head: what the outside cannot reach


def _grow(seed: np.ndarray, allowed: np.ndarray, steps: int = 8) -> np.ndarray:
    """``seed`` grown 4-connectedly inside ``allowed`` until it stops growing."""
    seed = seed & allowed
    while True:
        before = seed
        for _ in range(steps):
            grown = seed.copy()
            grown[1:] |= seed[:-1]
            grown[:-1] |= seed[1:]
            grown[:, 1:] |= seed[:, :-1]
            grown[:, :-1] |= seed[:, 1:]
            seed = np.logical_and(grown, allowed, out=grown)
        if np.array_equal(seed, before):
            return seed


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map of values in [0, 1], as float RGB in [0, 1] (within 1/255 of OpenCV's)."""
    t = np.clip(np.asarray(values, np.float32), 0, 1)[..., None] * 4
    return np.clip(1.5 - np.abs(t - np.array([3, 2, 1], np.float32)), 0, 1)


def overlay(image: PIL.Image.Image, cam: np.ndarray, opacity: float = 0.45, max_side: int = 512) -> np.ndarray:
    """The heatmap blended over the image (uint8 RGB, longest side at most ``max_side``), as
    pytorch-grad-cam's ``show_cam_on_image`` does it (jet colours, the blend rescaled to its maximum)."""
    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    shown = image.convert("RGB")  # a copy, also for grayscale uploads
    shown.thumbnail((max_side, max_side))
    base = np.asarray(shown, dtype=np.float32) / 255
    heat = np.asarray(PIL.Image.fromarray(np.uint8(255 * np.clip(cam, 0, 1))).resize(shown.size, PIL.Image.BILINEAR))
    colours = np.round(jet(heat / 255) * 255) / 255
    blend = float(opacity) * colours + (1 - float(opacity)) * base
    return np.uint8(255 * blend / blend.max())
