"""ONNX export, int8 quantization and the parity check that decides whether an export may be used.

``export_model`` writes, inside a model folder, the layout Optimum and transformers.js read:

    onnx/model.onnx              fp32 graph, input ``pixel_values`` (N, 3, H, W), output ``logits``
    onnx/model_quantized.onnx    int8 (static, QDQ, per-channel weights), calibrated on training images
    onnx/parity.json             agreement with the PyTorch model on the whole Testing split

The serving layer (``hf_tumor.serving.inference``) only uses an ONNX file whose parity entry passed, and the
check computes every backend's logits through that layer's own forwards.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from datasets import Dataset

from hf_tumor.contract import ONNX_DIR, ONNX_FILES, PARITY_FILE
from hf_tumor.errors import UserError
from hf_tumor.serving.inference import FEATURES_OUTPUT, onnx_forward, onnx_session, softmax, torch_forward
from hf_tumor.serving.model import LogitsOnly, class_names_of, load_model
from hf_tumor.training.data import (
    attach_transforms, cache_resized, first_per_class, iterate_batches, load_image_folder, resolve_data_dir,
)
from hf_tumor.training.evaluation import portable_path

MIN_TOP1_AGREEMENT = 0.995  # share of test images whose top-1 class matches PyTorch's
MAX_INT8_ACCURACY_DROP = 0.003  # accuracy points (as a fraction) int8 may lose against PyTorch fp32
# ONNX Runtime's activation-range estimators (our name: theirs): MinMax keeps every outlier, Percentile
# clips the top 0.001%, Entropy picks the range that loses least information
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
# the bundled int8 file's calibration, so that `make export` re-makes it
CALIBRATION_IMAGES = 512


class ExportError(UserError, RuntimeError):
    """The model cannot be exported against this data (its classes differ from the data's)."""


def export_fp32(model: torch.nn.Module, image_size: int, path: Path) -> Path:
    """Export ``model`` to one self-contained ONNX file with a dynamic batch axis."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    tmp = path.with_suffix(".tmp.onnx")
    for name in ("onnxscript", "onnx_ir"):  # their INFO lines are pass-by-pass optimizer chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.onnx.export(
        LogitsOnly(model).eval(), (dummy,), str(tmp), input_names=["pixel_values"], output_names=["logits"],
        dynamic_shapes={"pixel_values": {0: batch}}, external_data=False, dynamo=True, optimize=True, verbose=False,
    )
    os.replace(tmp, path)  # never leave a half-written model.onnx where a loader looks
    return path


def calibration_batches(train: Dataset, pretrained_cfg: dict[str, Any], num_images: int, batch_size: int = 16) -> Iterator[np.ndarray]:
    """Evenly spaced Training images (never test images) as normalized NCHW float32 batches."""
    train = cache_resized(train, pretrained_cfg, "train")
    step = max(1, len(train) // num_images)
    view = attach_transforms(train.select(range(0, len(train), step)[:num_images]), pretrained_cfg)
    for batch in iterate_batches(view, batch_size):
        yield batch["pixel_values"].numpy()


def quantize_int8(fp32_path: Path, path: Path, batches: Iterator[np.ndarray], method: str = "minmax") -> Path:
    """Static int8 quantization (QDQ, per-channel weights) calibrated on the given batches."""
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ExportError(f"Unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}.")

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            return None if batch is None else {"pixel_values": batch}

    prepared = path.with_suffix(".prep.onnx")
    tmp = path.with_suffix(".tmp.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)  # folds BN, infers shapes
        quantize_static(
            str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            calibrate_method=CalibrationMethod[CALIBRATION_METHODS[method]],
            # u8 activations x s8 weights is the fast int8 kernel on x86; reduce_range avoids the
            # saturation of that kernel on CPUs without VNNI (AVX2 only)
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
            # ResNetV2's pre-activation BatchNorms cannot be folded into a conv; they stay fp32
            op_types_to_quantize=["Conv", "Gemm", "MatMul", "Add"],
        )
        os.replace(tmp, path)
    finally:
        prepared.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return path


def finish_graph(path: Path) -> Path:
    """Add the pooled penultimate features as a second output, ``features`` (N, C), for the domain check's
    neighbour distance (:mod:`hf_tumor.serving.neighbours`), and drop the exporter's per-node source locations
    (they hold the exporting machine's paths). The logits are untouched: the output reads a tensor the
    classifier already reads."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    head = [n for n in graph.node if n.op_type in ("Conv", "Gemm") and any("head.fc.weight" in i for i in n.input)]
    if len(head) != 1:
        raise ExportError(f"{path}: cannot find the classifier's input (expected one head.fc node, found {len(head)})")
    if FEATURES_OUTPUT not in {o.name for o in graph.output}:
        graph.node.append(onnx.helper.make_node("Flatten", [head[0].input[0]], [FEATURES_OUTPUT], axis=1))
        graph.output.append(onnx.helper.make_tensor_value_info(FEATURES_OUTPUT, onnx.TensorProto.FLOAT, ["batch", None]))
    for node in graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    tmp = path.with_suffix(".tmp.onnx")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return path


def parity_report(model: torch.nn.Module, sessions: dict[str, Any], view, batch_size: int = 32) -> dict[str, Any]:
    """Top-1 agreement, maximum probability difference and accuracy of each ONNX session against PyTorch."""
    forwards = {"torch": torch_forward(model), **{name: onnx_forward(session) for name, session in sessions.items()}}
    logits, labels = {name: [] for name in forwards}, []
    for batch in iterate_batches(view, batch_size):
        x = batch["pixel_values"].numpy()
        labels.append(batch["labels"].numpy())
        for name, forward in forwards.items():
            logits[name].append(forward(x))
    ref_probs, labels = softmax(np.concatenate(logits["torch"])), np.concatenate(labels)
    torch_accuracy = float((ref_probs.argmax(1) == labels).mean())
    report: dict[str, Any] = {"num_images": int(len(labels)), "torch_accuracy": torch_accuracy}
    for name in sessions:
        probs = softmax(np.concatenate(logits[name]))
        accuracy = float((probs.argmax(1) == labels).mean())
        agreement = float((probs.argmax(1) == ref_probs.argmax(1)).mean())
        passed = agreement >= MIN_TOP1_AGREEMENT and (name != "onnx-int8" or torch_accuracy - accuracy <= MAX_INT8_ACCURACY_DROP)
        report[name] = {
            "file": f"{ONNX_DIR}/{ONNX_FILES[name]}",
            "bytes": Path(sessions[name]._model_path).stat().st_size,
            "top1_agreement": agreement,
            "max_probability_difference": float(np.abs(probs - ref_probs).max()),
            "accuracy": accuracy,
            "accuracy_drop": torch_accuracy - accuracy,
            "passed": bool(passed),
        }
    return report


def export_model(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    quantize: bool = False,
    calibration_images: int = CALIBRATION_IMAGES,
    limit_test: int | None = None,
    calibration_method: str = "minmax",
) -> dict[str, Any]:
    """Export ``model_dir`` to ONNX (and int8), check parity on the Testing split, write parity.json.

    ``limit_test`` checks only the first N test images per class (tests; a real export checks all).
    """
    model_dir = Path(model_dir)
    model = load_model(model_dir)
    cfg = model.config.pretrained_cfg
    size = int(cfg["input_size"][-1])
    data_dir = resolve_data_dir(data_dir)
    folders = load_image_folder(data_dir)
    out = model_dir / ONNX_DIR
    start = time.perf_counter()
    paths = {"onnx": export_fp32(model, size, out / ONNX_FILES["onnx"])}
    if quantize:
        batches = calibration_batches(folders["train"], cfg, calibration_images)
        paths["onnx-int8"] = quantize_int8(paths["onnx"], out / ONNX_FILES["onnx-int8"], batches, calibration_method)
    else:
        (out / ONNX_FILES["onnx-int8"]).unlink(missing_ok=True)  # a stale int8 file would not match this export
    for path in paths.values():
        finish_graph(path)
    export_seconds = time.perf_counter() - start

    test = folders["test"]
    if test.features["label"].names != class_names_of(model.config):
        raise ExportError(f"The data's classes {test.features['label'].names} differ from the model's.")
    if limit_test:
        test = first_per_class(test, limit_test)
    cached = cache_resized(test, cfg, "test")
    sessions = {name: onnx_session(p) for name, p in paths.items()}
    report = parity_report(model, sessions, attach_transforms(cached, cfg))
    if quantize:
        report["onnx-int8"].update(calibration_images=calibration_images, calibration_method=calibration_method)
    report.update(model=portable_path(model_dir), data_dir=portable_path(data_dir), export_seconds=round(export_seconds, 1),
                  min_top1_agreement=MIN_TOP1_AGREEMENT, max_int8_accuracy_drop=MAX_INT8_ACCURACY_DROP)
    (out / PARITY_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report
