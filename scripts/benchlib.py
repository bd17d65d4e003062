"""Benchmarks behind ``scripts/bench_*.py``, which sit beside this file and import it: medians of repeated
timings, with the machine they ran on.

These measure; they do not assert. The tests only check that they run on a tiny setting. Each script
writes to ``benchmarks/{measure}_{detail}_{machine}.json`` (``output_path``), so figures from one kind of
machine never overwrite another's.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch

from hf_tumor.contract import passed_backends
from hf_tumor.serving.image_io import InputError, read_image
from hf_tumor.serving.inference import Predictor, load_predictor, resolve_model_dir
from hf_tumor.serving.preprocessing import gray_if_neutral
from hf_tumor.training.runtime import cpu_features, cpu_name, hardware_description, machine_kind

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def output_path(measure: str, detail: str) -> Path:
    """Where ``make bench`` writes a measure: named by what it measured and the kind of machine."""
    return BENCHMARKS / f"{measure}_{detail}_{machine_kind()}.json"


def write_report(report: dict[str, Any], out: str | os.PathLike | None, measure: str, detail: str) -> Path:
    """Write a benchmark's JSON to ``out``, or to ``output_path(measure, detail)``; returns the path."""
    path = Path(out) if out else output_path(measure, detail)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def shown(path: str | os.PathLike) -> str:
    """A path as benchmark files record it: relative to the repository where it is a local path (no
    machine's absolute paths in committed files), else as given (a Hub id)."""
    return os.path.relpath(path, REPO) if Path(path).exists() else str(path)


def machine() -> dict[str, Any]:
    """Where and with what a benchmark ran."""
    versions = {}
    for package in ("torch", "timm", "transformers", "onnxruntime", "gradio"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "kind": machine_kind(), "hardware": hardware_description(), "platform": platform.platform(),
        "cpu": cpu_name(), "cpu_features": cpu_features(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "versions": versions,
    }


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median wall time of each function, called in turn (a, b, c, a, b, c, ...).

    Taking turns exposes every function to the same drift in the machine's speed (a shared machine's
    neighbours, clock changes), so that ratios between them hold even when absolute figures wander.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


STORAGE_KINDS = ("gray", "gray-in-rgb", "colour")


def storage_kind(image: PIL.Image.Image) -> str:
    """How a slice is stored, which decides its path through preprocessing: 'gray' (one channel),
    'gray-in-rgb' (three equal channels: resized as one) or 'colour' (resized as three)."""
    if image.mode == "L":
        return "gray"
    return "gray-in-rgb" if gray_if_neutral(image).mode == "L" else "colour"


def first_of_each_kind(root: Path) -> list[Path]:
    """The Testing split's first file of each storage kind, in class-folder order."""
    from hf_tumor.training.data import SPLIT_DIRS, check_layout, image_files

    found: dict[str, Path] = {}
    for name in check_layout(root):
        for path in image_files(root / SPLIT_DIRS["test"] / name):
            found.setdefault(storage_kind(read_image(path)), path)
            if len(found) == len(STORAGE_KINDS):
                return [found[kind] for kind in STORAGE_KINDS]
    return list(found.values())


