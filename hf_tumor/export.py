"""ONNX export, int8 quantization and the parity check that decides whether an export may be used.

``export_model`` writes, inside a model folder, the layout Optimum and transformers.js read:

    onnx/model.onnx              fp32 graph, input ``pixel_values`` (N, 3, H, W), output ``logits``
    onnx/model_quantized.onnx    int8 (static, QDQ, per-channel weights), calibrated on training images
    onnx/parity.json             agreement with the PyTorch model on the whole Testing split

The inference backends (``hf_tumor.inference``) only use an ONNX file whose parity entry passed. The
same report checks reading JPEGs at a reduced DCT scale (``read_image(..., reduce_to=...)``) with each
backend, against PyTorch on the files read in full; prediction reads that way only where it passed.
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

from hf_tumor.calibration import softmax
from hf_tumor.data import (
    attach_transforms, cache_resized, first_per_class, iterate_batches, load_image_folder, resolve_data_dir,
)
from hf_tumor.image_io import read_image
from hf_tumor.model import LogitsOnly, class_names_of, load_model
from hf_tumor.preprocessing import create_eval_transform, reduced_read_size

ONNX_DIR = "onnx"
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model_quantized.onnx"}
PARITY_FILE = "parity.json"
MIN_TOP1_AGREEMENT = 0.995  # share of test images whose top-1 class matches PyTorch's
MAX_INT8_ACCURACY_DROP = 0.003  # accuracy points (as a fraction) int8 may lose against PyTorch fp32
REDUCED_DECODE = "reduced_decode"  # parity.json entry of reading JPEGs at reduced scale; same bars as int8


class ExportError(RuntimeError):
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


def quantize_int8(fp32_path: Path, path: Path, batches: Iterator[np.ndarray]) -> Path:
    """Static int8 quantization (QDQ, per-channel weights) calibrated on the given batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

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


def onnx_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session with full graph optimization."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting between runs: spinning ORT threads starve the decode and preprocessing that
    # follow each request on a small CPU (measured: end-to-end 23 ms for an 12 ms int8 forward)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity_report(model: torch.nn.Module, sessions: dict[str, Any], view, batch_size: int = 32) -> dict[str, Any]:
    """Top-1 agreement, maximum probability difference and accuracy of each ONNX session against PyTorch."""
    reference, outputs, labels = [], {name: [] for name in sessions}, []
    with torch.inference_mode():
        for batch in iterate_batches(view, batch_size):
            x = batch["pixel_values"]
            reference.append(model(pixel_values=x).logits.float().numpy())
            labels.append(batch["labels"].numpy())
            for name, session in sessions.items():
                outputs[name].append(session.run(["logits"], {"pixel_values": x.numpy()})[0])
    ref_probs, labels = softmax(np.concatenate(reference)), np.concatenate(labels)
    torch_accuracy = float((ref_probs.argmax(1) == labels).mean())
    report: dict[str, Any] = {"num_images": int(len(labels)), "torch_accuracy": torch_accuracy}
    for name in sessions:
        probs = softmax(np.concatenate(outputs[name]))
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


def weights_bytes(model_dir: str | os.PathLike) -> int:
    """Size of a model folder's PyTorch weights: ties a PyTorch parity verdict to the weights it was measured on."""
    return sum(path.stat().st_size for path in Path(model_dir).glob("*.safetensors"))


