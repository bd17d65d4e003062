"""Reading image files safely: JPEG, PNG and the other PIL formats, and DICOM.

Every path that opens a user's file (``hf-tumor predict``, the Space's UI and HTTP API) goes through
``read_image``: hostile or broken files end in an ``InputError`` with a message meant for the user,
and nothing large is decoded before its size has been checked.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

from hf_tumor.errors import UserError

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 50_000_000  # a 7,000 x 7,000 image; anything larger is refused before decoding
MIN_SIDE = 32


class InputError(UserError, ValueError):
    """An upload that cannot be classified; the message is shown to the user as is."""


# --------------------------------------------------------------------------- reading uploads


def _is_dicom(head: bytes, path: Path) -> bool:
    return path.suffix.lower() == ".dcm" or head[128:132] == b"DICM"


def _read_dicom(path: Path) -> PIL.Image.Image:
    """A single DICOM slice, decoded and windowed exactly as the same slice inside a series is
    (the policy: :mod:`hf_tumor.serving.dicom`)."""
    import pydicom

    from hf_tumor.serving.dicom import DicomPixelError, decode
    from hf_tumor.serving.volumes import display_image

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as err:
        raise InputError(f"Not a readable DICOM file ({type(err).__name__}).") from None
    try:
        pixels = decode(ds)
    except DicomPixelError as err:
        raise InputError(f"{str(err)[:1].upper()}{str(err)[1:]}.") from None
    if pixels.rgb is not None:
        return PIL.Image.fromarray(pixels.rgb, "RGB")
    return display_image(pixels.grey, *(pixels.spacing_mm or (1.0, 1.0)))


def _to_8bit(pixels: np.ndarray) -> PIL.Image.Image:
    """A 16-bit or float PIL image stretched min to max: such a file is a display image saved with more
    bits, so its look is kept. Raw scanner values come as DICOM, windowed by :mod:`hf_tumor.serving.dicom`."""
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / (high - low) * 255 if high > low else np.zeros_like(pixels)
    return PIL.Image.fromarray(scaled.round().astype(np.uint8), "L")


def read_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open an uploaded file as an upright RGB or grayscale image, or raise InputError saying why not.

    A grayscale file stays grayscale ('L'): the model's transform repeats its one channel after the
    resize, which gives the same input as converting it first in half the time (``EvalTransform.to_array``).

    Handles JPEG/PNG/other PIL formats and DICOM; 16-bit, palette, CMYK, RGBA and animated images
    are converted (first frame); EXIF rotation is applied. A DICOM slice is decoded and windowed as the
    same slice inside a series is (:mod:`hf_tumor.serving.dicom`); a multi-frame DICOM file is refused. Files
    over MAX_UPLOAD_BYTES and images over MAX_PIXELS are refused before their pixels are decoded, so a
    decompression bomb costs nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("No such file.")
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
        PIL.ImageOps.exif_transpose(image, in_place=True)  # in place: a copy of a 512 px RGB image costs 0.1 ms
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            image = _to_8bit(np.asarray(image, dtype=np.float64))
        elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255))  # MRI background is black
            image = PIL.Image.alpha_composite(background, rgba)
    if min(image.size) < MIN_SIDE:
        raise InputError(f"The image is {image.width} x {image.height} pixels; at least {MIN_SIDE} x {MIN_SIDE} is needed.")
    return image if image.mode in ("L", "RGB") else image.convert("RGB")  # convert() copies even RGB