def inference_benchmark(model: str, images: list[Path], backends: list[str] | None = None, repeats: int = 100,
                        batch_sizes: tuple[int, ...] = (1, 8, 32)) -> dict[str, Any]:
    """Per backend: for each file, bare forward and end-to-end (file -> answer with domain flags) batch-1
    latency with the stages between; and forward throughput at each batch size.

    Files are keyed by ``storage_kind``: each kind takes its own path through decoding and preprocessing.
    """
    backends = backends or ["torch", *passed_backends(model)]
    decoded: dict[str, tuple[Path, Any]] = {}
    for path in images:
        try:
            image = read_image(path)
        except InputError as err:
            raise InputError(f"{path}: {err}") from None
        kind = storage_kind(image)
        if kind in decoded:
            raise ValueError(f"{path} and {decoded[kind][0]} are both {kind}: time one file of each kind "
                             f"({', '.join(STORAGE_KINDS)}) at most.")
        decoded[kind] = (path, image)
    results: dict[str, Any] = {}
    for backend in backends:
        predictor = load_predictor(model, backend)
        entry: dict[str, Any] = {"files": {}, "throughput_images_per_s": {}}
        for kind, (path, image) in decoded.items():
            # one turn-taking run per file, its own forward included: in one long turn for both files,
            # PyTorch's end-to-end timings depended on their position in it by up to 20% (measured)
            x = predictor.preprocess([image])
            stages = {
                "forward": lambda: predictor.forward(x),
                "end_to_end": lambda: predictor.predict_files([path]),
                "read": lambda: read_image(path),
                "preprocess": lambda: predictor.preprocess([image]),
            }
            ms = {name: 1000 * seconds for name, seconds in interleaved_medians(stages, repeats).items()}
            entry["files"][kind] = {"file": shown(path), **{f"{stage}_ms": round(value, 3) for stage, value in ms.items()},
                                    "end_to_end_over_forward": round(ms["end_to_end"] / ms["forward"], 3)}
        for batch_size in batch_sizes:
            batch = np.repeat(x, batch_size, axis=0)
            seconds = interleaved_medians({"batch": lambda: predictor.forward(batch)}, max(3, repeats // batch_size), warmup=1)["batch"]
            entry["throughput_images_per_s"][str(batch_size)] = round(batch_size / seconds, 1)
        results[backend] = entry
    return {"model": shown(model), "repeats": repeats, "machine": machine(), "backends": results}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str, port: int, timeout: float = 300) -> tuple[subprocess.Popen, float]:
    """``python space/app.py`` serving ``model`` on 127.0.0.1:``port``; returns it and the seconds until
    it answered HTTP."""
    env = dict(os.environ, HF_TUMOR_MODEL=model, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1",
               GRADIO_ANALYTICS_ENABLED="False")
    # its log goes to a file, not a pipe: a pipe nobody reads fills up during a long load test and
    # blocks the server
    log = tempfile.TemporaryFile(mode="w+")
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, str(REPO / "space" / "app.py")], env=env,
                              stdout=subprocess.DEVNULL, stderr=log, text=True)
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the app exited with code {server.returncode} before serving: {log.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return server, time.perf_counter() - start
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"the app did not answer on port {port} within {timeout:.0f} s")


def app_start_benchmark(model: str, image: Path, runs: int = 3) -> dict[str, Any]:
    """Seconds from launch until the app answers HTTP, its resident memory then, and after a first /classify."""
    import psutil
    from gradio_client import Client, handle_file

    results = []
    for _ in range(runs):
        port = free_port()
        server, ready = start_app(model, port)
        try:
            process = psutil.Process(server.pid)
            rss_ready = process.memory_info().rss
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            start = time.perf_counter()
            client.predict(handle_file(str(image)), api_name="/classify")
            first = time.perf_counter() - start
            rss_after = process.memory_info().rss
        finally:
            server.terminate()
            server.wait(timeout=30)
        results.append({"ready_s": round(ready, 2), "first_classify_s": round(first, 3),
                        "rss_mb_ready": round(rss_ready / 2**20), "rss_mb_after_first_request": round(rss_after / 2**20)})
    medians = {key: statistics.median(r[key] for r in results) for key in results[0]}
    return {"model": shown(model), "image": shown(image), "runs": results, "median": medians, "machine": machine()}