def reduced_decode_report(model: torch.nn.Module, sessions: dict[str, Any], paths: list[str], labels: list[int],
                          pretrained_cfg: dict[str, Any], weights: int, batch_size: int = 32) -> dict[str, Any]:
    """Per backend (PyTorch and each ONNX session): top-1 agreement, maximum probability difference and
    accuracy with JPEGs read at reduced scale, against PyTorch on the same files read in full."""
    transform, size = create_eval_transform(pretrained_cfg), reduced_read_size(pretrained_cfg)

    def batch(chunk: list[str], reduce_to: int | None) -> np.ndarray:
        return np.stack([transform.to_array(read_image(path, reduce_to)) for path in chunk])

    def torch_logits(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(pixel_values=torch.from_numpy(x)).logits.float().numpy()

    forwards = {"torch": torch_logits,
                **{name: (lambda x, s=session: s.run(["logits"], {"pixel_values": x})[0]) for name, session in sessions.items()}}
    reference, outputs = [], {name: [] for name in forwards}
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        reference.append(torch_logits(batch(chunk, None)))
        reduced = batch(chunk, size)
        for name, forward in forwards.items():
            outputs[name].append(forward(reduced))
    ref_probs, labels_ = softmax(np.concatenate(reference)), np.asarray(labels)
    reference_accuracy = float((ref_probs.argmax(1) == labels_).mean())
    report: dict[str, Any] = {"reduce_to": size, "num_images": len(paths), "full_decode_torch_accuracy": reference_accuracy}
    for name in forwards:
        probs = softmax(np.concatenate(outputs[name]))
        agreement = float((probs.argmax(1) == ref_probs.argmax(1)).mean())
        accuracy = float((probs.argmax(1) == labels_).mean())
        report[name] = {
            "bytes": weights if name == "torch" else Path(sessions[name]._model_path).stat().st_size,
            "top1_agreement": agreement,
            "max_probability_difference": float(np.abs(probs - ref_probs).max()),
            "accuracy": accuracy,
            "accuracy_drop": reference_accuracy - accuracy,
            "passed": bool(agreement >= MIN_TOP1_AGREEMENT and reference_accuracy - accuracy <= MAX_INT8_ACCURACY_DROP),
        }
    return report


def export_model(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    quantize: bool = False,
    calibration_images: int = 256,
    limit_test: int | None = None,
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
        paths["onnx-int8"] = quantize_int8(paths["onnx"], out / ONNX_FILES["onnx-int8"], batches)
    else:
        (out / ONNX_FILES["onnx-int8"]).unlink(missing_ok=True)  # a stale int8 file would not match this export
    export_seconds = time.perf_counter() - start

    test = folders["test"]
    if test.features["label"].names != class_names_of(model.config):
        raise ExportError(f"The data's classes {test.features['label'].names} differ from the model's.")
    if limit_test:
        test = first_per_class(test, limit_test)
    cached = cache_resized(test, cfg, "test")
    sessions = {name: onnx_session(p) for name, p in paths.items()}
    report = parity_report(model, sessions, attach_transforms(cached, cfg))
    report[REDUCED_DECODE] = reduced_decode_report(model, sessions, cached["path"], cached["label"], cfg, weights_bytes(model_dir))
    report.update(model=str(model_dir), data_dir=str(data_dir), export_seconds=round(export_seconds, 1),
                  min_top1_agreement=MIN_TOP1_AGREEMENT, max_int8_accuracy_drop=MAX_INT8_ACCURACY_DROP)
    (out / PARITY_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report


def passed_backends(model_dir: str | os.PathLike) -> list[str]:
    """The ONNX backends of a local model folder whose files exist and whose parity check passed."""
    parity_file = Path(model_dir) / ONNX_DIR / PARITY_FILE
    if not parity_file.is_file():
        return []
    report = json.loads(parity_file.read_text())
    passed = []
    for name, file in ONNX_FILES.items():
        path, entry = Path(model_dir) / ONNX_DIR / file, report.get(name, {})
        # the size ties the verdict to the file it was measured on: a re-export without a check is not used
        if entry.get("passed") and path.is_file() and path.stat().st_size == entry.get("bytes"):
            passed.append(name)
    return passed


def reduced_decode_passed(model_dir: str | os.PathLike, backend: str) -> bool:
    """Whether reading JPEGs at reduced scale passed its check with ``backend``, on the files there now."""
    parity_file = Path(model_dir) / ONNX_DIR / PARITY_FILE
    if not parity_file.is_file():
        return False
    entry = json.loads(parity_file.read_text()).get(REDUCED_DECODE, {}).get(backend, {})
    if not entry.get("passed"):
        return False
    if backend == "torch":
        return weights_bytes(model_dir) == entry.get("bytes")
    return backend in passed_backends(model_dir)  # the ONNX file's own check ties it to its bytes
