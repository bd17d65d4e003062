"""Good, odd and hostile image files, built in the test from real slices: every reading path is tested on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image

from conftest import real_images
from hf_tumor.serving.image_io import MAX_UPLOAD_BYTES


def _save(image: PIL.Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _dicom(path: Path, with_pixels: bool) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "MR"
    if with_pixels:
        pixels = (np.asarray(PIL.Image.open(real_images("Testing", "glioma", 1)[0]).convert("L"), np.uint16) * 16)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


# readable: each must come out as a proper RGB image
def _exif_rotated(image: PIL.Image.Image, path: Path) -> Path:
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.convert("RGB").resize((300, 200)).save(path, exif=exif)
    return path


GOOD = {
    "jpeg": lambda d, im: Path(real_images("Testing", "meningioma", 1)[0]),
    "grayscale jpeg": lambda d, im: _save(im.convert("L"), d / "gray.jpg"),
    "rgba png": lambda d, im: _save(im.convert("RGBA"), d / "rgba.png"),
    "palette png": lambda d, im: _save(im.convert("P"), d / "p.png"),
    "cmyk jpeg": lambda d, im: _save(im.convert("CMYK"), d / "cmyk.jpg"),
    "16-bit png": lambda d, im: _save(PIL.Image.fromarray(np.asarray(im.convert("L"), np.uint16) * 257), d / "16.png"),
    "animated gif": lambda d, im: _save(im.convert("P"), d / "a.gif", save_all=True, append_images=[im.convert("P").rotate(90)]),
    "dicom": lambda d, im: _dicom(d / "slice.dcm", with_pixels=True),
    "exif-rotated jpeg": lambda d, im: _exif_rotated(im, d / "rot.jpg"),
}

# refused: each with a message containing the given text
BAD = {
    "empty": (lambda d, im: _write(d / "e.jpg", b""), "empty"),
    "text named jpg": (lambda d, im: _write(d / "t.jpg", b"hello"), "not an image"),
    "pdf": (lambda d, im: _write(d / "doc.pdf", b"%PDF-1.4\n%...\n"), "PDF"),
    "truncated jpeg": (lambda d, im: _write(d / "tr.jpg", real_images("Testing", "glioma", 1)[0].read_bytes()[:2000]),
                       "truncated or corrupt"),
    "1x1": (lambda d, im: _save(PIL.Image.new("L", (1, 1)), d / "one.png"), "at least"),
    "bomb": (lambda d, im: _save(PIL.Image.new("1", (20000, 20000)), d / "bomb.png"), "pixels"),
    "dicom without pixels": (lambda d, im: _dicom(d / "nopix.dcm", with_pixels=False), "no pixel data"),
    "too large": (lambda d, im: _write(d / "big.png", b"\x89PNG" + b"\0" * (MAX_UPLOAD_BYTES + 10)), "limit"),
}




def build_all(folder: Path, slice_image: PIL.Image.Image) -> dict[str, Path]:
    """Every GOOD and BAD file written into ``folder``, by kind."""
    files = {kind: make(folder, slice_image) for kind, make in GOOD.items()}
    files.update({kind: make(folder, slice_image) for kind, (make, _) in BAD.items()})
    return files
