"""Read real MRI volumes and cut them into 2-D slices the way a viewer shows them.

The classifier is trained on single JPEG slices, but people hold volumes (NIfTI from a scanner's
converter, a research archive or a template). To feed a volume to a slice model honestly we must cut
it the way a radiologist's viewer would: in the patient's anatomical frame (from the affine, never
from the order of the array, which differs between scanners and converters), in the radiological
display convention, with square pixels and a per-slice intensity window. This module does only that;
it imports nothing heavier than numpy, Pillow and nibabel so serving code can use it.

Display convention (radiological, as in most clinical viewers; the data is first made RAS+ canonical,
i.e. array axis 0 runs towards the patient's Right, 1 towards Anterior, 2 towards Superior):

- axial (RAS axis 2, seen from the feet): anterior at the top, the patient's right on the image's left;
- coronal (RAS axis 1, seen from the front): superior at the top, the patient's right on the image's left;
- sagittal (RAS axis 0, seen from the patient's left): superior at the top, anterior on the image's left.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Literal

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from PIL import Image

from hf_tumor.errors import UserError

Plane = Literal["axial", "coronal", "sagittal"]
PLANES = ("axial", "coronal", "sagittal")
PLANE_AXIS: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}

MAX_SIDE = 1024  # no clinical or research MRI has more voxels than this along one axis
MAX_VOXELS = 512**3  # 512 MiB as float32: above any real 3-D MRI (a 0.5 mm whole head is ~80M), refused before reading

# Head detection (see head_extent): a voxel is "head" above this fraction of the volume's 99th
# percentile, and a slice holds head when its head area is at least this fraction of the largest
# cross-section along the same axis.
HEAD_INTENSITY = 0.10
HEAD_AREA = 0.05


MAX_SQUARE_SIDE = 8192  # largest side a slice may reach once its pixels are made square


class VolumeError(UserError, ValueError):
    """A file that is not a usable 3-D MRI volume (with a message saying why)."""


class ChoiceNeeded(VolumeError):
    """A file holding several volumes (or series) where one is needed; the message lists the choices."""


@dataclass
class Volume:
    """A 3-D MRI volume in RAS+ canonical orientation.

    ``data`` is float32 indexed (x, y, z): x towards the patient's Right, y Anterior, z Superior.
    ``zooms`` are the voxel sizes in mm along those three axes.
    """

    data: np.ndarray
    zooms: tuple[float, float, float]
    name: str = ""
    source: str = ""


@dataclass
class Slice:
    """One 2-D slice as a viewer shows it.

    ``index`` is the position along the plane's RAS axis; ``level`` is 0 at the first and 1 at the
    last slice of the head along that axis (so 0.5 is mid-head whatever the field of view).
    """

    image: Image.Image
    plane: str
    index: int
    level: float


def volume_from_image(
    img: nib.spatialimages.SpatialImage, *, volume_index: int | None = None, name: str = "", source: str = ""
) -> Volume:
    """A :class:`Volume` from a nibabel image (any format nibabel reads, or one built in memory).

    Shape and size are checked from the header before any voxel is read, so an absurd or hostile
    header costs nothing. The orientation comes from the affine via ``as_closest_canonical``; an
    oblique acquisition is snapped to the nearest axes, as viewers do, not resampled.
    """
    label = name or "volume"
    shape = tuple(int(s) for s in img.shape)
    # A 4-D image holding a single volume (some converters write b=0 maps so) is really 3-D.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise VolumeError(f"{label}: 2-D data (shape {shape}); a 3-D volume is needed, pass single slices as images")
    if len(shape) > 4:
        raise VolumeError(f"{label}: {len(shape)}-D data (shape {shape}); only 3-D volumes (or one volume of a 4-D series) are read")
    if max(shape[:3]) > MAX_SIDE or int(np.prod(shape[:3], dtype=np.int64)) > MAX_VOXELS:
        raise VolumeError(
            f"{label}: shape {shape} is implausibly large for an MRI volume "
            f"(at most {MAX_SIDE} voxels per side and {MAX_VOXELS:,} voxels); refused before reading"
        )
    if len(shape) == 4:
        if volume_index is None:
            raise ChoiceNeeded(
                f"{label}: 4-D image with {shape[3]} volumes (shape {shape}), e.g. fMRI or diffusion; "
                f"choose one 3-D volume with volume_index= (0..{shape[3] - 1}; --volume_index on the command line)"
            )
        if not -shape[3] <= volume_index < shape[3]:
            raise VolumeError(f"{label}: volume_index={volume_index} is out of range for {shape[3]} volumes")
        img = img.slicer[:, :, :, volume_index]
    elif img.ndim > 3:
        img = img.slicer[:, :, :, 0]  # the trailing singleton dimensions dropped above
    try:
        canonical = nib.as_closest_canonical(img)
        data = np.asarray(canonical.get_fdata(dtype=np.float32), dtype=np.float32)
    except (OSError, EOFError, zlib.error, ValueError) as error:
        raise VolumeError(f"{label}: could not read the voxel data ({error}); is the file truncated or corrupt?") from error
    zx, zy, zz = (float(z) for z in voxel_sizes(canonical.affine))
    zooms = (zx, zy, zz)
    if not all(np.isfinite(zooms)) or min(zooms) <= 0:
        raise VolumeError(f"{label}: the affine gives unusable voxel sizes {zooms}")
    # NaN/inf (some pipelines write NaN outside the brain) would poison every percentile below.
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return Volume(data=data, zooms=zooms, name=name, source=source)


def load_nifti(path: str | os.PathLike, *, volume_index: int | None = None, name: str = "", source: str = "") -> Volume:
    """Read a NIfTI (or any nibabel-readable) MRI volume into RAS+ canonical orientation.

    Every way a file can fail (missing, not an image, 2-D, 4-D without ``volume_index``, absurd
    header, truncated gzip) raises :class:`VolumeError` with a message, never a bare traceback.
    """
    path = os.fspath(path)
    label = name or os.path.basename(path)  # messages name the file as the user knows it, not a server's temp path
    if not os.path.isfile(path):
        raise VolumeError(f"{label}: no such file")
    try:
        img = nib.load(path)  # reads the header only; voxel data stays on disk until asked for
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as error:
        raise VolumeError(f"{label}: not a readable MRI volume ({str(error).replace(path, label)})") from error
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise VolumeError(f"{label}: a {type(img).__name__}, not an image with a spatial affine")
    return volume_from_image(img, volume_index=volume_index, name=label, source=source)


def head_extent(volume: Volume, axis: int) -> tuple[int, int]:
    """First and last slice index along ``axis`` (0, 1, 2 in RAS) whose slice holds head.

    A voxel is head when brighter than 10% of the volume's 99th percentile: the 99th percentile lies
    in tissue whether or not the background is zero-padded, and 10% of it sits above the noise floor
    of magnitude images yet below the dimmest tissue (CSF on T1). A slice holds head when its head
    area is at least 5% of the largest cross-section along the axis. Being relative to the largest
    cross-section (not to the slice's voxel count) makes it independent of the field of view and of
    padding, and it ignores the few-voxel specks of noise, ghosts or a vertex cap.
    """
    data = volume.data
    threshold = HEAD_INTENSITY * float(np.percentile(data, 99))
    other = tuple(a for a in range(3) if a != axis)
    area = (data > threshold).sum(axis=other)
    if threshold <= 0 or area.max() == 0:
        raise VolumeError(f"{volume.name or 'volume'}: no head found (the volume is blank)")
    holds = np.flatnonzero(area >= HEAD_AREA * area.max())
    return int(holds[0]), int(holds[-1])


def window(slice2d: np.ndarray) -> Image.Image:
    """An 8-bit grey image windowed to the slice's own 1st-99th intensity percentile.

    That is a viewer's auto-window: MRI intensities have no absolute scale, so each slice is
    stretched to its own range, with the brightest 1% (vessels, fat, artefacts) saturating. Computed in
    float64, so that shifting a slice's values by a constant (as a MONOCHROME1 series is, :mod:`hf_tumor.serving.dicom`)
    leaves its 8-bit image as it is.
    """
    values = np.asarray(slice2d, dtype=np.float64)
    low, high = np.percentile(values, [1, 99])
    if high <= low:
        return Image.fromarray(np.zeros(values.shape, dtype=np.uint8), mode="L")
    scaled = (values - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def display_image(slice2d: np.ndarray, row_mm: float = 1.0, col_mm: float = 1.0) -> Image.Image:
    """How every grey slice of raw intensities reaches the model: a slice cut from a volume and a DICOM
    slice read alone alike (:mod:`hf_tumor.serving.dicom`), so a slice gives the same image either way.

    The slice is windowed to its own 1st-99th percentile (:func:`window`), then its pixels are made square
    by enlarging the coarser axis to the finer spacing (bilinear), so anisotropic pixels do not squash
    the anatomy. ``row_mm`` is the spacing between rows, ``col_mm`` between columns.
    """
    image = window(slice2d)
    if not np.isclose(row_mm, col_mm, rtol=1e-3):
        pixel = min(row_mm, col_mm)
        size = (max(1, round(slice2d.shape[1] * col_mm / pixel)), max(1, round(slice2d.shape[0] * row_mm / pixel)))
        if max(size) > MAX_SQUARE_SIDE:  # a header's spacing, not the pixels, would decide the memory used
            raise VolumeError(f"pixel spacing {row_mm:g} x {col_mm:g} mm would stretch a {slice2d.shape[1]} x "
                              f"{slice2d.shape[0]} slice to {size[0]} x {size[1]} pixels: not a plausible MRI slice")
        image = image.resize(size, Image.Resampling.BILINEAR)
    return image


def _display_array(volume: Volume, plane: str, index: int) -> tuple[np.ndarray, float, float]:
    """The slice as rows x columns in display orientation, with the row and column spacing in mm."""
    d, (zx, zy, zz) = volume.data, volume.zooms
    if plane == "axial":  # rows: anterior -> posterior (y descending); columns: right -> left (x descending)
        return d[::-1, ::-1, index].T, zy, zx
    if plane == "coronal":  # rows: superior -> inferior; columns: right -> left
        return d[::-1, index, ::-1].T, zz, zx
    if plane == "sagittal":  # rows: superior -> inferior; columns: anterior -> posterior
        return d[index, ::-1, ::-1].T, zz, zy
    raise ValueError(f"unknown plane {plane!r}; expected one of {sorted(PLANE_AXIS)}")


def slices(volume: Volume, plane: Plane, count: int | None = None) -> list[Slice]:
    """Slices along ``plane`` within the head extent, in display orientation, with square pixels.

    ``count`` picks that many evenly spaced slices from the first to the last head slice (all of
    them when None). Each is shown by :func:`display_image`.
    """
    if plane not in PLANE_AXIS:
        raise ValueError(f"unknown plane {plane!r}; expected one of {sorted(PLANE_AXIS)}")
    first, last = head_extent(volume, PLANE_AXIS[plane])
    indices = list(range(first, last + 1))
    if count is not None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        if count < len(indices):
            indices = sorted({int(i) for i in np.rint(np.linspace(first, last, count))})
    out = []
    for index in indices:
        image = display_image(*_display_array(volume, plane, index))
        level = (index - first) / (last - first) if last > first else 0.5
        out.append(Slice(image=image, plane=plane, index=index, level=float(level)))
    return out


def level_band(level: float) -> str:
    """'low' (< 0.2), 'middle' (0.2 to 0.8) or 'high' (> 0.8): where a slice lies in the head.

    The middle 60% of the head's extent is where slices look like the training data (a full
    cross-section of brain); the ends are skull caps, the vertex or the skull base and neck.
    """
    if level < 0.2:
        return "low"
    if level > 0.8:
        return "high"
    return "middle"
