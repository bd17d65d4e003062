"""The benchmark scripts run end to end on a tiny setting and write their JSON (they measure; tests do not time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from conftest import BUNDLED_MODEL, CLASSES, REPO, SHARED_DATA, real_images
from hf_tumor.training.runtime import CPU_FEATURES, bf16_available, machine_kind

pytestmark = pytest.mark.slow


def run_script(name: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_bench_inference_reports_every_stage(trained_model: Path, tmp_path: Path):
    out = tmp_path / "inference.json"
    gray = PIL.Image.open(real_images("Testing", "glioma", 1)[0]).convert("L")
    files = {"gray": tmp_path / "gray.png", "gray-in-rgb": tmp_path / "rgb.png", "colour": tmp_path / "colour.png"}
    gray.save(files["gray"])
    gray.convert("RGB").save(files["gray-in-rgb"])  # three equal channels (PNG: lossless)
    PIL.Image.merge("RGB", (gray, gray, gray.point(lambda v: v // 2))).save(files["colour"])
    run_script("bench_inference.py", "--model", str(trained_model), "--images", *map(str, files.values()),
               "--repeats", "3", "--batch_sizes", "1", "4", "--out", str(out))
    report = json.loads(out.read_text())
    torch_ = report["backends"]["torch"]
    assert set(report["backends"]) == {"torch"}  # the tiny model has no checked ONNX export
    # recorded relative to the repository: no machine's absolute paths in benchmark files
    assert {kind: entry["file"] for kind, entry in torch_["files"].items()} == {k: os.path.relpath(v, REPO) for k, v in files.items()}
    # no ordering between the figures: at 3 repeats on a busy machine, timings are noise
    for entry in torch_["files"].values():
        assert all(entry[key] > 0 for key in ("forward_ms", "end_to_end_ms", "read_ms", "preprocess_ms"))
        assert entry["end_to_end_over_forward"] == pytest.approx(entry["end_to_end_ms"] / entry["forward_ms"], rel=0.01)
    assert set(torch_["throughput_images_per_s"]) == {"1", "4"}
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["versions"]["torch"]
    assert report["machine"]["kind"] == machine_kind()


def test_bench_inference_refuses_two_files_of_one_kind(trained_model: Path, tmp_path: Path):
    first = real_images("Testing", "glioma", 1)[0]
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_inference.py"), "--model", str(trained_model),
                             "--images", str(first), str(first), "--out", str(tmp_path / "x.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "time one file of each kind" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.json").exists()


def test_bench_train_compares_loader_bare_loop_and_trainer(tiny_data: Path, tmp_path: Path):
    out = tmp_path / "train.json"
    run_script("bench_train.py", "--data_dir", str(tiny_data), "--sizes", "64", "--batch_size", "4", "--steps", "2",
               "--warmup", "1", "--out", str(out))
    report = json.loads(out.read_text())
    runs = report["runs"]
    fp32 = next(r for r in runs if r["precision"] == "fp32")
    assert fp32["image_size"] == 64 and fp32["loader_images_per_s"] > 0
    assert fp32["bare_loop_images_per_s"] > 0 and fp32["trainer_images_per_s"] > 0
    assert fp32["trainer_peak_rss_mb"] > 100
    bf16 = next(r for r in runs if r["precision"] == "bf16")
    # bf16 is measured exactly where the hardware has it natively (CPU CI machines have come both
    # ways, so either branch may run), and the report says which instruction sets decided it
    assert set(report["machine"]["cpu_features"]) <= set(CPU_FEATURES)
    if bf16_available():
        assert bf16["trainer_images_per_s"] > 0 and bf16["bare_loop_images_per_s"] > 0
    else:
        assert bf16["skipped"] == "no native bf16 on this hardware"


def test_bench_load_serves_concurrent_clients(trained_model: Path, tiny_data: Path, tmp_path: Path):
    out = tmp_path / "load.json"
    run_script("bench_load.py", "--model", str(trained_model), "--data_dir", str(tiny_data), "--clients", "3",
               "--seconds", "4", "--images", "4", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["failed"] == 0 and report["requests_ok"] > 0, report["failures"]
    # measured for the time asked, from the end of the warm-up, at the rate it reports
    assert report["clients"] == 3 and 4 <= report["seconds"] < 60
    assert report["throughput_per_s"] == pytest.approx(report["requests_ok"] / report["seconds"], rel=0.05)
    # each answer followed by its heatmap, as the UI asks (a client between the two when the warm-up ends
    # has its heatmap counted and not its answer)
    assert report["heatmaps"] is True and 0 <= report["heatmaps_ok"] - report["requests_ok"] <= report["clients"]
    assert report["latency_ms_p50"] > 0 and report["heatmap_ms_p50"] > 0
    assert report["server_rss_mb_after_warmup"] > 100 and report["server_rss_growth"] is not None


def test_the_parity_table_is_the_bundled_record():
    """docs/benchmarks.md's export table says what the bundled model's onnx/parity.json records."""
    parity = json.loads((BUNDLED_MODEL / "onnx" / "parity.json").read_text())
    section = (REPO / "docs" / "benchmarks.md").read_text().split("## ONNX export and parity")[1].split("\n## ")[0]
    rows = {cells[0]: cells[1:] for line in section.splitlines() if line.startswith("| ONNX Runtime")
            for cells in [[c.strip() for c in line.strip().strip("|").split("|")]]}
    assert set(rows) == {"ONNX Runtime fp32", "ONNX Runtime int8"}
    for name, key in (("ONNX Runtime fp32", "onnx"), ("ONNX Runtime int8", "onnx-int8")):
        agreement, difference, accuracy = rows[name]
        record = parity[key]
        assert agreement == f"{100 * record['top1_agreement']:.2f}%"
        decimals = len(difference.split(".")[1])
        assert float(difference) == pytest.approx(record["max_probability_difference"], abs=0.5 * 10 ** -decimals)
        assert accuracy.startswith(f"{100 * record['accuracy']:.2f}%")
    assert (f"PyTorch {100 * parity['torch_accuracy']:.2f}%: {100 * parity['onnx-int8']['accuracy_drop']:.2f} points"
            in rows["ONNX Runtime int8"][2])
    assert f"calibrated on {parity['onnx-int8']['calibration_images']} Training images" in section
    differing = round(parity["num_images"] * (1 - parity["onnx-int8"]["top1_agreement"]))
    assert f"answers {differing} of the {parity['num_images']:,} Testing slices differently" in " ".join(section.split())


def test_benchmark_files_are_named_by_machine_kind():
    from benchlib import output_path

    path = output_path("inference", "128px")
    assert path.parent == REPO / "benchmarks" and path.name == f"inference_128px_{machine_kind()}.json"


def test_bench_app_start_measures_a_fresh_app(trained_model: Path, tiny_data: Path, tmp_path: Path):
    out = tmp_path / "start.json"
    run_script("bench_app_start.py", "--model", str(trained_model), "--data_dir", str(tiny_data), "--runs", "2",
               "--out", str(out))
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert len(runs) == 2
    for run in runs:
        assert run["ready_s"] > 0 and run["first_classify_s"] > 0 and run["rss_mb_ready"] > 100
    # the summary is over both fresh starts: the median of two is their mean
    assert set(report["median"]) == set(runs[0])
    for key, value in report["median"].items():
        assert value == pytest.approx((runs[0][key] + runs[1][key]) / 2)
    first_slice = sorted((tiny_data / "Testing" / CLASSES[0]).iterdir())[0]  # the script's "first Testing slice"
    assert report["image"] == os.path.relpath(first_slice, REPO)


def test_bench_scan_measures_the_cli_the_library_and_the_app(tmp_path: Path):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("nilearn")
    from hf_tumor.checks.external import SOURCES

    img = nib.load(SOURCES["mni152"].path())  # a 2 mm copy keeps the test quick; the benchmark runs at 1 mm
    small = nib.Nifti1Image(img.get_fdata(dtype="float32")[::2, ::2, ::2], img.affine @ [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    nib.save(small, tmp_path / "head.nii.gz")
    out = tmp_path / "scan.json"
    run_script("bench_scan.py", "--volume", str(tmp_path / "head.nii.gz"), "--runs", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["shape"] == list(small.shape) and report["voxel_mm"] == [2.0, 2.0, 2.0]
    slices = report["cli"]["median"]["slices"]
    assert 40 < slices <= small.shape[2]  # the slices through the head, not the empty ones
    assert report["app"]["median"]["slices_per_s"] > 0 and report["app"]["server_peak_rss_mb"] > 100
    assert report["library"]["median"]["classify_s"] > 0 and report["cli"]["median"]["peak_rss_mb"] > 100
    assert report["machine"]["kind"] == machine_kind()


def test_bench_web_measures_the_page(tmp_path: Path):
    import shutil

    if shutil.which("npm") is None or not Path("/usr/bin/chromium").exists():
        pytest.skip("npm and chromium are needed (make system-deps)")
    out = tmp_path / "web.json"
    run_script("bench_web.py", "--images", "6", "--data_dir", str(SHARED_DATA), "--out", str(out))
    report = json.loads(out.read_text())
    assert report["images"] == 6 and report["errors"] == 0
    assert report["first_slice_ms_with_model_load"] > report["first_slice_ms"] > 0 and report["steady_ms_median"] > 0
    assert report["download_mb"] > 20 and "model/model_quantized.onnx" in report["files_bytes"]
