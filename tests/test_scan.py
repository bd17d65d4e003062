"""Whole scans on real volumes: nilearn's MNI152 template as NIfTI, and DICOM series written here from it
with pydicom (shuffled file names, rescale slope/intercept, two acquisition planes), and every kind of bad
scan; answered by the bundled model through the library, the CLI and, in test_app.py, the app."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, real_images
from hf_tumor.serving.dicom_series import MAX_RATIO, SeriesChoiceError
from hf_tumor.serving.image_io import InputError, read_image
from hf_tumor.serving.inference import BUNDLED_MODEL, load_predictor
from hf_tumor.serving.scan import edge_flag, format_summary, index_ranges, is_scan, load_scan, predict_scan
from hf_tumor.serving.volumes import VolumeError, head_extent, load_nifti, slices, window

PATIENT = "Doe^Jane"  # written into every DICOM header; must never come out


@pytest.fixture(scope="module")
def mni_path() -> Path:
    pytest.importorskip("nilearn")
    from hf_tumor.checks.external import SOURCES

    return SOURCES["mni152"].path()


@pytest.fixture(scope="module")
def mni_img(mni_path) -> nib.Nifti1Image:
    """The template, canonical, downsampled 2x in every axis (a 2 mm head keeps the DICOM tests quick)."""
    img = nib.as_closest_canonical(nib.load(mni_path))
    data = np.asarray(img.dataobj, dtype=np.float32)[::2, ::2, ::2]
    affine = img.affine.copy()
    affine[:3, :3] *= 2
    return nib.Nifti1Image(data, affine)


@pytest.fixture(scope="module")
def predictor():
    return load_predictor(BUNDLED_MODEL, "onnx-int8")


def write_series(img: nib.Nifti1Image, folder: Path, plane: str = "axial", slope: float = 0.5,
                 intercept: float = -100.0, series_uid: str | None = None, positions=None,
                 photometric: str = "MONOCHROME2") -> list[Path]:
    """Write a canonical (RAS) image as a DICOM MR series acquired along ``plane``, one file per slice under a
    random name, the pixel values stored as uint16 through RescaleSlope/RescaleIntercept."""
    from pydicom.uid import generate_uid

    data, affine = np.asarray(img.dataobj, dtype=np.float64), img.affine
    nx, ny, nz = data.shape
    zx, zy, zz = nib.affines.voxel_sizes(affine)
    series_uid = series_uid or generate_uid()
    if plane == "axial":  # rows anterior->posterior, columns right->left (LPS cosines +x, +y)
        frames = [(data[::-1, ::-1, k].T, (nx - 1, ny - 1, k)) for k in range(nz)]
        cosines, spacing = [1, 0, 0, 0, 1, 0], [zy, zx]
    else:  # sagittal: rows superior->inferior, columns anterior->posterior (LPS cosines +y, -z)
        frames = [(data[k, ::-1, ::-1].T, (k, ny - 1, nz - 1)) for k in range(nx)]
        cosines, spacing = [0, 1, 0, 0, 0, -1], [zz, zy]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, (pixels, corner) in enumerate(frames):
        ras = affine @ [*corner, 1]
        stored = np.clip(np.rint((pixels - intercept) / slope), 0, 65535).astype(np.uint16)
        ds = mr_dataset(series_uid)
        ds.PatientID, ds.InstanceNumber = "ID-0042", number + 1
        ds.ImagePositionPatient = [float(-ras[0]), float(-ras[1]), float(ras[2])] if positions is None else positions[number]
        ds.ImageOrientationPatient = [float(c) for c in cosines]
        ds.PixelSpacing = [float(s) for s in spacing]
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = stored.tobytes()
        path = folder / f"{random.Random(number).getrandbits(64):016x}.dcm"  # names say nothing of the order
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*.dcm")):
            archive.write(path, path.relative_to(folder).as_posix())
    return target


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("plane", ["axial", "sagittal"])
def test_a_dicom_series_reads_back_as_the_volume_it_was_written_from(mni_img, tmp_path, plane):
    """Order from positions (not names), spacing from the headers, rescale applied, geometry to RAS."""
    write_series(mni_img, tmp_path / "series", plane=plane)
    volume = load_scan(tmp_path / "series")
    expected = np.asarray(mni_img.dataobj, dtype=np.float32)
    assert volume.data.shape == expected.shape
    assert volume.zooms == pytest.approx(tuple(nib.affines.voxel_sizes(mni_img.affine)))
    # uint16 storage at slope 0.5 rounds to the nearest 0.5; the template has no values below the intercept
    assert np.abs(volume.data - expected).max() <= 0.25 + 1e-4
    # the same from a zip, and from the files themselves in any order (as the app receives them)
    assert np.array_equal(load_scan(zip_folder(tmp_path / "series", tmp_path / "series.zip")).data, volume.data)
    files = sorted((tmp_path / "series").iterdir(), reverse=True)
    assert np.array_equal(load_scan(files).data, volume.data)


def test_monochrome1_is_read_with_brighter_meaning_brighter(mni_img, tmp_path):
    write_series(mni_img, tmp_path / "m2")
    write_series(mni_img, tmp_path / "m1", photometric="MONOCHROME1")
    m2 = load_scan(tmp_path / "m2").data
    assert np.array_equal(load_scan(tmp_path / "m1").data, m2.max() - m2)  # inverted, its darkest voxel at 0


def test_images_whose_geometry_was_blanked_are_not_taken_for_a_series(mni_img, tmp_path):
    import pydicom

    for path in write_series(mni_img, tmp_path / "s"):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = None  # as some anonymisers leave it
        ds.save_as(path)
    with pytest.raises(VolumeError, match=f"no DICOM image found \\(0 files that are not DICOM, {mni_img.shape[2]} DICOM files without"):
        load_scan(tmp_path / "s")


def test_a_dicom_series_is_answered_as_its_nifti_is(mni_img, tmp_path, predictor):
    write_series(mni_img, tmp_path / "series", slope=0.25, intercept=-50.0)
    nib.save(mni_img, tmp_path / "head.nii.gz")
    from_dicom = predict_scan(predictor, load_scan(tmp_path / "series"))
    from_nifti = predict_scan(predictor, load_scan(tmp_path / "head.nii.gz"))
    assert [s.slice.index for s in from_dicom.slices] == [s.slice.index for s in from_nifti.slices]
    differences = [abs(a.prediction.probabilities[c] - b.prediction.probabilities[c])
                   for a, b in zip(from_dicom.slices, from_nifti.slices) for c in predictor.class_names]
    assert max(differences) < 0.02  # rescale quantization only: each slice is windowed to its own percentiles


# --------------------------------------------------------------------------- one slice, alone or in a series

TCGA_T1C = REPO.parent / "shared" / "data" / "tcga-lgg-fg-6692" / "with-skull" / "t1c.nii.gz"


@pytest.fixture(scope="module")
def tcga_slice() -> np.ndarray:
    """Axial slice 18 of a real lower-grade glioma patient's T1c (int16, as scanned), as a viewer shows it:
    rows anterior to posterior, columns the patient's right to left (the layout of an axial DICOM image)."""
    if not TCGA_T1C.is_file():
        pytest.fail(f"test data missing: {TCGA_T1C} (the shared copy of TCGA-FG-6692)")
    img = nib.as_closest_canonical(nib.load(TCGA_T1C))
    return np.asarray(img.dataobj[:, :, 18])[::-1, ::-1].T


