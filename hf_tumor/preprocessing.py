"""The one preprocessing path, defined by timm's ``pretrained_cfg``.

The config that travels in ``config.json`` is the single source of truth: ``pipeline()`` builds its
image processor from it (``TimmWrapperImageProcessor``), and training, evaluation and the app build
theirs from the same dict with the same timm factory. The eval transform is split in two so that the
expensive half (decode + resize) runs once into a cache and the cheap half (to tensor + normalize)
runs every time an image is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import timm
import torch
from timm.data import create_transform, resolve_data_config
from torchvision.transforms import Compose
from torchvision.transforms import v2
from transformers.image_utils import load_image as hf_load_image


def make_pretrained_cfg(model_name: str, image_size: int, interpolation: str = "bilinear") -> dict[str, Any]:
    """The timm ``pretrained_cfg`` of a model trained here: resize (squash) to a square, [0,1], normalize.

    Mean and std are the architecture's own (ImageNet's for resnetv2_50), so that ImageNet-initialised
    and scratch models share one preprocessing; ``crop_pct=1.0`` with ``crop_mode='squash'`` means a
    plain resize with no crop, as in the original project.
    """
    base = timm.models.get_pretrained_cfg(model_name)
    base = base.to_dict() if base is not None else {}
    return {
        "input_size": [3, image_size, image_size],
        "interpolation": interpolation,
        "mean": list(base.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)),
        "std": list(base.get("std", timm.data.IMAGENET_DEFAULT_STD)),
        "crop_pct": 1.0,
        "crop_mode": "squash",
    }


def image_size_of(pretrained_cfg: dict[str, Any]) -> int:
    """The square input size stored in a ``pretrained_cfg``."""
    return int(pretrained_cfg["input_size"][-1])


def load_image(source: str | Path | bytes | PIL.Image.Image) -> PIL.Image.Image:
    """Open an image the way ``pipeline()`` does: EXIF orientation applied, converted to RGB."""
    if isinstance(source, bytes):
        import io

        source = PIL.Image.open(io.BytesIO(source))
    elif isinstance(source, Path):
        source = str(source)
    return hf_load_image(source)


@dataclass
class EvalTransform:
    """timm's eval transform for a ``pretrained_cfg``, split into a cacheable and a per-use half."""

    resize: Compose  # PIL -> PIL of the final size (the expensive part; run once into the cache)
    to_tensor: Compose  # PIL or HWC uint8 array -> normalized float CHW tensor
    mean: np.ndarray  # (3, 1, 1) float32, the Normalize step's own values
    std: np.ndarray

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        return self.to_tensor(self.resize(image))

    def to_array(self, image: PIL.Image.Image) -> np.ndarray:
        """``self(image.convert("RGB"))`` computed in NumPy, bit for bit (same float32 operations in the
        same order), for an RGB or a grayscale ('L') image.

        What prediction uses: a 49k-element torch op wakes torch's intra-op threads, which then
        compete with ONNX Runtime's for the 2 cores during the forward that follows (about 1 ms a request).
        A grayscale image is resized as one channel and repeated: Pillow resizes each channel on its
        own, so this equals resizing the RGB conversion, for half the time (0.6 vs 1.2 ms at 512 px).
        So is an RGB image whose channels are all equal (a gray slice saved as a colour JPEG, as most
        of the dataset's RGB files are): checking that costs 0.3 ms.
        """
        if image.mode == "RGB":
            image = gray_if_neutral(image)
        resized = np.asarray(self.resize(image))
        if resized.ndim == 2:
            pixels = np.broadcast_to(resized.astype(np.float32) / np.float32(255), (3, *resized.shape))
        else:  # channels first *before* the float arithmetic: on HWC its inner loops are 3 long (4x slower)
            pixels = np.ascontiguousarray(resized.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)
        return (pixels - self.mean) / self.std


def gray_if_neutral(image: PIL.Image.Image) -> PIL.Image.Image:
    """The first channel of an RGB image whose three channels are identical, as an 'L' image; else the image."""
    red = image.getchannel(0)
    data = red.tobytes()
    if image.getchannel(1).tobytes() == data and image.getchannel(2).tobytes() == data:
        return red
    return image


