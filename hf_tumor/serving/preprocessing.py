"""The one preprocessing path, defined by timm's ``pretrained_cfg``, in Pillow and NumPy.

The config that travels in ``config.json`` is the single source of truth: ``pipeline()`` builds timm's
eval transform from it (``TimmWrapperImageProcessor``), and training, evaluation and every serving
backend compute the same transform here, with no PyTorch (the ONNX backends serve without it). The
config's recipe is a squash resize to a square (``crop_pct`` 1.0, ``crop_mode`` 'squash'), [0, 1],
normalize; a config asking for anything else is refused rather than approximated, and
tests/test_serving.py checks the result against timm's own transform bit for bit. The transform is
split in two so that the expensive half (decode + resize) runs once into a cache and the cheap half
(to array + normalize) runs every time an image is used. Training's augmentation: ``hf_tumor.training.augment``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image

from hf_tumor.errors import UserError

if TYPE_CHECKING:
    import torch

# timm's names of Pillow's filters (timm.data.transforms), and its defaults where a config leaves a value out
RESAMPLING = {"nearest": PIL.Image.Resampling.NEAREST, "bilinear": PIL.Image.Resampling.BILINEAR,
              "bicubic": PIL.Image.Resampling.BICUBIC, "box": PIL.Image.Resampling.BOX,
              "hamming": PIL.Image.Resampling.HAMMING, "lanczos": PIL.Image.Resampling.LANCZOS}
TIMM_DEFAULTS = {"interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                 "crop_pct": 0.875, "crop_mode": "center"}


class PreprocessingError(UserError, ValueError):
    """A model config whose preprocessing this project does not compute; the message says what differs."""


def make_pretrained_cfg(model_name: str, image_size: int, interpolation: str = "bilinear") -> dict[str, Any]:
    """The timm ``pretrained_cfg`` of a model trained here: resize (squash) to a square, [0,1], normalize.

    Mean and std are the architecture's own (ImageNet's for resnetv2_50), so that ImageNet-initialised
    and scratch models share one preprocessing; ``crop_pct=1.0`` with ``crop_mode='squash'`` means a
    plain resize with no crop, as in the original project.
    """
    import timm  # training only: serving reads the cfg from config.json

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


def load_image(source: str | Path | bytes | PIL.Image.Image) -> PIL.Image.Image:
    """Open an image the way ``pipeline()`` does: EXIF orientation applied, converted to RGB."""
    from transformers.image_utils import load_image as hf_load_image  # training and audit; serving has image_io

    if isinstance(source, bytes):
        source = PIL.Image.open(io.BytesIO(source))
    elif isinstance(source, Path):
        source = str(source)
    return hf_load_image(source)


@dataclass(frozen=True, eq=False)
class EvalTransform:
    """timm's eval transform for a ``pretrained_cfg``, split into a cacheable and a per-use half."""

    size: int
    resample: PIL.Image.Resampling
    mean: np.ndarray  # (3, 1, 1) float32, the Normalize step's own values
    std: np.ndarray

    def resize(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """The expensive half (run once into the training cache): the squash resize, as torchvision's
        Resize does it on a PIL image."""
        return image.resize((self.size, self.size), self.resample)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """The cheap half: resized HWC (or HW grayscale) uint8 pixels to the normalized CHW float32 array,
        ToTensor + Normalize bit for bit (the same float32 operations in the same order)."""
        pixels = np.asarray(pixels)
        if pixels.ndim == 2:
            chw = np.broadcast_to(pixels.astype(np.float32) / np.float32(255), (3, *pixels.shape))
        else:  # channels first *before* the float arithmetic: on HWC its inner loops are 3 long (4x slower)
            chw = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)
        return (chw - self.mean) / self.std

    def to_tensor(self, pixels: PIL.Image.Image | np.ndarray) -> torch.Tensor:
        """``normalize`` as a torch tensor, for training and evaluation (a resized PIL image or HWC array)."""
        import torch

        return torch.from_numpy(self.normalize(np.asarray(pixels)))

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        """The whole transform of an image as given, as a tensor (what timm's transform returns)."""
        return self.to_tensor(self.resize(image))

    def to_array(self, image: PIL.Image.Image) -> np.ndarray:
        """``self(image.convert("RGB"))`` as a NumPy array, bit for bit, for an RGB or a grayscale ('L') image:
        what prediction uses.

        A grayscale image is resized as one channel and repeated: Pillow resizes each channel on its
        own, so this equals resizing the RGB conversion, for half the time (0.6 vs 1.2 ms at 512 px).
        So is an RGB image whose channels are all equal (a gray slice saved as a colour JPEG, as most
        of the dataset's RGB files are): checking that costs 0.3 ms.
        """
        if image.mode == "RGB":
            image = gray_if_neutral(image)
        return self.normalize(np.asarray(self.resize(image)))


def gray_if_neutral(image: PIL.Image.Image) -> PIL.Image.Image:
    """The first channel of an RGB image whose three channels are identical, as an 'L' image; else the image."""
    red = image.getchannel(0)
    data = red.tobytes()
    if image.getchannel(1).tobytes() == data and image.getchannel(2).tobytes() == data:
        return red
    return image


def create_eval_transform(pretrained_cfg: dict[str, Any]) -> EvalTransform:
    """The eval transform timm builds from ``pretrained_cfg`` (``resolve_data_config`` + ``create_transform``),
    for the configs whose transform is a squash resize with no crop; any other is a PreprocessingError."""
    cfg = {key: pretrained_cfg.get(key) or default for key, default in TIMM_DEFAULTS.items()}
    input_size = pretrained_cfg.get("input_size")
    if input_size is None or len(input_size) != 3 or int(input_size[0]) != 3 or input_size[1] != input_size[2]:
        raise PreprocessingError(f"the model's pretrained_cfg has input_size {input_size}; only a 3-channel "
                                 "square input, [3, N, N], is supported")
    if cfg["crop_mode"] != "squash" or float(cfg["crop_pct"]) != 1.0:
        raise PreprocessingError(f"the model's pretrained_cfg asks for crop_mode {cfg['crop_mode']!r} with crop_pct "
                                 f"{cfg['crop_pct']}; only a resize with no crop (crop_mode 'squash', crop_pct 1.0) "
                                 "is supported")
    if cfg["interpolation"] not in RESAMPLING:
        raise PreprocessingError(f"the model's pretrained_cfg asks for interpolation {cfg['interpolation']!r}; "
                                 f"supported: {', '.join(RESAMPLING)}")
    mean, std = (np.asarray(cfg[key], dtype=np.float32).reshape(-1, 1, 1) for key in ("mean", "std"))
    if mean.shape[0] == 1:  # timm repeats a one-value mean or std over the channels
        mean = np.repeat(mean, 3, axis=0)
    if std.shape[0] == 1:
        std = np.repeat(std, 3, axis=0)
    if mean.shape[0] != 3 or std.shape[0] != 3:
        raise PreprocessingError("the model's pretrained_cfg needs 3 values (or one) for mean and for std")
    return EvalTransform(int(input_size[-1]), RESAMPLING[cfg["interpolation"]], mean, std)
