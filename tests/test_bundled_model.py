"""The model shipped in models/: loads offline in fp32 from fp16 storage and classifies real slices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import pipeline

from conftest import CLASSES, SHARED_DATA
from hf_tumor.serving.inference import BUNDLED_MODEL
from hf_tumor.training.audit import DEFAULT_THRESHOLD, correlated_pairs, fingerprints, standardize

pytestmark = pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="no bundled model yet")


def test_bundled_folder_is_complete_and_small():
    for name in ("config.json", "model.safetensors", "README.md", "eval_results.json", "confusion_matrix.png",
                 "confusion_matrix_clean.png", "reliability_diagram.png", "training_curves.png"):
        assert (BUNDLED_MODEL / name).is_file(), name
    assert (BUNDLED_MODEL / "model.safetensors").stat().st_size < 50 * 2**20
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert config["label_names"] == CLASSES and config["dtype"] == "float32"
    assert "calibration_temperature" in config and "ood_energy_threshold" in config


def test_plain_pipeline_classifies_leak_free_test_slices_in_fp32():
    classify = pipeline("image-classification", model=str(BUNDLED_MODEL))
    assert classify.model.dtype == torch.float32
    # 8 test slices of each class with no near twin in Training, by the audit's own measure and threshold
    # (the whole audit, near-duplicate groups included, would take a minute more)
    fp = fingerprints(SHARED_DATA)
    thumbs = standardize(fp.audit_thumbs)
    train = [i for i, split in enumerate(fp.splits) if split == "train"]
    chosen = []
    for name in CLASSES:
        candidates = [i for i, (split, label) in enumerate(zip(fp.splits, fp.labels)) if split == "test" and label == name][::3]
        twinned = set(correlated_pairs(thumbs[candidates], thumbs[train], DEFAULT_THRESHOLD, same=False)[:, 0].tolist())
        chosen += [fp.paths[i] for k, i in enumerate(candidates) if k not in twinned][:8]
    assert len(chosen) == 32
    outputs = classify([str(SHARED_DATA / p) for p in chosen], top_k=1)
    correct = sum(out[0]["label"] == p.split("/")[1] for out, p in zip(outputs, chosen))
    assert correct / len(chosen) >= 0.85, f"{correct}/{len(chosen)}"


def test_default_backend_is_the_checked_int8_export_and_agrees_with_pytorch():
    from hf_tumor.serving.inference import load_predictor

    parity = json.loads((BUNDLED_MODEL / "onnx" / "parity.json").read_text())
    assert parity["num_images"] == 1311 and parity["onnx-int8"]["passed"]
    predictor = load_predictor(BUNDLED_MODEL)
    assert predictor.backend == "onnx-int8"
    paths = [p for c in CLASSES for p in sorted((SHARED_DATA / "Testing" / c).iterdir())[:4]]
    int8 = predictor.predict_files(paths)
    fp32 = load_predictor(BUNDLED_MODEL, "torch").predict_files(paths)  # the reference
    assert sum(a.label == b.label for a, b in zip(int8, fp32)) >= len(paths) - 1


def test_predict_uses_the_bundled_model_by_default():
    env = {k: v for k, v in os.environ.items() if k != "HF_TUMOR_MODEL"}
    image = sorted((SHARED_DATA / "Testing" / "pituitary").iterdir())[0]
    result = subprocess.run([sys.executable, "-m", "hf_tumor.cli", "predict", "--json", str(image)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"model {BUNDLED_MODEL}, backend onnx-int8" in result.stderr
    record = json.loads(result.stdout)
    assert record["label"] == "pituitary" and record["flags"] == []


def test_colour_is_no_shortcut():
    """The only slices whose three channels differ (95 in Training, 31 in Testing) are all notumor:
    the model must not have learnt "faint colour means no tumour". Removing the colour changes nothing."""
    import numpy as np

    from hf_tumor.serving.image_io import read_image
    from hf_tumor.serving.inference import load_predictor

    predictor = load_predictor(BUNDLED_MODEL, "torch")
    images = [read_image(p) for p in sorted((SHARED_DATA / "Testing" / "notumor").iterdir())]
    coloured = [im for im in images if im.mode == "RGB" and np.ptp(np.asarray(im), axis=2).max() > 0][:16]
    assert len(coloured) == 16
    as_stored = predictor.probabilities(coloured)
    as_gray = predictor.probabilities([image.convert("L") for image in coloured])
    np.testing.assert_array_equal(as_gray.argmax(1), as_stored.argmax(1))
    assert np.abs(as_gray - as_stored).max() < 0.05


def test_card_says_how_the_model_does_outside_the_kaggle_folders():
    """The bundled card renders the external check that ships beside the weights (external_results.json)."""
    external = json.loads((BUNDLED_MODEL / "external_results.json").read_text())
    card = (BUNDLED_MODEL / "README.md").read_text()
    assert external["model"] == "models/resnetv2_50-scratch-128" and external["overall"]["slices"] >= 50
    # the volumes whose slices it was trained on are left out of its report, and the card says so
    trained_on = json.loads((BUNDLED_MODEL / "train_args.json").read_text())["DataArguments"]["healthy_sources"]
    assert external["trained_on"] == trained_on and not set(external["sources"]) & set(trained_on)
    assert f"not {', '.join(trained_on)}, which it was trained on" in card
    assert f"{external['confident_tumour_unflagged']} got a tumour label at >= 0.9" in card
    assert "Out of scope" in card and "transformers.js" not in card


def test_card_says_how_the_model_does_on_real_patients():
    """The bundled card renders the real-patient suite that ships beside the weights (patients_results.json)."""
    report = json.loads((BUNDLED_MODEL / "patients_results.json").read_text())
    card = (BUNDLED_MODEL / "README.md").read_text()
    head = report["headline"]
    assert report["model"] == "models/resnetv2_50-scratch-128" and not report["trained_on"]
    assert f"of {head['lesion']['slices']} lesion slices, **{head['lesion']['missed']} (" in card
    assert f"{head['tumour_free']['tumour_confident']} got an unflagged tumour label at >= 0.9" in card