def create_eval_transform(pretrained_cfg: dict[str, Any]) -> EvalTransform:
    """Build the eval transform with timm's own factory, exactly as ``TimmWrapperImageProcessor`` does."""
    data_config = resolve_data_config(pretrained_cfg, model=None, verbose=False)
    full = create_transform(**data_config, is_training=False)
    steps = list(full.transforms)
    split = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
    normalize = next(t for t in steps[split:] if type(t).__name__ == "Normalize")
    mean, std = (np.asarray(v, dtype=np.float32).reshape(3, 1, 1) for v in (normalize.mean, normalize.std))
    return EvalTransform(resize=Compose(steps[:split]), to_tensor=Compose(steps[split:]), mean=mean, std=std)


@dataclass
class AugmentConfig:
    """Training augmentation, applied to the cached (already resized) uint8 images."""

    hflip: float = field(default=0.5, metadata={"help": "Probability of a horizontal flip."})
    vflip: float = field(default=0.0, metadata={"help": "Probability of a vertical flip."})
    rotation: float = field(default=12.0, metadata={"help": "Maximum rotation in degrees."})
    translate: float = field(default=0.08, metadata={"help": "Maximum shift as a fraction of the size."})
    scale: float = field(default=0.10, metadata={"help": "Maximum zoom in or out as a fraction."})
    crop_scale: float = field(default=1.0, metadata={"help": "Smallest area kept by the random resized crop (1: no crop, the recipe's)."})
    brightness: float = field(default=0.2, metadata={"help": "Brightness jitter factor (0: none)."})
    contrast: float = field(default=0.2, metadata={"help": "Contrast jitter factor (0: none)."})
    mri: float = field(
        default=0.15,
        metadata={"help": "Probability of each of TorchIO's MRI artefacts (bias field, gamma, blur, resolution loss, "
                          "noise), applied to the grey image (0: none; needs hf-tumor[train])."},
    )


def create_train_augment(aug: AugmentConfig, image_size: int) -> v2.Compose:
    """Random geometric and photometric augmentation on uint8 CHW tensors (size is preserved)."""
    steps: list[v2.Transform] = []
    if aug.crop_scale < 1.0:
        steps.append(v2.RandomResizedCrop(image_size, scale=(aug.crop_scale, 1.0), ratio=(0.9, 1.1), antialias=True))
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip > 0:
        steps.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.rotation > 0 or aug.translate > 0 or aug.scale > 0:
        steps.append(
            v2.RandomAffine(
                degrees=aug.rotation,
                translate=(aug.translate, aug.translate),
                scale=(1 - aug.scale, 1 + aug.scale),
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        )
    if aug.brightness > 0 or aug.contrast > 0:
        steps.append(v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast))
    if aug.mri > 0:
        steps.append(MriArtefacts(aug.mri))
    return v2.Compose(steps)


class MriArtefacts:
    """What differs between MRI scanners and protocols, drawn at random with TorchIO: a smooth bias
    field (coil sensitivity), a gamma (contrast and windowing), blur and resolution loss along one
    in-plane axis (thick or anisotropic acquisitions), Rician-like noise. Each with probability ``p``.

    TorchIO is the field's library for this (its transforms are the ones MRI papers use); it works on
    4-D (C, W, H, D) volumes, so a slice goes in as a one-voxel-thick volume. Works on uint8 CHW
    tensors, as the other training steps do; the image is made grey first (the slices are grey).
    """

    def __init__(self, p: float):
        import torchio as tio  # a training dependency only: serving never builds this

        self.transform = tio.Compose([
            tio.RandomBiasField(coefficients=0.3, order=3, p=p),
            tio.RandomGamma(log_gamma=(-0.3, 0.3), p=p),
            tio.RandomBlur(std=(0.0, 1.5), p=p),
            tio.RandomAnisotropy(axes=(0, 1), downsampling=(1.5, 4.0), p=p),
            tio.RandomNoise(std=(0.0, 0.04), p=p),
        ])

    def __call__(self, chw: torch.Tensor) -> torch.Tensor:
        grey = chw.float().mean(dim=0, keepdim=True) / 255.0  # (1, H, W)
        out = self.transform(grey.unsqueeze(-1)).squeeze(-1)  # TorchIO takes (C, W, H, D)
        out = (out.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        return out.expand(chw.shape[0], -1, -1).contiguous()


def augment_array(pixels: np.ndarray, augment: v2.Compose) -> np.ndarray:
    """Apply a uint8 tensor augmentation to an HWC uint8 array and return an HWC uint8 array."""
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    return augment(chw).permute(1, 2, 0).numpy()
