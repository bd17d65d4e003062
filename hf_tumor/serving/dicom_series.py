"""Read a DICOM series (a folder, a .zip, or the files themselves) into one 3-D volume with its geometry.

A PACS export is a pile of files whose names say nothing about their order. Slices are ordered by
their position along the slice normal (ImagePositionPatient projected on the cross product of the
ImageOrientationPatient cosines), the voxel spacing comes from PixelSpacing and the distance between
positions, and each slice is decoded by :mod:`hf_tumor.serving.dicom`, as a slice uploaded alone is. The result
is a nibabel image in RAS, so :func:`hf_tumor.serving.volumes.volume_from_image` makes it canonical exactly
as it does a NIfTI file.

Patient data: only geometry and pixel tags are used; no other header value is shown, logged or kept
(messages give counts and image sizes, never a name, ID, date or description). A zip is read in memory,
member by member, never extracted, with its sizes checked before anything is decompressed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np

from hf_tumor.serving.dicom import MULTI_FRAME, DicomPixelError, decode, frame_count
from hf_tumor.serving.volumes import MAX_SIDE, MAX_VOXELS, ChoiceNeeded, VolumeError

MAX_FILES = 4096  # far above any MR series (a 1 mm whole head is ~200 files)
MAX_MEMBER_BYTES = 64 * 2**20  # one uncompressed DICOM slice; a 1024 x 1024 16-bit image is 2 MiB
MAX_TOTAL_BYTES = 2 * 2**30  # all members of a zip together, uncompressed
MAX_RATIO = 200  # the whole archive, uncompressed / compressed: a series 2-20x (blank slices more), a zip bomb 1000x


class SeriesChoiceError(ChoiceNeeded):
    """Several series where one is needed; the message lists them by number, for ``series=``."""


@dataclass
class _Member:
    """One file of the series: how to open it again for its pixels, and the header read without them."""

    open: Callable[[], io.BufferedIOBase]
    header: object  # pydicom Dataset, pixel data not read


def _folder_members(folder: Path) -> list[Callable[[], io.BufferedIOBase]]:
    files = []
    for path in folder.rglob("*"):  # stops at the limit: a folder far too large is not walked to its end
        if path.is_file() and not path.is_symlink():
            files.append(path)
            if len(files) > MAX_FILES:
                raise VolumeError(f"the folder holds over {MAX_FILES:,} files; a series has fewer")
    return [(lambda p=p: open(p, "rb")) for p in sorted(files)]


def _zip_members(archive: zipfile.ZipFile) -> list[Callable[[], io.BufferedIOBase]]:
    """Openers for a zip's members, after refusing what could harm: names that leave the archive (it is
    never extracted; refused all the same), too many members, sizes or a compression ratio no DICOM
    series has. Each member is decompressed only when opened (zipfile stops at its declared size)."""
    infos = [i for i in archive.infolist() if not i.is_dir()]
    if len(infos) > MAX_FILES:
        raise VolumeError(f"the zip holds {len(infos):,} files; a series has at most {MAX_FILES:,}")
    for info in infos:
        name = PurePosixPath(info.filename.replace("\\", "/"))
        if name.is_absolute() or ".." in name.parts or re.match(r"^[A-Za-z]:", info.filename):
            raise VolumeError("a file name inside the zip points outside the archive (absolute, '..' or a drive); "
                              "refused")
        if info.file_size > MAX_MEMBER_BYTES:
            raise VolumeError("a file inside the zip expands far beyond what a DICOM slice can be; refused before "
                              "decompressing it")
    expanded, compressed = sum(i.file_size for i in infos), sum(i.compress_size for i in infos)
    if expanded > MAX_TOTAL_BYTES or expanded > MAX_RATIO * max(compressed, 1) + 2**20:
        raise VolumeError(f"the zip expands {expanded / max(compressed, 1):,.0f}-fold to {expanded / 2**20:,.0f} MiB, "
                          "beyond any DICOM series (a zip bomb?); refused before decompressing it")

    def opener(info: zipfile.ZipInfo) -> Callable[[], io.BufferedIOBase]:
        def read() -> io.BufferedIOBase:
            try:
                with archive.open(info) as member:
                    return io.BytesIO(member.read())
            except (RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
                raise VolumeError(f"a file inside the zip cannot be read: encrypted, corrupt or compressed in a way "
                                  f"Python cannot read ({type(error).__name__})") from None
        return read

    return [opener(info) for info in infos]


def _headers(openers: Sequence[Callable[[], io.BufferedIOBase]]) -> tuple[list[_Member], int, int, int]:
    """The image DICOM files' headers; also how many files were not DICOM, how many held no image, and
    the frame count of a multi-frame file among those (0 if none), to say why when no image is left."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    members, not_dicom, no_image, multi_frame = [], 0, 0, 0
    for open_member in openers:
        try:
            with open_member() as f:
                header = pydicom.dcmread(f, stop_before_pixels=True)
        except VolumeError:
            raise
        except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError):
            not_dicom += 1
            continue
        if _has_geometry(header):
            members.append(_Member(open_member, header))
        else:
            no_image += 1  # DICOMDIR, reports, presentation states, or images whose geometry was blanked
            if frame_count(header) > 1:  # pixels not read here: NumberOfFrames is an image's tag
                multi_frame = frame_count(header)  # an enhanced file keeps its geometry per frame, not at the top
    return members, not_dicom, no_image, multi_frame