def mr_dataset(series_uid: str):
    """An empty MR image dataset of one series, with its file meta and the test patient's name."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.Modality, ds.SeriesInstanceUID = PATIENT, "MR", series_uid
    return ds


def write_slice(path: Path, values: np.ndarray, *, position: float = 0.0, series_uid: str | None = None,
                photometric: str = "MONOCHROME2", spacing=(0.9, 0.9), frames: int = 1) -> Path:
    """One axial MR image as a scanner writes it: uint16 through RescaleSlope 0.5 / RescaleIntercept -100,
    a display window that would clip most of the head if applied, and MONOCHROME1 stored inverted. A colour
    ``values`` (rows, columns, 3) is written as RGB; ``frames`` repeats the image as a multi-frame file."""
    from pydicom.uid import generate_uid

    ds = mr_dataset(series_uid or generate_uid())
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(position)], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [float(s) for s in spacing]
    ds.Rows, ds.Columns = values.shape[:2]
    if values.ndim == 3:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        stored = values.astype(np.uint8)
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -100.0
        ds.WindowCenter, ds.WindowWidth = 150.0, 100.0
        stored = np.rint((values.astype(np.float64) + 100.0) / 0.5)
        stored = (60000 - stored if photometric == "MONOCHROME1" else stored).astype(np.uint16)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.concatenate([stored.ravel()] * frames).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("photometric, spacing", [("MONOCHROME2", (0.9, 0.9)), ("MONOCHROME1", (0.9, 0.9)),
                                                  ("MONOCHROME2", (0.9, 1.8))])
def test_a_dicom_slice_gives_the_same_image_and_answer_alone_and_inside_a_series(tcga_slice, tmp_path, predictor,
                                                                                 photometric, spacing):
    """One decoder and one window (the slice's own 1st-99th percentile, the file's window ignored) whatever
    the path: uploaded alone, or one of three copies of itself in a series stacked into a volume and cut."""
    alone = write_slice(tmp_path / "alone.dcm", tcga_slice, photometric=photometric, spacing=spacing)
    uid = "1.2.826.0.1.3680043.8.498.1"
    for n in range(3):
        write_slice(tmp_path / "series" / f"{n}.dcm", tcga_slice, position=5.5 * n, series_uid=uid,
                    photometric=photometric, spacing=spacing)
    image = read_image(alone)
    cut = slices(load_scan(tmp_path / "series"), "axial")
    assert len(cut) == 3 and image.mode == "L"
    assert image.size == cut[1].image.size == (round(tcga_slice.shape[1] * spacing[1] / 0.9), tcga_slice.shape[0])
    assert np.array_equal(np.asarray(image), np.asarray(cut[1].image))
    if spacing[0] == spacing[1]:  # the stated policy, on the scanner's values themselves
        assert np.abs(np.asarray(image, np.int16) - np.asarray(window(tcga_slice), np.int16)).max() <= 1
    single = predictor.predict_files([alone])[0]
    scanned = predict_scan(predictor, load_scan(tmp_path / "series")).slices[1].prediction
    assert single.error is None and single.label == scanned.label
    assert single.probabilities == pytest.approx(scanned.probabilities, abs=1e-5)


def test_multi_frame_and_colour_dicom_follow_one_policy_alone_and_in_a_series(tcga_slice, tmp_path):
    multi = write_slice(tmp_path / "multi" / "mf.dcm", tcga_slice, frames=3)
    with pytest.raises(InputError, match="multi-frame .* with 3 frames.*dcm2niix"):
        read_image(multi)
    with pytest.raises(VolumeError, match="multi-frame .* with 3 frames.*dcm2niix"):
        load_scan(tmp_path / "multi")
    import pydicom

    ds = pydicom.dcmread(multi)
    del ds.ImagePositionPatient  # an enhanced file keeps its geometry per frame, not at the top
    ds.save_as(multi)
    with pytest.raises(VolumeError, match="multi-frame .* with 3 frames"):
        load_scan(tmp_path / "multi")
    # colour: read alone as the RGB image it holds; no MR series is in colour
    rgb = np.stack([np.clip(tcga_slice // 8, 0, 255)] * 3, axis=-1).astype(np.uint8)
    rgb[..., 0] = 255 - rgb[..., 0]
    assert np.array_equal(np.asarray(read_image(write_slice(tmp_path / "rgb.dcm", rgb))), rgb)
    for n in range(3):
        write_slice(tmp_path / "colour" / f"{n}.dcm", rgb, position=5.5 * n, series_uid="1.2.826.0.1.3680043.8.498.2")
    with pytest.raises(VolumeError, match="in colour"):
        load_scan(tmp_path / "colour")


# --------------------------------------------------------------------------- answering


def test_every_head_slice_answered_in_order_with_its_level(mni_path, predictor):
    volume = load_nifti(mni_path)
    result = predict_scan(predictor, volume, "axial")
    first, last = head_extent(volume, 2)
    assert [s.slice.index for s in result.slices] == list(range(first, last + 1))
    levels = [s.slice.level for s in result.slices]
    assert levels[0] == 0 and levels[-1] == 1 and all(np.diff(levels) > 0)
    # batched answers are the single-slice path's answers
    for s in result.slices[::40]:
        alone = predictor.predict([s.slice.image])[0]
        assert alone.label == s.prediction.label
        assert alone.probabilities == pytest.approx(s.prediction.probabilities, abs=1e-5)
    # the ends of the head are flagged, not labelled; a healthy head gets no tumour label anywhere
    assert all(any("skull base" in f for f in s.prediction.flags) for s in result.slices if s.slice.level < 0.2)
    assert all(any("vertex" in f for f in s.prediction.flags) for s in result.slices if s.slice.level > 0.8)
    labelled = [s for s in result.slices if s.prediction.trusted]
    assert len(labelled) >= 0.4 * len(result.slices)
    assert {s.prediction.label for s in labelled} == {"notumor"}
    summary = result.summary()
    assert summary["labelled"] + summary["flagged"] == summary["slices"] == len(result.slices)
    assert sum(entry["slices"] for entry in summary["classes"].values()) == summary["labelled"]
    assert summary["classes"]["notumor"]["slices"] == len(labelled)
    assert f"{len(result.slices)} axial slices through the head" in format_summary(summary)
    assert summary["verdict"]["kind"] == "no_tumour_seen"
    assert f"verdict: no tumour seen on the {len(labelled)} labelled slices" in format_summary(summary)
    rows = result.csv_text().splitlines()
    assert len(rows) == 1 + len(result.slices) and rows[0].startswith("plane,index,level,label,glioma")


def test_other_planes_and_edge_flags(mni_img, predictor):
    volume = load_scan_from_img(mni_img)
    for plane, ends in (("coronal", ("back", "front")), ("sagittal", ("left", "right"))):
        result = predict_scan(predictor, volume, plane)
        assert any(ends[0] in f for f in result.slices[0].prediction.flags)
        assert any(ends[1] in f for f in result.slices[-1].prediction.flags)
    assert edge_flag("axial", 0.5) == [] and edge_flag("axial", 0.1) and edge_flag("axial", 0.9)
    with pytest.raises(VolumeError, match="unknown plane"):
        predict_scan(predictor, volume, "oblique")


def test_the_scan_verdict_never_says_no_tumour_for_a_scan_it_cannot_judge(mni_path, predictor):
    """The healthy head's real answers, then the same scan with its flags and labels changed as a
    skull-stripped tumour scan gets them: mostly flagged, or one slice with a tumour label."""
    import copy

    result = predict_scan(predictor, load_nifti(mni_path), "axial")
    middle = [s for s in result.slices if 0.2 <= s.slice.level <= 0.8]
    unlike = copy.deepcopy(result)
    for s in unlike.slices[: len(unlike.slices) // 2 + 1] + [s for s in unlike.slices if 0.2 <= s.slice.level <= 0.6]:
        s.prediction.flags = s.prediction.flags or ["unlike the slices this model was trained on"]
    verdict = unlike.summary()["verdict"]
    assert verdict["kind"] == "no_verdict" and "no verdict" in verdict["text"]
    assert f"of {len(middle)} mid-head slices are flagged" in verdict["reason"]
    text = format_summary(unlike.summary())
    assert "no verdict" in text and "notumor:" not in text  # said once, instead of the labels
    suspect = copy.deepcopy(result)
    hit = next(s for s in suspect.slices if s.prediction.trusted)
    hit.prediction.label = "glioma"
    verdict = suspect.summary()["verdict"]
    assert verdict["kind"] == "tumour_suspected" and f"slices {hit.slice.index} (glioma)" in verdict["text"]


def load_scan_from_img(img: nib.Nifti1Image):
    from hf_tumor.serving.volumes import volume_from_image

    return volume_from_image(img, name="head")


def test_index_ranges_and_what_counts_as_a_scan(tmp_path):
    assert index_ranges([15, 12, 13, 14, 18, 20, 21]) == "12-15, 18, 20-21"
    assert index_ranges([]) == ""
    assert is_scan(tmp_path) and is_scan("a.nii.gz") and is_scan("b.NII") and is_scan("c.zip")
    assert not is_scan("slice.jpg") and not is_scan("slice.dcm")


# --------------------------------------------------------------------------- bad scans


def _truncated_gz(tmp, mni_img):
    nib.save(mni_img, tmp / "head.nii.gz")
    blob = (tmp / "head.nii.gz").read_bytes()
    (tmp / "cut.nii.gz").write_bytes(blob[: len(blob) // 2])
    return tmp / "cut.nii.gz"


def _four_d(tmp, mni_img):
    return Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"  # a real fMRI run


def _two_d(tmp, mni_img):
    nib.save(nib.Nifti1Image(np.ones((64, 64), np.float32), np.eye(4)), tmp / "flat.nii")
    return tmp / "flat.nii"


def _absurd_nifti(tmp, mni_img):
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(np.float32)
    (tmp / "huge.nii").write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1024)  # a header that lies
    return tmp / "huge.nii"


def _absurd_dicom(tmp, mni_img):
    import pydicom

    paths = write_series(mni_img, tmp / "s", slope=1.0, intercept=0.0)
    for path in paths:  # headers claim 4,000 x 4,000 pixels; the pixel data must never be read
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Columns = 4000
        ds.save_as(path)
    return tmp / "s"


def _two_series(tmp, mni_img):
    write_series(mni_img, tmp / "s" / "a")
    write_series(mni_img, tmp / "s" / "b", plane="sagittal")
    return zip_folder(tmp / "s", tmp / "two.zip")


def _no_image(tmp, mni_img):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta, ds.PatientName, ds.Modality = meta, PATIENT, "SR"  # a structured report: no pixels
    (tmp / "report").mkdir()
    ds.save_as(tmp / "report" / "sr.dcm", enforce_file_format=True)
    (tmp / "report" / "notes.txt").write_text("not DICOM")
    return tmp / "report"


def _zip_bomb(tmp, mni_img):
    with zipfile.ZipFile(tmp / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("IM0001.dcm", "w", force_zip64=True) as member:
            for _ in range(60):
                member.write(bytes(2**20))  # 60 MiB of zeros, ~60 KB on disk
    return tmp / "bomb.zip"


def _traversal(tmp, mni_img):
    paths = write_series(mni_img, tmp / "s")
    with zipfile.ZipFile(tmp / "evil.zip", "w") as archive:
        archive.write(paths[0], "series/../../../etc/cron.d/IM0001.dcm")
    return tmp / "evil.zip"


def _same_position(tmp, mni_img):
    write_series(mni_img, tmp / "s", positions=[[0.0, 0.0, 0.0]] * mni_img.shape[2])
    return tmp / "s"


def _missing_slice(tmp, mni_img):
    write_series(mni_img, tmp / "s")[40].unlink()  # files are written in slice order, under random names
    return tmp / "s"


def _one_image(tmp, mni_img):
    paths = write_series(mni_img, tmp / "s")
    for path in paths[1:]:
        path.unlink()
    return tmp / "s"


def _not_a_zip(tmp, mni_img):
    (tmp / "scan.zip").write_bytes(b"PK\x03\x04 this is no archive")
    return tmp / "scan.zip"


def _empty(tmp, mni_img):
    (tmp / "empty.nii.gz").write_bytes(b"")
    return tmp / "empty.nii.gz"


HOSTILE = {
    "truncated gzip": (_truncated_gz, "truncated or corrupt"),
    "4-D fMRI": (_four_d, "4-D image with 2 volumes.*--volume_index"),
    "2-D NIfTI": (_two_d, "2-D data"),
    "absurd NIfTI header": (_absurd_nifti, "implausibly large.*refused before reading"),
    "absurd DICOM header": (_absurd_dicom, "implausibly large.*refused before reading the pixels"),
    "two series in a zip": (_two_series, "2 DICOM series found \\(series 1: .*; series 2: .*\\).*--series"),
    "DICOM without an image": (_no_image, "no DICOM image found \\(1 files that are not DICOM, 1 DICOM files without"),
    "zip bomb": (_zip_bomb, "zip bomb"),
    "path traversal in a zip": (_traversal, "points outside the archive"),
    "slices at one position": (_same_position, "same position"),
    "a missing slice": (_missing_slice, "not evenly spaced"),
    "a single DICOM image": (_one_image, "single image"),
    "not a zip": (_not_a_zip, "no DICOM image found"),
    "empty file": (_empty, "empty"),
}


@pytest.mark.parametrize("kind", HOSTILE)
def test_bad_scans_get_clear_errors(kind, tmp_path, mni_img):
    make, message = HOSTILE[kind]
    path = make(tmp_path, mni_img)
    with pytest.raises(VolumeError, match=message) as caught:
        load_scan(path)
    assert PATIENT.split("^")[0] not in str(caught.value)


def test_the_choices_a_bad_scan_asks_for_work(tmp_path, mni_img):
    four_d = _four_d(tmp_path, mni_img)
    assert load_scan(four_d, volume_index=1).data.ndim == 3
    two = _two_series(tmp_path, mni_img)
    with pytest.raises(SeriesChoiceError, match="series 3 does not exist"):
        load_scan(two, series=3)
    shapes = {load_scan(two, series=n).data.shape for n in (1, 2)}
    assert shapes == {mni_img.shape}  # both series are the same head, acquired in two planes


def test_a_zip_bomb_is_refused_without_inflating_it(tmp_path, mni_img):
    bomb = _zip_bomb(tmp_path, mni_img)
    assert bomb.stat().st_size * MAX_RATIO < 60 * 2**20  # small on disk, far beyond any DICOM's ratio
    code = ("import sys; from hf_tumor.serving.dicom_series import read_series\n"  # the reader alone: no torch in the peak
            "try: read_series(sys.argv[1])\nexcept Exception as e: print(type(e).__name__)\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120)
    error, peak_kb = out.stdout.split()
    assert error == "VolumeError" and int(peak_kb) < 110_000  # the reader alone peaks near 60 MB; the bomb would add 60 MiB


# --------------------------------------------------------------------------- the command line


def hf_tumor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_tumor.cli", *args], capture_output=True, text=True, timeout=600)


def test_predict_a_scan_and_a_slice_from_the_command_line(mni_img, tmp_path):
    nib.save(mni_img, tmp_path / "head.nii.gz")
    write_series(mni_img, tmp_path / "series")
    zip_folder(tmp_path / "series", tmp_path / "series.zip")
    slice_file = str(real_images("Testing", "glioma", 1)[0])
    out = hf_tumor("predict", slice_file, str(tmp_path / "series.zip"), str(tmp_path / "head.nii.gz"), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[0]["path"] == slice_file and lines[0]["label"] == "glioma"  # the order given is kept
    for name in ("series.zip", "head.nii.gz"):
        rows = [line for line in lines if line["path"].endswith(name)]
        slices, summary = rows[:-1], rows[-1]["summary"]
        assert summary["slices"] == len(slices) > 40 and summary["plane"] == "axial"
        assert [r["index"] for r in slices] == list(range(summary["head_indices"][0], summary["head_indices"][1] + 1))
        assert all(set(r) == {"path", "plane", "index", "level", "label", "probabilities", "flags", "error"} for r in slices)
    assert PATIENT.split("^")[0] not in out.stdout + out.stderr

    out = hf_tumor("predict", str(tmp_path / "head.nii.gz"), "--csv", "--plane", "coronal")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = out.stdout.splitlines()
    assert rows[0] == "path,plane,index,level,label,glioma,meningioma,notumor,pituitary,flags,error"
    assert all(",coronal," in row for row in rows[1:]) and "coronal slices through the head" in out.stderr


def test_bad_scans_on_the_command_line_fail_cleanly_and_the_rest_is_answered(tmp_path, mni_img):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    bad = [_truncated_gz(tmp_path / "a", mni_img), _two_series(tmp_path / "b", mni_img)]
    good = str(real_images("Testing", "pituitary", 1)[0])
    out = hf_tumor("predict", *map(str, bad), good, "--csv")
    assert out.returncode == 1
    rows = {row[0]: row for row in csv.reader(out.stdout.splitlines()[1:])}
    assert "truncated or corrupt" in rows[str(bad[0])][-1] and rows[good][4] == "pituitary"
    out = hf_tumor("predict", *map(str, bad), good)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "truncated or corrupt" in out.stderr and "--series" in out.stderr
    assert f"{good}: pituitary" in out.stdout
    assert PATIENT.split("^")[0] not in out.stdout + out.stderr
