"""The real-patient evaluation on real scans from ../shared: the bundled model's int8 ONNX, a few volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("onnxruntime")

from conftest import BUNDLED_MODEL
from hf_tumor.checks.patients import (
    LESION_VOXELS,
    PATIENTS_ENV,
    PatientDataError,
    default_data_dir,
    format_table,
    run_patients,
    trained_patients,
    write_report,
)
from hf_tumor.contract import ARGS_FILE
from hf_tumor.errors import UserError
from hf_tumor.serving.inference import load_predictor
from hf_tumor.serving.scan import load_scan, predict_scan
from hf_tumor.serving.volumes import slices

DATA = default_data_dir()
BRATS = DATA / "brats-samples" / "BraTS2021_00006"
TCGA = DATA / "tcga-lgg-fg-6692"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not (BRATS / "seg.nii.gz").is_file() or not (TCGA / "with-skull" / "flair.nii.gz").is_file():
        pytest.skip(f"the real patients are not in {DATA} (set ${PATIENTS_ENV})")
    return DATA


@pytest.fixture(scope="module")
def model_trained_on_brats(tmp_path_factory) -> Path:
    """The bundled model's files, with a train_args.json that says it was trained on BraTS2021_00006."""
    folder = tmp_path_factory.mktemp("model")
    for item in BUNDLED_MODEL.iterdir():
        if item.name != ARGS_FILE:
            (folder / item.name).symlink_to(item)
    args = json.loads((BUNDLED_MODEL / ARGS_FILE).read_text())
    args["DataArguments"]["patient_sources"] = ["BraTS2021_00006"]
    (folder / ARGS_FILE).write_text(json.dumps(args))
    return folder


@pytest.fixture(scope="module")
def report(data_dir, model_trained_on_brats) -> dict:
    """FLAIR of one masked patient (listed as trained on) and of TCGA-FG-6692, with and without skull."""
    return run_patients(model_trained_on_brats, "onnx-int8", data_dir,
                        patients=["BraTS2021_00006", "TCGA-FG-6692"], sequences=["flair"])


def scan(report: dict, patient: str, skull: str = "skull-stripped") -> dict:
    (found,) = [s for s in report["scans"] if s["patient"] == patient and s["skull"] == skull]
    return found


def test_counts_add_up(report):
    assert len(report["scans"]) == 3
    for s in report["scans"]:
        lesion, free = s["lesion"], s["tumour_free"]
        assert lesion["slices"] > 0 and free["slices"] > 0
        assert lesion["expected"] + lesion["other_tumour"] + lesion["flagged"] + lesion["missed"] + lesion["not_cut"] \
            == lesion["slices"]
        assert free["notumor"] + free["tumour"] + free["flagged"] == free["slices"]
        assert free["tumour_confident"] <= free["tumour"]
        roles = [e["role"] for e in s["per_slice"]]
        assert roles.count("lesion") + lesion["not_cut"] == lesion["slices"]
        assert roles.count("tumour_free") == free["slices"] and roles.count("excluded") == s["excluded"]
        assert len(roles) == s["slices_cut"]


def test_lesion_slices_come_from_the_mask(report):
    s = scan(report, "BraTS2021_00006")
    seg = np.asarray(nib.as_closest_canonical(nib.load(BRATS / "seg.nii.gz")).dataobj) > 0
    voxels = seg.sum(axis=(0, 1))
    first, last = s["head_indices"]
    lesion = {e["index"] for e in s["per_slice"] if e["role"] == "lesion"}
    assert lesion == {i for i in range(first, last + 1) if voxels[i] >= LESION_VOXELS}
    assert s["lesion"]["slices"] == int((voxels >= LESION_VOXELS).sum()) == 58  # SOURCE.md: tumour on 45-109
    for e in s["per_slice"]:
        assert e["mask_voxels"] == voxels[e["index"]]
        if e["role"] == "tumour_free":
            assert voxels[e["index"]] == 0
        if e["role"] == "excluded":
            assert 0 < voxels[e["index"]] < LESION_VOXELS


def test_reading_and_same_answers_as_predict(report, data_dir):
    """TCGA-FG-6692 (no mask): its FLAIR reading, and slice for slice what `hf-tumor predict` answers."""
    s = scan(report, "TCGA-FG-6692", "with skull")
    assert s["lesion_from"] == "reading"
    assert [e["index"] for e in s["per_slice"] if e["role"] == "lesion"] == list(range(14, 20))
    assert [e["index"] for e in s["per_slice"] if e["role"] == "excluded"] == [13, 20]
    predictor = load_predictor(BUNDLED_MODEL, "onnx-int8")
    direct = predict_scan(predictor, load_scan(TCGA / "with-skull" / "flair.nii.gz"))
    assert [(e["index"], e["label"], bool(e["flags"])) for e in s["per_slice"]] == \
        [(d.slice.index, d.prediction.label, bool(d.prediction.flags)) for d in direct.slices]


