"""ONNX export, int8 quantization, the parity check, and the backend choice that depends on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import CLASSES, real_images
from hf_tumor.export import ONNX_DIR, PARITY_FILE, REDUCED_DECODE, passed_backends, weights_bytes
from hf_tumor.inference import BackendError, choose_backend, load_predictor, predict_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(trained_model: Path, tiny_data: Path, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the tiny trained model with fp32 and int8 ONNX files and their parity report."""
    from hf_tumor.export import export_model

    model_dir = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(trained_model, model_dir, ignore=shutil.ignore_patterns("checkpoint-*"))
    return model_dir, export_model(model_dir, tiny_data, quantize=True, calibration_images=16)


def test_export_writes_the_optimum_layout_and_a_parity_report(exported):
    model_dir, report = exported
    assert (model_dir / ONNX_DIR / "model.onnx").stat().st_size > 1e6
    assert (model_dir / ONNX_DIR / "model_quantized.onnx").stat().st_size < (model_dir / ONNX_DIR / "model.onnx").stat().st_size / 2
    assert json.loads((model_dir / ONNX_DIR / "parity.json").read_text()) == report
    assert report["num_images"] == 16  # the whole (tiny) Testing split
    # fp32 ONNX computes what PyTorch computes
    assert report["onnx"]["top1_agreement"] == 1.0 and report["onnx"]["max_probability_difference"] < 1e-4
    assert report["onnx"]["passed"]
    int8 = report["onnx-int8"]
    assert int8["passed"] == (int8["top1_agreement"] >= 0.995 and int8["accuracy_drop"] <= 0.003)


def test_export_checks_reading_jpegs_at_reduced_scale_with_every_backend(exported):
    model_dir, report = exported
    reduced = report[REDUCED_DECODE]
    assert reduced["reduce_to"] == 128 and reduced["num_images"] == 16  # twice the 64 px input
    assert set(reduced) >= {"torch", "onnx", "onnx-int8"}
    assert reduced["torch"]["bytes"] == weights_bytes(model_dir)
    for name in ("torch", "onnx", "onnx-int8"):
        entry = reduced[name]
        assert 0 <= entry["top1_agreement"] <= 1 and entry["max_probability_difference"] <= 1
        assert entry["passed"] == (entry["top1_agreement"] >= 0.995 and entry["accuracy_drop"] <= 0.003)
    # the reference is PyTorch on full reads: the same figure the backends' own check starts from
    assert reduced["full_decode_torch_accuracy"] == pytest.approx(report["torch_accuracy"])


def test_model_card_reports_the_reduced_read_check(exported):
    from hf_tumor.hub import render_model_card

    model_dir, report = exported
    text = render_model_card(model_dir, "someone/hf-tumor-test").text
    for name, file in (("torch", "model.safetensors"), ("onnx", "onnx/model.onnx"), ("onnx-int8", "onnx/model_quantized.onnx")):
        entry = report[REDUCED_DECODE][name]
        row = f"| `{file}` | {100 * entry['top1_agreement']:.2f}% | {entry['max_probability_difference']:.4f} |"
        assert row in text, row
    assert f"to no less\nthan {report[REDUCED_DECODE]['reduce_to']} px" in text


def _with_reduced_verdict(model_dir: Path, copy: Path, passed: bool) -> Path:
    shutil.copytree(model_dir, copy)
    parity = copy / ONNX_DIR / PARITY_FILE
    report = json.loads(parity.read_text())
    for entry in report[REDUCED_DECODE].values():
        if isinstance(entry, dict):
            entry["passed"] = passed
    parity.write_text(json.dumps(report))
    return copy


def test_reduced_reading_is_used_only_where_its_check_passed(exported, tmp_path):
    model_dir, _ = exported
    jpeg = real_images("Testing", "glioma", 1)[0]
    passed = _with_reduced_verdict(model_dir, tmp_path / "passed", True)
    predictor = load_predictor(passed, "torch")
    assert predictor.reduced_decode and predictor.read(jpeg).size == (128, 128)  # 512 px at 1/4
    assert "JPEGs read at reduced scale" in predictor.describe()
    assert load_predictor(passed).reduced_decode  # with the auto backend too
    full = load_predictor(passed, "torch", decode="full")
    assert not full.reduced_decode and full.read(jpeg).size == (512, 512) and "read in full" in full.describe()
    # a verdict measured on other weights (of another size) does not apply to these
    parity = passed / ONNX_DIR / PARITY_FILE
    report = json.loads(parity.read_text())
    report[REDUCED_DECODE]["torch"]["bytes"] += 1
    parity.write_text(json.dumps(report))
    assert not load_predictor(passed, "torch").reduced_decode

    failed = _with_reduced_verdict(model_dir, tmp_path / "failed", False)
    assert not load_predictor(failed).reduced_decode
    with pytest.raises(BackendError, match=r"--decode full"):
        load_predictor(failed, "onnx", decode="reduced")
    with pytest.raises(BackendError, match="Unknown decode"):
        load_predictor(failed, decode="fast")


def test_auto_picks_the_fastest_passed_backend_and_agrees_with_torch(exported):
    model_dir, report = exported
    expected = "onnx-int8" if report["onnx-int8"]["passed"] else "onnx"
    assert choose_backend(model_dir) == expected
    paths = [str(p) for c in CLASSES for p in real_images("Testing", c, 2)]
    onnx = predict_files(load_predictor(model_dir, "onnx", decode="full"), paths)
    torch_ = predict_files(load_predictor(model_dir, "torch", decode="full"), paths)
    for a, b in zip(onnx, torch_):
        np.testing.assert_allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-4)
    assert load_predictor(model_dir).backend == expected
    assert f"backend {expected}" in load_predictor(model_dir).describe()


def test_a_file_changed_after_its_check_is_not_used(exported, tmp_path):
    model_dir, _ = exported
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    with open(copy / ONNX_DIR / "model.onnx", "ab") as f:
        f.write(b"\0")
    assert "onnx" not in passed_backends(copy)
    with pytest.raises(BackendError, match="parity check"):
        choose_backend(copy, "onnx")


def test_unexported_model_refuses_onnx_backends_with_the_fix(trained_model):
    assert choose_backend(trained_model) == "torch"
    with pytest.raises(BackendError, match=r"hf-tumor export --model .* --quantize int8"):
        load_predictor(trained_model, "onnx-int8")
    with pytest.raises(BackendError, match="Unknown backend"):
        choose_backend(trained_model, "tensorrt")
