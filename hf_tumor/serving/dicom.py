"""The one DICOM pixel decoder, used by a single uploaded slice and by every slice of a series.

A slice must reach the model as the same 8-bit image whether it is uploaded alone
(:func:`hf_tumor.serving.image_io.read_image`) or arrives inside a series that is stacked into a volume and cut
again (:func:`hf_tumor.serving.dicom_series.read_series`, then :func:`hf_tumor.serving.volumes.slices`). So both read
pixels here, and both are windowed by :func:`hf_tumor.serving.volumes.display_image`. The policy, stated once:

- **Values** are the modality transform of the stored pixels (RescaleSlope/RescaleIntercept or the
  Modality LUT, by pydicom's ``apply_modality_lut``), as float32.
- **MONOCHROME1** (where a low value is shown bright) is negated, so that brighter means brighter as in
  MONOCHROME2. A series then shifts its whole volume by one constant so its darkest voxel is 0; the
  window is blind to such a shift, so the slice's image does not change.
- **The file's own display window** (WindowCenter/WindowWidth, a VOI LUT) **is not applied.** It is a
  display preference, not data: scanners often give each slice of a series its own, a volume windowed so
  would be striped when cut across, and the NIfTI of the same scan carries none. Every grey slice,
  alone or cut from a volume, is instead windowed to its own 1st-99th intensity percentile and given
  square pixels (:func:`hf_tumor.serving.volumes.display_image`), as a viewer's auto-window does.
- **One frame per file.** A multi-frame (enhanced) file is a series in itself: refused, alone or inside a
  series, with the advice to convert it to NIfTI (dcm2niix) and read it as a scan.
- **Orientation.** A slice alone is shown as stored (first row at the top); a series is cut in the
  radiological convention of :mod:`hf_tumor.serving.volumes`. For the usual axial acquisition (rows running to the
  patient's left, columns to posterior) the two are the same image; a slice stored otherwise is not turned.
- **Colour** (RGB or YBR, e.g. a secondary capture) is read alone as the RGB image it shows; a series
  of colour images is refused, as it is no MR volume.

Sizes are checked from the header before anything is decoded. Only pixel and geometry tags are read; no
message names any other header value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hf_tumor.errors import UserError
from hf_tumor.serving.image_io import MAX_PIXELS


class DicomPixelError(UserError, ValueError):
    """Pixels that cannot be read under the policy above; callers re-raise it as their own error type."""


@dataclass
class DicomPixels:
    """One frame's values: ``grey`` is a float32 (rows, columns) array for grey images, ``rgb`` a uint8
    (rows, columns, 3) array for colour ones (exactly one is set). ``spacing_mm`` is (between rows, between
    columns) from PixelSpacing, or None when the file states none."""

    grey: np.ndarray | None
    rgb: np.ndarray | None
    spacing_mm: tuple[float, float] | None


def frame_count(ds) -> int:
    """NumberOfFrames (1 where absent or unreadable as a number)."""
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


MULTI_FRAME = ("a multi-frame (enhanced) DICOM file with {n} frames, a series in one file; convert it to NIfTI "
               "(e.g. with dcm2niix) and read it as a scan, or export a single frame")


def check_header(ds) -> None:
    """Refuse, before any pixel is decoded, what the policy refuses: no pixels, several frames, huge images."""
    if "PixelData" not in ds:
        raise DicomPixelError("a DICOM file without an image (no pixel data)")
    frames = frame_count(ds)
    if frames > 1:
        raise DicomPixelError(MULTI_FRAME.format(n=frames))
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise DicomPixelError("a DICOM image without a valid size (Rows, Columns)") from None
    if rows * columns > MAX_PIXELS:
        raise DicomPixelError(f"a DICOM image of {columns:,} x {rows:,} pixels; the limit is {MAX_PIXELS:,} pixels "
                              "(refused before decoding)")


def pixel_spacing(ds) -> tuple[float, float] | None:
    """PixelSpacing as (between rows, between columns) in mm, or None when absent or not two positive numbers."""
    try:
        spacing = tuple(float(s) for s in ds.get("PixelSpacing") or ())
    except (TypeError, ValueError):
        return None
    if len(spacing) != 2 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        return None
    return spacing  # type: ignore[return-value]


def decode(ds) -> DicomPixels:
    """The values of a full pydicom Dataset (read with its pixels) under the module's policy."""
    from pydicom.pixels import apply_modality_lut

    check_header(ds)
    try:
        stored = ds.pixel_array  # pydicom 3 gives colour as RGB whatever the stored colour space
    except Exception as error:
        raise DicomPixelError(f"the DICOM pixel data cannot be decoded ({type(error).__name__})") from None
    spacing = pixel_spacing(ds)
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        if stored.ndim != 3 or stored.shape[-1] < 3:
            raise DicomPixelError("a colour DICOM image whose pixels are not one RGB frame")
        rgb = stored[..., :3]
        if rgb.dtype != np.uint8:  # over 8 bits a sample: scaled by the largest value it can hold
            bits = int(ds.get("BitsStored", 16) or 16)
            rgb = np.clip(np.rint(rgb.astype(np.float64) * (255.0 / (2**bits - 1))), 0, 255)
        return DicomPixels(grey=None, rgb=np.ascontiguousarray(rgb, dtype=np.uint8), spacing_mm=spacing)
    if stored.ndim != 2:
        raise DicomPixelError("a DICOM image that is not a single grey frame")
    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    except Exception as error:
        raise DicomPixelError(f"the DICOM rescale or modality LUT cannot be applied ({type(error).__name__})") from None
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        values = -values
    if not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    return DicomPixels(grey=values, rgb=None, spacing_mm=spacing)