def test_trained_on_patient_is_reported_apart(report, model_trained_on_brats, tmp_path):
    assert report["trained_on"] == ["BraTS2021_00006"]
    assert scan(report, "BraTS2021_00006")["trained_on"] is True
    assert not scan(report, "TCGA-FG-6692", "with skull")["trained_on"]
    held = [s for s in report["scans"] if not s["trained_on"]]
    assert report["headline"]["scans"] == 2
    assert report["headline"]["lesion"]["slices"] == sum(s["lesion"]["slices"] for s in held) == 12
    assert report["trained_on_totals"]["lesion"]["slices"] == 58
    table = format_table(report)
    head, apart = table.split("**Trained on**")
    assert "BraTS2021_00006 |" in apart and "BraTS2021_00006 |" not in head
    assert "TCGA-FG-6692 |" in head
    path = write_report(report, tmp_path)
    assert json.loads(path.read_text())["headline"] == report["headline"]


def test_trained_patients_contract(tmp_path):
    assert trained_patients(tmp_path) == []  # no train_args.json
    args = tmp_path / ARGS_FILE
    args.write_text(json.dumps({"DataArguments": {"healthy_sources": ["mni152"]}}))
    assert trained_patients(tmp_path) == []
    args.write_text(json.dumps({"DataArguments": {"patient_sources": "brats-samples/BraTS2021_00006"}}))
    assert trained_patients(tmp_path) == ["brats-samples/BraTS2021_00006"]
    args.write_text(json.dumps({"DataArguments": {"patient_sources": {"a": 1}}}))
    with pytest.raises(PatientDataError, match="patient_sources"):
        trained_patients(tmp_path)
    args.write_text("{not json")
    with pytest.raises(PatientDataError, match="not readable JSON"):
        trained_patients(tmp_path)


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    absent = tmp_path / "absent"
    with pytest.raises(UserError, match=str(absent)):
        run_patients(BUNDLED_MODEL, "onnx-int8", absent)
    monkeypatch.setenv(PATIENTS_ENV, str(absent))
    with pytest.raises(PatientDataError, match=rf"\${PATIENTS_ENV}") as error:
        run_patients(BUNDLED_MODEL, "onnx-int8")
    assert str(absent) in str(error.value)
    partial = tmp_path / "partial"
    partial.mkdir()
    if TCGA.is_dir():
        (partial / TCGA.name).symlink_to(TCGA)
    with pytest.raises(PatientDataError, match="BraTS2021_00006") as error:
        run_patients(BUNDLED_MODEL, "onnx-int8", partial)
    assert "--patients" in str(error.value)
    with pytest.raises(PatientDataError, match="unknown patient"):
        run_patients(BUNDLED_MODEL, "onnx-int8", partial, patients=["no-such-patient"])


def test_z_scored_volume_is_read_as_a_scan(data_dir):
    """BRATS 2013 files hold float32 z-scores (the background a negative constant): the scan path still
    finds the head around the whole lesion and shows the background black."""
    folder = data_dir / "brats-samples" / "brats_2013_pat0001_1"
    volume = load_scan(folder / "T1c_subtrMeanDivStd.nii.gz")
    assert volume.data.dtype == np.float32 and volume.data.min() < -1
    mask = np.asarray(nib.as_closest_canonical(nib.load(folder / "OTMultiClass.nii.gz")).dataobj) > 0
    lesion = np.flatnonzero(mask.sum(axis=(0, 1)) >= LESION_VOXELS)
    cut = {s.index: s for s in slices(volume, "axial")}
    assert set(lesion) <= set(cut)
    image = np.asarray(cut[int(lesion[len(lesion) // 2])].image)
    assert image[:10, :10].max() == 0 and image.std() > 20


def test_the_patients_and_shortcuts_commands(tmp_path, capsys):
    """`hf-tumor patients` and `hf-tumor shortcuts` on one real scan and one slice per class, as a user runs them."""
    from hf_tumor.cli import main

    out = tmp_path / "patients.json"
    assert main(["patients", "--model", str(BUNDLED_MODEL), "--backend", "onnx-int8", "--patients", "TCGA-FG-6692",
                 "--sequences", "flair", "--skull", "with", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(s["patient"], s["sequence"], s["skull"]) for s in report["scans"]] == [("TCGA-FG-6692", "flair", "with skull")]
    assert "| TCGA-FG-6692 | flair | with skull |" in capsys.readouterr().out
    audit = tmp_path / "shortcuts.json"
    testing = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brain-tumor-mri" / "Testing"
    assert main(["shortcuts", "--data_dir", str(testing), "--model", str(BUNDLED_MODEL), "--backend", "onnx-int8",
                 "--per_class", "1", "--only", "skull_removed", "--output", str(audit)]) == 0
    assert json.loads(audit.read_text())["num_slices"] == 4
    assert main(["patients", "--data_dir", str(tmp_path / "nowhere")]) == 2