def load_test(url: str, images: list[Path], clients: int = 16, seconds: float = 60.0,
              server_pid: int | None = None, heatmaps: bool = True) -> dict[str, Any]:
    """``clients`` concurrent gradio_client users calling ``/classify`` on ``url`` for ``seconds``, each
    then asking ``/explain`` for the heatmap (as the UI does) when ``heatmaps``.

    Reports requests, failures (a full queue's rejections counted apart), latency p50/p95 of the
    answer (label and probabilities) and of the heatmap after it, answers per second, and the
    server's resident memory after warm-up and at the end.
    """
    import threading

    import psutil
    from gradio_client import Client, handle_file

    server = psutil.Process(server_pid) if server_pid else None
    latencies: list[float] = []
    heatmap_latencies: list[float] = []
    rejected, failures = 0, []
    lock = threading.Lock()
    warm = threading.Barrier(clients + 1)  # memory baseline: once every client has had one answer
    deadline: list[float] = []

    def user(index: int) -> None:
        nonlocal rejected
        try:
            client = Client(url, verbose=False)
        except Exception as err:  # a client that cannot connect still releases the warm-up barrier
            with lock:
                failures.append(f"connect: {type(err).__name__}: {str(err)[:200]}")
            warm.wait()
            return
        first = True
        while first or time.monotonic() < deadline[0]:
            image = images[(index + len(latencies)) % len(images)]
            start = time.perf_counter()
            try:
                client.predict(handle_file(str(image)), api_name="/classify")
                with lock:
                    latencies.append(time.perf_counter() - start)
                if heatmaps:
                    start = time.perf_counter()
                    client.predict(handle_file(str(image)), 0.45, api_name="/explain")
                    with lock:
                        heatmap_latencies.append(time.perf_counter() - start)
            except Exception as err:  # counted and reported: the point of the test
                with lock:
                    if "queue is full" in str(err).lower():
                        rejected += 1
                    else:
                        failures.append(f"{type(err).__name__}: {str(err)[:200]}")
            if first:
                first = False
                warm.wait()

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(clients)]
    deadline.append(time.monotonic() + 3600)  # the real deadline is set after warm-up
    for thread in threads:
        thread.start()
    warm.wait()
    rss_start = server.memory_info().rss if server else None
    latencies.clear()  # warm-up requests are not measured
    heatmap_latencies.clear()
    start = time.monotonic()
    deadline[0] = start + seconds
    rss_peak = rss_start or 0
    while any(t.is_alive() for t in threads):
        if server:
            rss_peak = max(rss_peak, server.memory_info().rss)
        time.sleep(0.5)
    elapsed = time.monotonic() - start
    rss_end = server.memory_info().rss if server else None
    ms = sorted(1000 * x for x in latencies)
    heat_ms = sorted(1000 * x for x in heatmap_latencies)

    def percentile(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(values, q)), 1) if values else None

    return {
        "url": url, "clients": clients, "seconds": round(elapsed, 1), "requests_ok": len(ms),
        "rejected_queue_full": rejected, "failed": len(failures), "failures": failures[:10],
        "latency_ms_p50": percentile(ms, 50), "latency_ms_p95": percentile(ms, 95),
        "throughput_per_s": round(len(ms) / elapsed, 2),
        "heatmaps": heatmaps, "heatmaps_ok": len(heat_ms),
        "heatmap_ms_p50": percentile(heat_ms, 50), "heatmap_ms_p95": percentile(heat_ms, 95),
        "server_rss_mb_after_warmup": round(rss_start / 2**20, 1) if rss_start else None,
        "server_rss_mb_peak": round(rss_peak / 2**20, 1) if server else None,
        "server_rss_mb_end": round(rss_end / 2**20, 1) if rss_end else None,
        "server_rss_growth": round(rss_end / rss_start - 1, 4) if rss_start else None,
        "machine": machine(),
    }


def non_mri_images(seed: int = 0) -> dict[str, PIL.Image.Image]:
    """Images that are not brain MRI slices, all available offline: scikit-learn's sample photos,
    synthetic documents, noise, blank and colour images. Used to measure the domain check."""
    from PIL import ImageDraw
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    images = {name: PIL.Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")}
    for name in ("china.jpg", "flower.jpg"):
        images[f"gray {name}"] = images[name].convert("L")
    for i in range(3):
        page = PIL.Image.new("L", (420, 560), 255)
        draw = ImageDraw.Draw(page)
        for line in range(25):
            draw.text((24, 20 + 21 * line), " ".join("lorem ipsum dolor" for _ in range(rng.integers(1, 4))), fill=0)
        images[f"document {i}"] = page
        images[f"gray noise {i}"] = PIL.Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8))
        images[f"colour noise {i}"] = PIL.Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    images["blank white"] = PIL.Image.new("RGB", (256, 256), (255, 255, 255))
    images["blank black"] = PIL.Image.new("RGB", (256, 256), (0, 0, 0))
    gradient = np.linspace(0, 255, 256, dtype=np.uint8)
    red, green = np.meshgrid(gradient, gradient)
    images["colour gradient"] = PIL.Image.fromarray(np.stack([red, green, 255 - red], -1))
    return images


