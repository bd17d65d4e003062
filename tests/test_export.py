"""ONNX export, int8 quantization, the parity check, and the backend choice that depends on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import BUNDLED_MODEL, CLASSES, real_images
from hf_tumor.contract import ONNX_DIR, PARITY_FILE, passed_backends
from hf_tumor.serving.inference import BackendError, choose_backend, load_predictor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(trained_model: Path, tiny_data: Path, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the tiny trained model with fp32 and int8 ONNX files and their parity report."""
    from hf_tumor.training.export import export_model

    model_dir = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(trained_model, model_dir, ignore=shutil.ignore_patterns("checkpoint-*"))
    return model_dir, export_model(model_dir, tiny_data, quantize=True, calibration_images=16)


def test_the_default_export_remakes_the_bundled_int8_calibration():
    """`make export` on the bundled model calibrates as its shipped int8 file was calibrated."""
    import inspect

    from hf_tumor.training.export import export_model

    record = json.loads((BUNDLED_MODEL / ONNX_DIR / PARITY_FILE).read_text())["onnx-int8"]
    defaults = inspect.signature(export_model).parameters
    assert (defaults["calibration_images"].default, defaults["calibration_method"].default) == (
        record["calibration_images"], record["calibration_method"])


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


def test_model_card_reports_the_parity_check(exported):
    from hf_tumor.training.hub import render_model_card

    model_dir, report = exported
    text = render_model_card(model_dir, "someone/hf-tumor-test").text
    for name, file in (("onnx", "onnx/model.onnx"), ("onnx-int8", "onnx/model_quantized.onnx")):
        entry = report[name]
        assert f"`{file}`" in text and f"{100 * entry['top1_agreement']:.2f}%" in text


def test_auto_picks_the_fastest_passed_backend_and_agrees_with_torch(exported):
    model_dir, report = exported
    expected = "onnx-int8" if report["onnx-int8"]["passed"] else "onnx"
    assert choose_backend(model_dir) == expected
    paths = [str(p) for c in CLASSES for p in real_images("Testing", c, 2)]
    onnx = load_predictor(model_dir, "onnx").predict_files(paths)
    torch_ = load_predictor(model_dir, "torch").predict_files(paths)
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


def test_calibration_method_is_recorded_and_changes_the_int8_ranges(exported, tiny_data: Path, tmp_path: Path):
    from hf_tumor.serving.model import load_model
    from hf_tumor.training.data import load_image_folder
    from hf_tumor.training.export import ExportError, calibration_batches, quantize_int8

    model_dir, report = exported
    assert (report["onnx-int8"]["calibration_method"], report["onnx-int8"]["calibration_images"]) == ("minmax", 16)
    cfg = load_model(model_dir).config.pretrained_cfg
    batches = calibration_batches(load_image_folder(tiny_data)["train"], cfg, 16)
    percentile = quantize_int8(model_dir / ONNX_DIR / "model.onnx", tmp_path / "percentile.onnx", batches, "percentile")
    assert percentile.read_bytes() != (model_dir / ONNX_DIR / "model_quantized.onnx").read_bytes()
    with pytest.raises(ExportError, match="minmax, percentile, entropy"):
        quantize_int8(model_dir / ONNX_DIR / "model.onnx", tmp_path / "x.onnx", iter([]), "kl")


def test_every_backend_computes_the_neighbour_check_from_the_model_folder(exported, trained_model):
    """The ONNX files carry the classifier's input as a second output, so the int8 path computes the same
    feature-space distance as PyTorch; the reference and threshold travel in the model folder."""
    import onnx
    import PIL.Image

    from hf_tumor.contract import FEATURES_FILE
    from hf_tumor.serving.neighbours import NeighbourCheck

    model_dir, _ = exported
    assert (trained_model / FEATURES_FILE).is_file()
    check = NeighbourCheck.load(model_dir)
    assert check is not None and check.reference.shape[1] == 2048 and check.k == 10
    for name in ("model.onnx", "model_quantized.onnx"):
        graph = onnx.load(str(model_dir / ONNX_DIR / name)).graph
        assert [o.name for o in graph.output] == ["logits", "features"]
        assert not any(p.value.startswith("/") for n in graph.node for p in n.metadata_props)  # no machine paths
    images = [PIL.Image.open(p) for c in CLASSES for p in real_images("Testing", c, 2)]
    distances = {}
    for backend in ("torch", "onnx", "onnx-int8"):
        predictor = load_predictor(model_dir, backend)
        _, features = predictor.outputs(predictor.preprocess(images))
        distances[backend] = check.distances(features)
    np.testing.assert_allclose(distances["onnx"], distances["torch"], atol=1e-4)
    np.testing.assert_allclose(distances["onnx-int8"], distances["torch"], atol=0.05)
    # a slice beyond the threshold is flagged in plain words, whatever the backend
    predictor = load_predictor(model_dir, "onnx-int8")
    predictor.domain.neighbours.threshold = float(distances["onnx-int8"].min()) - 1e-6
    assert all(any("unlike every slice this model was trained on" in f for f in p.flags) for p in predictor.predict(images))


def test_an_onnx_file_without_features_is_refused_where_the_check_needs_them(exported, tmp_path):
    import onnx

    model_dir = tmp_path / "model"
    shutil.copytree(exported[0], model_dir)
    path = model_dir / ONNX_DIR / "model.onnx"
    model = onnx.load(str(path))
    del model.graph.output[1]
    onnx.save(model, str(path))  # as an export before the features output wrote it, its parity record matching
    parity = json.loads((model_dir / ONNX_DIR / "parity.json").read_text())
    parity["onnx"]["bytes"] = path.stat().st_size
    (model_dir / ONNX_DIR / "parity.json").write_text(json.dumps(parity))
    with pytest.raises(BackendError, match="has no 'features' output"):
        load_predictor(model_dir, "onnx")