def _has_geometry(header) -> bool:
    """Whether a header holds an image with usable geometry (anonymisers sometimes blank these tags)."""
    try:
        sizes = {tag: len(header.get(tag) or ()) for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")}
        return (sizes == {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}
                and int(header.Rows or 0) > 0 and int(header.Columns or 0) > 0)
    except (AttributeError, TypeError, ValueError):
        return False


def _describe(group: list[_Member]) -> str:
    h = group[0].header
    return f"{len(group)} images of {int(h.Rows)} x {int(h.Columns)}"


def _choose_series(members: list[_Member], series: int | None) -> list[_Member]:
    groups: dict[str, list[_Member]] = {}
    for member in members:
        groups.setdefault(str(getattr(member.header, "SeriesInstanceUID", "")), []).append(member)
    ordered = [groups[uid] for uid in sorted(groups)]
    if series is None and len(ordered) > 1:
        listing = "; ".join(f"series {n}: {_describe(g)}" for n, g in enumerate(ordered, 1))
        raise SeriesChoiceError(f"{len(ordered)} DICOM series found ({listing}); choose one with series= "
                                f"(--series N on the command line)")
    if series is not None and not 1 <= series <= len(ordered):
        raise SeriesChoiceError(f"series {series} does not exist: {len(ordered)} series found (numbered from 1)")
    return ordered[(series or 1) - 1]


def _inverted(header) -> bool:
    return header.get("PhotometricInterpretation") == "MONOCHROME1"


def _geometry(group: list[_Member]) -> tuple[list[_Member], np.ndarray]:
    """The slices in order along their normal, and the RAS affine of the stacked (column, row, slice) array."""
    first = group[0].header
    rows, columns = int(first.Rows), int(first.Columns)
    cosines = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    spacing = np.asarray(first.PixelSpacing, dtype=np.float64)  # (between rows, between columns)
    for member in group:
        h = member.header
        if frame_count(h) > 1:
            raise VolumeError(MULTI_FRAME.format(n=frame_count(h)))
        if (int(h.Rows), int(h.Columns)) != (rows, columns):
            raise VolumeError("the images of the series differ in size; it is not one volume")
        if _inverted(h) != _inverted(first):
            raise VolumeError("the images of the series mix MONOCHROME1 and MONOCHROME2; it is not one volume")
        if not np.allclose(np.asarray(h.ImageOrientationPatient, dtype=np.float64), cosines, atol=1e-3):
            raise VolumeError("the images of the series differ in orientation (a localizer or several stacks); "
                              "it is not one volume")
    if max(rows, columns, len(group)) > MAX_SIDE or rows * columns * len(group) > MAX_VOXELS:
        raise VolumeError(f"{len(group)} images of {rows} x {columns} is implausibly large for an MRI series; "
                          "refused before reading the pixels")
    if len(group) < 2:
        raise VolumeError("the series holds a single image: classify it as a slice, not as a scan")
    row_cosine, column_cosine = cosines[:3], cosines[3:]
    normal = np.cross(row_cosine, column_cosine)
    if not np.isclose(np.linalg.norm(normal), 1, atol=1e-2) or spacing.min() <= 0:
        raise VolumeError("the series' ImageOrientationPatient or PixelSpacing is not valid geometry")
    positions = np.array([np.asarray(m.header.ImagePositionPatient, dtype=np.float64) for m in group])
    order = np.argsort(positions @ normal, kind="stable")
    group, positions = [group[i] for i in order], positions[order]
    steps = np.diff(positions @ normal)
    if steps.min() < 1e-3:
        raise VolumeError("two images of the series lie at the same position (several echoes or repeats?); "
                          "it is not one volume")
    if steps.max() - steps.min() > 0.1 * np.median(steps):
        raise VolumeError("the images are not evenly spaced along the slice normal (missing files?)")
    step = (positions[-1] - positions[0]) / (len(group) - 1)
    # DICOM patient coordinates are LPS; column index i runs along the row cosine, row index j along the column cosine
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cosine * spacing[1], column_cosine * spacing[0], step, positions[0]
    return group, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _pixels(member: _Member) -> np.ndarray:
    """One slice's values, decoded as a single uploaded slice is (:mod:`hf_tumor.serving.dicom`)."""
    import pydicom

    try:
        with member.open() as f:
            ds = pydicom.dcmread(f)
        pixels = decode(ds)
    except VolumeError:
        raise
    except DicomPixelError as error:
        raise VolumeError(f"an image of the series: {error}") from None
    except Exception as error:
        raise VolumeError(f"an image's pixel data cannot be decoded ({type(error).__name__})") from None
    if pixels.grey is None:
        raise VolumeError("an image of the series is in colour; a series of grey MR images is needed")
    return pixels.grey.T  # (column, row): the affine's first two axes


def read_series(source: str | os.PathLike | Sequence[str | os.PathLike], series: int | None = None,
                name: str = "") -> nib.Nifti1Image:
    """A folder, a .zip or a list of DICOM files holding one series, as a RAS nibabel image.

    Files that are not DICOM, or DICOM without an image, are skipped; several series raise
    :class:`SeriesChoiceError` listing them unless ``series`` (numbered from 1) picks one. Every problem
    is a :class:`~hf_tumor.serving.volumes.VolumeError` with a message meant for the user.
    """
    label = name or "scan"
    with contextlib.ExitStack() as stack:
        try:
            if isinstance(source, (str, os.PathLike)):
                path = Path(source)
                if path.is_dir():
                    openers = _folder_members(path)
                elif path.is_file() and zipfile.is_zipfile(path):
                    try:
                        archive = stack.enter_context(zipfile.ZipFile(path))
                    except (zipfile.BadZipFile, OSError, EOFError) as error:
                        raise VolumeError(f"not a readable zip archive ({type(error).__name__})") from None
                    openers = _zip_members(archive)
                elif path.is_file():
                    openers = [lambda: open(path, "rb")]
                else:
                    raise VolumeError("no such file or folder")
            else:
                if len(source) > MAX_FILES:
                    raise VolumeError(f"{len(source):,} files; a series has at most {MAX_FILES:,}")
                openers = [(lambda p=Path(p): open(p, "rb")) for p in source]
            members, not_dicom, no_image, multi_frame = _headers(openers)
            if not members and multi_frame:
                raise VolumeError(MULTI_FRAME.format(n=multi_frame))
            if not members:
                raise VolumeError(f"no DICOM image found ({not_dicom} files that are not DICOM, {no_image} DICOM "
                                  "files without an image)")
            group, affine = _geometry(_choose_series(members, series))
            data = np.stack([_pixels(member) for member in group], axis=2)
            if _inverted(group[0].header):
                # decoded negated; one constant for the whole series puts its darkest voxel at 0, as a
                # MONOCHROME2 background is, which head detection needs. The per-slice window ignores it.
                data -= data.min()
        except VolumeError as error:
            raise type(error)(f"{label}: {error}") from None
    return nib.Nifti1Image(data, affine)