def ood_report(predictor: Predictor, mri_paths: list[str]) -> dict[str, Any]:
    """Share of real MRI slices wrongly flagged, and of non-MRI images caught, by the domain check."""
    flagged = [bool(p.flags) for p in predictor.predict_files(mri_paths)]
    images = non_mri_images()
    caught = {name: bool(p.flags) for name, p in zip(images, predictor.predict([im.convert("RGB") for im in images.values()]))}
    return {
        "model": shown(predictor.source), "backend": predictor.backend,
        "mri_images": len(mri_paths),
        "mri_wrongly_flagged": float(np.mean(flagged)) if flagged else None,
        "non_mri_images": len(caught),
        "non_mri_caught": float(np.mean(list(caught.values()))),
        "non_mri_missed": sorted(name for name, hit in caught.items() if not hit),
        "energy_threshold": predictor.domain.energy_limit,
        "machine": machine(),
    }


def _peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory so far (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def scan_benchmark(model: str, volume: Path, plane: str = "axial", runs: int = 3) -> dict[str, Any]:
    """A whole scan, three ways: ``hf-tumor predict`` as a fresh process (wall time, peak memory); reading
    and classifying in one process (the library's share); and the app's Whole scan endpoints over HTTP
    (read, classify, one slice with its heatmap; the server's peak memory)."""
    from gradio_client import Client, handle_file

    from hf_tumor.serving.scan import load_scan, predict_scan

    # the CLI's own main() in a fresh process that reports its peak memory on the way out
    code = ("import sys; from hf_tumor.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)\n"
            "sys.exit(rc)")
    command = [sys.executable, "-c", code, "predict", str(volume), "--model", model, "--plane", plane, "--json"]
    cli = []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - start
        if out.returncode:
            raise RuntimeError(f"hf-tumor predict failed: {out.stderr[-2000:]}")
        slices = sum('"index"' in line for line in out.stdout.splitlines())
        cli.append({"wall_s": round(wall, 2), "slices": slices, "slices_per_s": round(slices / wall, 1),
                    "peak_rss_mb": round(int(out.stderr.split()[-1]) / 1024)})

    predictor = load_predictor(model)
    library = []
    for _ in range(runs):
        start = time.perf_counter()
        loaded = load_scan(volume)
        read = time.perf_counter() - start
        result = predict_scan(predictor, loaded, plane)
        total = time.perf_counter() - start
        library.append({"read_s": round(read, 3), "classify_s": round(total - read, 3),
                        "slices_per_s": round(len(result.slices) / (total - read), 1)})

    port = free_port()
    server, _ = start_app(model, port)
    app = []
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for _ in range(runs):
            start = time.perf_counter()
            client.predict([handle_file(str(volume))], api_name="/read_scan")
            read = time.perf_counter() - start
            _summary, _curve, slider, _csv = client.predict(plane, api_name="/classify_scan")
            classify = time.perf_counter() - start - read
            shown_start = time.perf_counter()
            client.predict(slider["value"], 0.45, api_name="/show_slice")
            app.append({"upload_and_read_s": round(read, 2), "classify_s": round(classify, 2),
                        "slices_per_s": round((slider["maximum"] - slider["minimum"] + 1) / classify, 1),
                        "slice_with_heatmap_s": round(time.perf_counter() - shown_start, 2)})
        app_peak = round(_peak_rss_mb(server.pid))
    finally:
        server.terminate()
        server.wait(timeout=30)
    median = lambda rows: {key: statistics.median(r[key] for r in rows) for key in rows[0]}  # noqa: E731
    return {"model": shown(model), "backend": predictor.backend, "volume": shown(volume), "plane": plane,
            "shape": list(loaded.data.shape), "voxel_mm": list(loaded.zooms),
            "cli": {"runs": cli, "median": median(cli)}, "library": {"runs": library, "median": median(library)},
            "app": {"runs": app, "median": median(app), "server_peak_rss_mb": app_peak}, "machine": machine()}


def web_benchmark(model: str, images: list[Path]) -> dict[str, Any]:
    """The in-browser page in headless Chromium: its download size, the model's load, the first slice
    (load included) and the steady per-slice latency, on ``images`` dropped on the page at once."""
    from hf_tumor.training.web import build_web, serve

    with tempfile.TemporaryDirectory(prefix="hf-tumor-web-") as tmp:
        files = build_web(tmp, Path(model))
        server = serve(tmp, port=0)
        try:
            state = classify_in_browser(f"http://127.0.0.1:{server.server_address[1]}/", images)
        finally:
            server.shutdown()
        sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in files}
    slices = state["timings"]["slices"]
    load = state["timings"]["modelLoadMs"]
    return {"model": shown(model), "images": len(images), "download_mb": round(sum(sizes.values()) / 1e6, 1),
            "files_bytes": sizes, "threads": state["threads"], "cross_origin_isolated": state["isolated"],
            "model_load_ms": round(load), "first_slice_ms_with_model_load": round(load + slices[0]),
            "first_slice_ms": round(slices[0]), "steady_ms_median": round(statistics.median(slices[1:]), 1),
            "steady_ms_p95": round(float(np.percentile(slices[1:], 95)), 1), "errors": sum("error" in r for r in state["results"]),
            "machine": machine()}


