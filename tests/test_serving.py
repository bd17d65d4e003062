"""The serving layer stands alone: predicting with the bundled int8 model loads no training stack and no
PyTorch, its preprocessing is timm's bit for bit without timm, and the Space asks for nothing that serving
does not import."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from conftest import BUNDLED_MODEL, REPO, real_images
from hf_tumor.contract import ModelConfigError, read_config
from hf_tumor.serving.image_io import read_image
from hf_tumor.serving.inference import load_predictor
from hf_tumor.serving.preprocessing import PreprocessingError, create_eval_transform

TRAINING_STACK = ("datasets", "pyarrow", "accelerate", "evaluate", "sklearn", "matplotlib")


def test_predicting_imports_no_training_stack():
    image = real_images("Testing", "glioma", 1)[0]
    code = (
        "import sys\n"
        "from hf_tumor.serving import domain, explain, inference, reporting, scan\n"
        "predictor = inference.load_predictor(inference.BUNDLED_MODEL, 'onnx-int8')\n"
        f"print(predictor.predict_files([{str(image)!r}])[0].label)\n"
        f"print(sorted(m for m in {TRAINING_STACK!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    label, loaded = result.stdout.strip().splitlines()
    assert label == "glioma" and loaded == "[]"


def test_space_requirements_are_pinned_and_hold_no_training_stack():
    lines = [line for line in (REPO / "space" / "requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    names = {line.split("==")[0].lower() for line in lines}
    assert all("==" in line for line in lines)
    assert not names & {"datasets", "accelerate", "evaluate", "scikit-learn", "matplotlib", "pyyaml"}
    assert {"torch", "timm", "transformers", "gradio", "onnxruntime", "pydicom", "nibabel"} <= names
    assert "grad-cam" not in names  # the heatmap is computed in torch (hf_tumor.serving.explain)


# ---------------------------------------------------------------- the ONNX path serves without PyTorch

HEAVY = ("torch", "timm", "transformers", "torchvision")

# runs the CLI's own main() in a fresh process, then prints which modules it imported as the last line
CLI_THEN_MODULES = ("import json, sys\n"
                    "from hf_tumor.cli import main\n"
                    "rc = main(sys.argv[1:])\n"
                    "print(json.dumps(sorted(sys.modules)))\n"
                    "sys.exit(rc)\n")


def run_cli_reporting_modules(*args: str) -> tuple[list[dict], set[str]]:
    """``hf-tumor predict ARGS --json`` as a fresh process: its JSON lines and the modules it imported."""
    result = subprocess.run([sys.executable, "-c", CLI_THEN_MODULES, "predict", *args, "--json"],
                            capture_output=True, text=True, timeout=600,
                            env={k: v for k, v in os.environ.items() if k != "HF_TUMOR_MODEL"})
    assert result.returncode == 0, result.stderr[-2000:]
    *records, modules = result.stdout.strip().splitlines()
    return [json.loads(line) for line in records], set(json.loads(modules))


def int8_tolerance() -> float:
    """The largest probability difference from PyTorch that the int8 file's parity check measured on the
    1,311 Testing slices: a Testing slice's answers must fall within it."""
    return json.loads((BUNDLED_MODEL / "onnx" / "parity.json").read_text())["onnx-int8"]["max_probability_difference"]


def test_predicting_a_slice_with_int8_imports_no_pytorch_and_agrees_with_pytorch():
    image = real_images("Testing", "glioma", 1)[0]
    (record,), modules = run_cli_reporting_modules(str(image), "--backend", "onnx-int8")
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    assert "onnxruntime" in modules  # it did run the int8 file
    reference = load_predictor(BUNDLED_MODEL, "torch").predict_files([image])[0]
    assert record["label"] == reference.label == "glioma" and record["flags"] == reference.flags == []
    assert record["probabilities"].keys() == reference.probabilities.keys()
    difference = max(abs(record["probabilities"][c] - p) for c, p in reference.probabilities.items())
    assert difference <= int8_tolerance()


def test_predicting_a_scan_with_int8_imports_no_pytorch_and_agrees_with_pytorch(tmp_path):
    """nilearn's MNI152 head, downsampled to 2 mm (as tests/test_scan.py does), through `hf-tumor predict`."""
    pytest.importorskip("nilearn")
    import nibabel as nib

    from hf_tumor.checks.external import SOURCES
    from hf_tumor.serving.scan import load_scan, predict_scan

    img = nib.as_closest_canonical(nib.load(SOURCES["mni152"].path()))
    affine = img.affine.copy()
    affine[:3, :3] *= 2
    volume = tmp_path / "mni152-2mm.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32)[::2, ::2, ::2], affine), volume)
    records, modules = run_cli_reporting_modules(str(volume), "--backend", "onnx-int8")
    *slices, summary = records
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    reference = predict_scan(load_predictor(BUNDLED_MODEL, "torch"), load_scan(volume))
    assert summary["summary"]["slices"] == len(slices) == len(reference.slices) > 30
    assert [s["index"] for s in slices] == [s.slice.index for s in reference.slices]
    assert [s["label"] for s in slices] == [r.prediction.label for r in reference.slices]
    assert max(max(abs(s["probabilities"][c] - p) for c, p in r.prediction.probabilities.items())
               for s, r in zip(slices, reference.slices)) <= int8_tolerance()


