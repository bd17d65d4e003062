"""Training augmentation: random geometric, photometric and MRI-scanner changes to the cached images.

Training code only (torchvision, TorchIO): serving never imports it. It works on the cached, already
resized uint8 images; what follows it is the eval transform's second half (``hf_tumor.serving.preprocessing``),
the same one prediction uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.transforms import v2


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
    cue_break: float = field(
        default=0.0,
        metadata={"help": "Probability of each of the shortcut audit's cue-breaking transforms, applied to every "
                          "class alike: the skull removed, and the contrast inside the head remapped (inverted, "
                          "folded or a gamma, one at random). 0: none."},
    )
    cue_break_contrast: bool = field(
        default=True,
        metadata={"help": "Whether --cue_break also remaps the contrast (False: the skull removal alone, which "
                          "gives every class skull-stripped examples without teaching it new sequences)."},
    )


def create_train_augment(aug: AugmentConfig, image_size: int) -> v2.Compose:
    """Random geometric and photometric augmentation on uint8 CHW tensors (size is preserved)."""
    steps: list[v2.Transform] = []
    if aug.cue_break > 0:  # first: the brain mask is found best on the unrotated, unscaled slice
        steps.append(CueBreaking(aug.cue_break, contrast=aug.cue_break_contrast))
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


class CueBreaking:
    """The shortcut audit's transforms as augmentation (``hf_tumor.checks.shortcuts``): the Kaggle tumour
    classes are nearly all post-contrast T1 with the skull in view, so a model learns that look as
    "tumour". Applied to every class alike, the look no longer tells the classes apart and only the lesion
    does. Each of the two steps with probability ``p`` (the contrast step only with ``contrast``);
    parameters drawn from a NumPy generator seeded by torch's, so runs repeat with the Trainer's seed.
    """

    def __init__(self, p: float, contrast: bool = True):
        from hf_tumor.checks import shortcuts  # the audit owns these transforms; its tests cover them

        self.p = p
        self.p_contrast = p if contrast else 0.0
        self.skull = shortcuts.skull_removed
        self.contrasts = (shortcuts.inverted, shortcuts.folded, shortcuts.gamma)

    def __call__(self, chw: torch.Tensor) -> torch.Tensor:
        draws = torch.rand(3)
        if not (draws[0] < self.p or draws[1] < self.p_contrast):
            return chw
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))
        grey = chw.float().mean(dim=0).round().to(torch.uint8).numpy()
        if draws[0] < self.p:
            grey = self.skull(grey, rng=rng)
        if draws[1] < self.p_contrast:
            grey = self.contrasts[int(draws[2] * len(self.contrasts)) % len(self.contrasts)](grey, rng=rng)
        return torch.from_numpy(np.ascontiguousarray(grey)).expand(chw.shape[0], -1, -1).contiguous()


def augment_array(pixels: np.ndarray, augment: v2.Compose) -> np.ndarray:
    """Apply a uint8 tensor augmentation to an HWC uint8 array and return an HWC uint8 array."""
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    return augment(chw).permute(1, 2, 0).numpy()