def classify_in_browser(url: str, files: list[Path], chromium: str = "/usr/bin/chromium",
                        timeout_s: float = 600) -> dict:
    """Open the served page in headless Chromium (Playwright), drop ``files`` on it as a user would, and
    return what it answered (``results``), its timings, whether it was cross-origin isolated, and every
    URL it requested."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(url, wait_until="load")
            page.wait_for_function("window.hfTumor && window.hfTumor.ready", timeout=timeout_s * 1000)
            page.locator("#files").set_input_files([str(f) for f in files])
            page.wait_for_function(f"window.hfTumor.results.length >= {len(files)}", timeout=timeout_s * 1000)
            state = page.evaluate("({results: window.hfTumor.results, timings: window.hfTumor.timings, "
                                  "threads: window.hfTumor.threads, isolated: self.crossOriginIsolated, "
                                  "table_rows: document.querySelectorAll('#results tbody tr').length})")
        finally:
            browser.close()
    return state | {"requested": requested}


class _PeakRSS:
    """Peak resident memory of this process while the ``with`` block runs (sampled every 20 ms)."""

    def __enter__(self) -> "_PeakRSS":
        import threading

        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.02)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _train_view(data_dir: Path, image_size: int, model_name: str):
    """The training split's view exactly as training builds it (cached resize, augmentation, to tensor)."""
    from hf_tumor.serving.preprocessing import make_pretrained_cfg
    from hf_tumor.training.augment import AugmentConfig
    from hf_tumor.training.data import attach_transforms, cache_resized, load_image_folder

    cfg = make_pretrained_cfg(model_name, image_size)
    return attach_transforms(cache_resized(load_image_folder(data_dir)["train"], cfg, "train"), cfg, AugmentConfig())