# ---------------------------------------------------------------- one preprocessing, timm's, without timm


def timm_transform(cfg: dict):
    """What pipeline() applies: the eval transform of transformers' TimmWrapperImageProcessor for ``cfg``."""
    from transformers import TimmWrapperImageProcessor

    return TimmWrapperImageProcessor(pretrained_cfg=cfg).val_transforms


@pytest.mark.parametrize("change", [{}, {"interpolation": "bicubic"}, {"interpolation": "nearest"},
                                    {"interpolation": "lanczos"}, {"interpolation": "box"}, {"interpolation": "hamming"},
                                    {"mean": [0.5], "std": [0.25]}, {"interpolation": None, "mean": None, "std": None},
                                    {"input_size": [3, 97, 97]}])
def test_eval_transform_equals_timms_bit_for_bit(change):
    """The Pillow + NumPy transform every backend, training and evaluation use gives timm's tensor bit for
    bit, for the bundled model's config and variants of it (other filters, one-value and default
    mean/std, an odd size), on real slices (grayscale, gray stored as RGB) and a colour image."""
    cfg = {k: v for k, v in {**read_config(BUNDLED_MODEL).pretrained_cfg, **change}.items() if v is not None}
    ours, theirs = create_eval_transform(cfg), timm_transform(cfg)
    slices = [read_image(p) for p in real_images("Testing", "meningioma", 3)]
    colour = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (61, 83, 3), np.uint8))
    for image in [*slices, colour]:
        expected = theirs(image.convert("RGB")).numpy()
        assert expected.shape == (3, cfg["input_size"][1], cfg["input_size"][2])
        assert np.array_equal(ours.to_array(image), expected)
        assert np.array_equal(ours(image.convert("RGB")).numpy(), expected)


