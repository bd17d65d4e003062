"""The model in the browser: assemble the static page of ``web/`` with its runtime and a model, and serve it.

The page (``web/index.html``, ``app.js``, ``preprocess.js``) runs the int8 ONNX file with ONNX Runtime
Web. Its runtime comes from the npm registry at build time (``web/package-lock.json`` pins it, with
its checksum), never from a CDN, so the assembled folder holds everything the page loads and the page
asks no origin but its own. WASM threads need cross-origin isolation, which :func:`serve` provides and the
static Space's ``custom_headers`` ask for; where a page is not isolated (inside an iframe that is not),
it runs on one thread.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from hf_tumor.contract import CONFIG_FILE, ONNX_DIR, ONNX_FILES, passed_backends
from hf_tumor.errors import UserError

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
PAGE_FILES = ("index.html", "app.js", "preprocess.js")
RUNTIME_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
PAGE_RESAMPLING = ("bilinear", "bicubic")  # the resamplers preprocess.js ports from Pillow
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


class WebBuildError(UserError, RuntimeError):
    """The page cannot be assembled; the message says what is missing."""


def runtime_dir(web_dir: Path = WEB_DIR) -> Path:
    """ONNX Runtime Web's ``dist`` folder, installed from the npm registry by ``npm ci`` (lock file pinned)."""
    dist = web_dir / "node_modules" / "onnxruntime-web" / "dist"
    locked = json.loads((web_dir / "package-lock.json").read_text())["packages"]["node_modules/onnxruntime-web"]["version"]
    installed = dist.parent / "package.json"
    if not installed.is_file() or json.loads(installed.read_text())["version"] != locked:
        npm = shutil.which("npm")
        if npm is None:
            raise WebBuildError("npm is needed to fetch ONNX Runtime Web from the npm registry: install Node.js "
                                "(apt-get install nodejs npm)")
        # --ignore-scripts: the page needs the package's files, not its install hooks
        try:
            result = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=web_dir,
                                    capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise WebBuildError("npm ci took over 15 minutes: is the npm registry reachable?") from None
        if result.returncode:
            raise WebBuildError(f"npm ci failed in {web_dir}: {result.stderr.strip()[-1500:]}")
    return dist


def build_web(dest: str | os.PathLike, model_dir: str | os.PathLike, web_dir: Path = WEB_DIR) -> list[Path]:
    """Assemble the page in ``dest``: its files, the runtime, and ``model/`` (config and the int8 file,
    which must have passed its parity check). Returns the files written."""
    model_dir, dest = Path(model_dir), Path(dest)
    cfg = json.loads((model_dir / CONFIG_FILE).read_text()).get("pretrained_cfg", {})
    if cfg.get("crop_pct", 1.0) != 1.0 or cfg.get("crop_mode", "squash") != "squash" or cfg.get("interpolation") not in PAGE_RESAMPLING:
        raise WebBuildError(f"the page preprocesses a squash resize with {' or '.join(PAGE_RESAMPLING)} resampling "
                            f"and no crop; {model_dir}'s pretrained_cfg asks for {cfg}")
    if "onnx-int8" not in passed_backends(model_dir):
        raise WebBuildError(f"{model_dir} has no int8 ONNX file that passed its parity check: run "
                            f"`hf-tumor export --model {model_dir} --quantize int8` first")
    dist = runtime_dir(web_dir)
    sources = {name: web_dir / name for name in PAGE_FILES} | {name: dist / name for name in RUNTIME_FILES}
    int8 = ONNX_FILES["onnx-int8"]
    sources |= {f"model/{CONFIG_FILE}": model_dir / CONFIG_FILE, f"model/{int8}": model_dir / ONNX_DIR / int8}
    written = []
    for name, source in sources.items():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(target)
    return written


class _Handler(SimpleHTTPRequestHandler):
    """Static files with the cross-origin isolation headers (threads in WASM) and no request log."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript", ".wasm": "application/wasm"}

    def end_headers(self) -> None:
        for key, value in ISOLATION_HEADERS.items():
            self.send_header(key, value)
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, *args) -> None:
        pass


def serve(directory: str | os.PathLike, port: int = 8000, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve ``directory`` on host:port in a background thread, cross-origin isolated; ``.shutdown()`` stops it."""
    server = ThreadingHTTPServer((host, port), functools.partial(_Handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