def train_benchmark(data_dir: str | os.PathLike, image_size: int, precision: str, batch_size: int = 32,
                    steps: int = 5, warmup: int = 2, model_name: str = "resnetv2_50") -> dict[str, Any]:
    """Images/s and peak memory of (a) the data loader alone, (b) the bare loop's step (`scripts/train_bare.py`) and (c)
    the Trainer on the same model, size, batch and precision, in this one process."""
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from train_bare import train_step  # scripts/train_bare.py, beside this file
    from hf_tumor.serving.model import create_model
    from hf_tumor.training.data import collate, resolve_data_dir
    from hf_tumor.training.train import TRAINING_DEFAULTS

    view = _train_view(resolve_data_dir(data_dir), image_size, model_name)
    workers = TRAINING_DEFAULTS["dataloader_num_workers"]
    total = warmup + steps
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = precision == "bf16"

    loader = DataLoader(view, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate)
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    start = time.perf_counter()
    kept = [next(batches) for _ in range(total)]
    loader_ips = total * batch_size / (time.perf_counter() - start)

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return create_model(model_name, ["a", "b", "c", "d"], image_size, "scratch").to(device).to(memory_format=torch.channels_last)

    model = fresh_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    times = []
    with _PeakRSS() as bare_memory:
        for batch in kept:
            t0 = time.perf_counter()
            train_step(model, optimizer, batch, torch.device(device), bf16)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    bare_ips = steps * batch_size / sum(times[warmup:])
    del model, optimizer

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())

    stamps = StepTimes()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=total, per_device_train_batch_size=batch_size, learning_rate=1e-3,
            bf16=bf16, save_strategy="no", eval_strategy="no", report_to="none", logging_strategy="no",
            remove_unused_columns=False, dataloader_num_workers=workers, disable_tqdm=True, use_cpu=device == "cpu",
        )
        trainer = Trainer(model=fresh_model(), args=args, train_dataset=view, data_collator=collate, callbacks=[stamps])
        with _PeakRSS() as trainer_memory:
            trainer.train()
    trainer_ips = steps * batch_size / (stamps.stamps[-1] - stamps.stamps[warmup - 1])
    return {
        "image_size": image_size, "precision": precision, "batch_size": batch_size, "timed_steps": steps,
        "device": device, "loader_workers": workers,
        "loader_images_per_s": round(loader_ips, 1),
        "bare_loop_images_per_s": round(bare_ips, 2),
        "trainer_images_per_s": round(trainer_ips, 2),
        "trainer_over_bare": round(trainer_ips / bare_ips, 3),
        "loader_over_model": round(loader_ips / bare_ips, 2),
        "bare_loop_peak_rss_mb": round(bare_memory.peak / 2**20),
        "trainer_peak_rss_mb": round(trainer_memory.peak / 2**20),
    }


# what a fresh process reports on its way out: where hf_tumor came from, which heavy libraries it imported,
# its peak memory
_CLI_WRAPPER = """import sys
from hf_tumor.cli import main
rc = main(sys.argv[1:])
import hf_tumor
print('HF_TUMOR_FROM', hf_tumor.__file__, file=sys.stderr)
print('HEAVY_IMPORTED', ','.join(m for m in ('torch', 'timm', 'transformers', 'torchvision') if m in sys.modules), file=sys.stderr)
print('VMHWM_KB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)
sys.exit(rc)
"""

# the least any program can do for one slice: PIL reads, resizes and normalises as the config says, the int8
# file answers; no hf_tumor, no domain check
_BARE_ONNX = """import json, sys
import numpy as np, onnxruntime as ort, PIL.Image
model_dir, image_path = sys.argv[1:3]
cfg = json.load(open(model_dir + '/config.json'))['pretrained_cfg']
size = int(cfg['input_size'][-1])
image = PIL.Image.open(image_path).convert('RGB').resize((size, size), PIL.Image.BILINEAR)
mean, std = (np.asarray(cfg[k], np.float32).reshape(3, 1, 1) for k in ('mean', 'std'))
x = (np.asarray(image, np.float32).transpose(2, 0, 1) / np.float32(255) - mean) / std
session = ort.InferenceSession(model_dir + '/onnx/model_quantized.onnx', providers=['CPUExecutionProvider'])
logits = session.run(None, {'pixel_values': x[None]})[0][0].astype(np.float64)
p = np.exp(logits - logits.max())
print(json.dumps((p / p.sum()).tolist()))
print('HEAVY_IMPORTED', ','.join(m for m in ('torch', 'timm', 'transformers', 'torchvision') if m in sys.modules), file=sys.stderr)
print('VMHWM_KB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)
"""
_REPORTS = ("HF_TUMOR_FROM ", "HEAVY_IMPORTED ", "VMHWM_KB ")