@pytest.mark.parametrize("change, message", [
    ({"crop_pct": 0.875}, "crop_pct 0.875"),
    ({"crop_pct": None}, "crop_pct 0.875"),  # timm's default where a config has none
    ({"crop_mode": "center"}, "crop_mode 'center'"),
    ({"crop_mode": None}, "crop_mode 'center'"),
    ({"crop_mode": "border"}, "crop_mode 'border'"),
    ({"interpolation": "random"}, "interpolation 'random'"),
    ({"input_size": [3, 128, 96]}, "input_size [3, 128, 96]"),
    ({"input_size": [1, 128, 128]}, "input_size [1, 128, 128]"),
    ({"mean": [0.5, 0.5]}, "3 values"),
])
def test_a_preprocessing_it_does_not_compute_is_refused(change, message, tmp_path):
    """A config asking for a crop, another filter name or shape is refused with a clear error, never
    approximated; through the CLI too (a model folder beside the bundled int8 file)."""
    cfg = {k: v for k, v in {**read_config(BUNDLED_MODEL).pretrained_cfg, **change}.items() if v is not None}
    with pytest.raises(PreprocessingError, match=re.escape(message)):
        create_eval_transform(cfg)
    if change == {"crop_mode": "center"}:
        model = tmp_path / "model"
        model.mkdir()
        config = json.loads((BUNDLED_MODEL / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "pretrained_cfg": cfg}))
        (model / "onnx").symlink_to(BUNDLED_MODEL / "onnx")
        result = subprocess.run([sys.executable, "-m", "hf_tumor.cli", "predict", str(real_images("Testing", "glioma", 1)[0]),
                                 "--model", str(model), "--backend", "onnx-int8"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "crop_mode 'center'" in result.stderr and "only a resize with no crop" in result.stderr


def test_the_config_is_read_as_transformers_reads_it(tmp_path):
    """Serving reads config.json without transformers, and gets what AutoConfig gets; a broken one is a clear error."""
    from transformers import AutoConfig

    ours, theirs = read_config(BUNDLED_MODEL), AutoConfig.from_pretrained(BUNDLED_MODEL)
    assert ours.id2label == theirs.id2label and ours.num_labels == theirs.num_labels == 4
    assert ours.pretrained_cfg == theirs.pretrained_cfg
    assert ours.ood_energy_threshold == theirs.ood_energy_threshold
    for text, message in (("{not json", "not a JSON model config"), ("[1, 2]", "not a JSON model config"),
                          ('{"pretrained_cfg": {}}', "names no classes"),
                          ('{"label_names": ["a", "b"]}', "has no pretrained_cfg"),
                          ('{"label_names": ["a"], "pretrained_cfg": {}, "ood_energy_threshold": "high"}', "not a number")):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ModelConfigError, match=message):
            read_config(tmp_path)


def test_reading_dicom_loads_no_torch(tmp_path):
    """A DICOM slice, alone or in a series, is decoded by hf_tumor.serving.dicom and windowed by hf_tumor.serving.volumes:
    numpy, pydicom, nibabel and Pillow, nothing heavier."""
    from hostile_files import GOOD

    dicom = GOOD["dicom"](tmp_path, None)
    code = (
        "import sys\n"
        "from hf_tumor.serving.image_io import read_image\n"
        "from hf_tumor.serving.dicom_series import read_series\n"
        f"image = read_image({str(dicom)!r})\n"
        "print(image.mode, image.size)\n"
        f"print(sorted(m for m in ('torch', 'timm', 'transformers', *{TRAINING_STACK!r}) if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    size, loaded = result.stdout.strip().splitlines()
    assert size == "L (512, 512)" and loaded == "[]"


@pytest.mark.slow
def test_bench_predict_start_measures_the_cli_beside_a_bare_onnxruntime_script(tmp_path):
    """scripts/bench_predict_start.py end to end on one run (it measures; the test does not time): the CLI
    imports no PyTorch, and gives the bare script's answer."""
    pytest.importorskip("nilearn")
    out = tmp_path / "start.json"
    image = real_images("Testing", "pituitary", 1)[0]
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_predict_start.py"), "--image", str(image),
                             "--runs", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert "before" not in report and report["after"]["code"].startswith("commit ")
    assert report["bare_onnxruntime"]["torch_imported"] is False and report["after"]["image"]["torch_imported"] is False
    assert report["after"]["scan"]["torch_imported"] is False and report["after"]["scan"]["slices"] > 100
    assert report["after"]["image_answer"] == "pituitary"
    assert report["after"]["image_max_probability_difference_from_bare"] < 1e-6
    # the process's own peak (a parent's view of a child would count the forked copy of pytest, torch and all)
    assert 50 < report["bare_onnxruntime"]["median"]["peak_rss_mb"] < report["after"]["image"]["median"]["peak_rss_mb"] < 400


def test_neighbour_distances_are_the_kth_nearest_cosine_distance_and_the_threshold_a_validation_quantile():
    from hf_tumor.serving.neighbours import fit, knn_distances, normalise

    rng = np.random.default_rng(0)
    train, validation, far = rng.random((500, 64)), rng.random((200, 64)), rng.random((20, 64)) ** 8
    reference = normalise(train)
    brute = 1 - np.sort(normalise(validation) @ reference.T, axis=1)[:, ::-1][:, 9]
    np.testing.assert_allclose(knn_distances(reference, validation, 10), brute, atol=1e-6)
    check = fit(train, validation, k=10, flag_rate=0.05, max_reference=300)
    assert len(check.reference) == 300
    assert 0.03 <= np.mean(check.distances(validation) > check.threshold) <= 0.07
    assert np.mean(check.distances(far) > check.threshold) > 0.9  # a different distribution lies beyond it


def test_a_model_folder_without_the_neighbour_file_has_no_such_check(tmp_path):
    from hf_tumor.serving.neighbours import NeighbourCheck

    assert NeighbourCheck.load(tmp_path) is None


def test_a_broken_neighbour_file_and_too_few_slices_are_clear_errors(tmp_path):
    """A truncated domain_features.npz names the file and the fix; fitting on k or fewer slices is refused."""
    from hf_tumor.contract import FEATURES_FILE, ModelConfigError
    from hf_tumor.serving.neighbours import NeighbourError, fit

    rng = np.random.default_rng(0)
    fit(rng.random((50, 8)), rng.random((20, 8)), k=10).save(tmp_path)
    from hf_tumor.serving.neighbours import NeighbourCheck

    assert len(NeighbourCheck.load(tmp_path).reference) == 50
    path = tmp_path / FEATURES_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelConfigError, match="hf-tumor evaluate"):
        NeighbourCheck.load(tmp_path)
    with pytest.raises(NeighbourError, match="more than k = 10"):
        fit(rng.random((10, 8)), rng.random((20, 8)), k=10)


def test_a_slice_whose_spacing_would_stretch_it_beyond_reason_is_refused():
    """display_image makes pixels square; a header's absurd spacing gets a clear error, not a huge image."""
    from hf_tumor.serving.volumes import VolumeError, display_image

    slice2d = np.random.default_rng(0).random((64, 64))
    assert display_image(slice2d, 2.0, 1.0).size == (64, 128)
    with pytest.raises(VolumeError, match="not a plausible MRI slice"):
        display_image(slice2d, 0.001, 100.0)