def _timed_process(command: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> dict[str, Any]:
    """Run ``command`` to its end: wall seconds from launch to exit, stdout, stderr, and what the process said
    of itself on stderr: its peak resident memory (VmHWM; the parent's ru_maxrss of a child counts the forked
    copy of this process, torch and all) and which heavy libraries it had imported."""
    start = time.perf_counter()
    process = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if process.returncode:
        raise RuntimeError(f"{' '.join(command[3:6])} exited with {process.returncode}: {process.stderr[-2000:]}")
    said = dict(line.split(" ", 1) for line in process.stderr.splitlines() if line.startswith(_REPORTS))
    return {"wall_s": wall, "peak_rss_mb": int(said["VMHWM_KB"]) / 1024,
            "heavy_imported": [m for m in said["HEAVY_IMPORTED"].split(",") if m], "from": said.get("HF_TUMOR_FROM"),
            "stdout": process.stdout}


def predict_start_benchmark(model: str, image: Path, volume: Path, runs: int = 5,
                            before: str | os.PathLike | None = None) -> dict[str, Any]:
    """``hf-tumor predict`` with the int8 backend as a fresh process, on one slice and on a whole head, beside
    a bare ONNX Runtime script on the same slice and file: wall time, peak memory and whether PyTorch (or
    timm, transformers, torchvision) was imported. With ``before`` (a checkout of older code) its CLI is run
    too, taking turns with this one's, so that both meet the same drift in the machine's speed."""
    codes = {"after": REPO} if before is None else {"before": Path(before).resolve(), "after": REPO}
    model_dir, image, volume = resolve_model_dir(model), Path(image).resolve(), Path(volume).resolve()
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    cli_args = ["--model", str(model_dir), "--backend", "onnx-int8", "--json"]
    measured: dict[str, dict[str, list[dict[str, Any]]]] = {name: {"image": [], "scan": []} for name in codes}
    bare: list[dict[str, Any]] = []
    origin: dict[str, str] = {}
    for _ in range(runs):
        bare.append(_timed_process([sys.executable, "-c", _BARE_ONNX, str(model_dir), str(image)], base_env, REPO))
        for name, root in codes.items():
            env = base_env | {"PYTHONPATH": str(root)}  # and run in root: `python -c` puts the cwd first
            for what, target in (("image", image), ("scan", volume)):
                run = _timed_process([sys.executable, "-c", _CLI_WRAPPER, "predict", str(target), *cli_args], env, root)
                origin[name] = run["from"]
                measured[name][what].append(run)
    for name, root in codes.items():  # the code measured must be the code named, not an installed copy
        if not Path(origin[name]).resolve().is_relative_to(root):
            raise RuntimeError(f"the {name} runs imported hf_tumor from {origin[name]}, not from {root}")

    bare_probs = np.asarray(json.loads(bare[0]["stdout"]))

    def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
        shown_rows = [{"wall_s": round(r["wall_s"], 3), "peak_rss_mb": round(r["peak_rss_mb"]),
                       "heavy_imported": r["heavy_imported"]} for r in rows]
        return {"runs": shown_rows, "median": {"wall_s": round(statistics.median(r["wall_s"] for r in rows), 3),
                                               "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rows))},
                "torch_imported": any("torch" in r["heavy_imported"] for r in rows)}

    report: dict[str, Any] = {
        "what": f"fresh processes, {runs} runs each, taken in turns: `hf-tumor predict FILE --backend onnx-int8 --json` "
                "on one slice and on a whole head volume, and a bare ONNX Runtime script on the same slice (PIL "
                "resize and normalisation per the model's config, the same int8 file, nothing else); wall time "
                "from launch to exit, the process's peak resident memory (VmHWM)",
        "model": shown(model_dir), "image": shown(image), "volume": shown(volume), "runs": runs,
        "bare_onnxruntime": summarise(bare),
    }
    for name, root in codes.items():
        image_runs = measured[name]["image"]
        answer = json.loads(image_runs[0]["stdout"].splitlines()[0])
        probs = np.asarray([answer["probabilities"][c] for c in answer["probabilities"]])
        slices = sum('"index"' in line for line in measured[name]["scan"][0]["stdout"].splitlines())
        entry = {"code": _commit_of(root), "image": summarise(image_runs),
                 "scan": summarise(measured[name]["scan"]) | {"slices": slices},
                 "image_answer": answer["label"],
                 "image_max_probability_difference_from_bare": float(np.abs(probs - bare_probs).max())}
        entry["image_wall_over_bare"] = round(entry["image"]["median"]["wall_s"] /
                                              report["bare_onnxruntime"]["median"]["wall_s"], 2)
        report[name] = entry
    return report | {"machine": machine()}


def _commit_of(root: Path) -> str:
    """The short commit a checkout is at (with '+changes' where its tree differs from it), else its path."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(root)
    return f"commit {commit}" + ("+changes" if dirty else "")
