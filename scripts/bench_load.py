"""Load test: N concurrent HTTP API clients against the Space started on 127.0.0.1 (loopback only).

python scripts/bench_load.py [--model DIR] [--clients 16] [--seconds 60] [--out benchmarks/load.json]

Starts `space/app.py` on a free local port with the given model, waits for it, runs the clients,
stops the server, and writes latency p50/p95, throughput, failures and the server's memory growth.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from hf_tumor.benchmark import load_test
from hf_tumor.data import SPLIT_DIRS, check_layout, image_files, resolve_data_dir
from hf_tumor.model import default_model

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_space(model: str, port: int, timeout: float = 300) -> subprocess.Popen:
    """`python space/app.py` serving ``model`` on 127.0.0.1:``port``, once it answers HTTP."""
    env = dict(os.environ, HF_TUMOR_MODEL=model, HF_TUMOR_PORT=str(port), HF_TUMOR_HOST="127.0.0.1")
    server = subprocess.Popen([sys.executable, str(REPO / "space" / "app.py")], env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the Space exited with code {server.returncode} before serving")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    sys.exit(f"the Space did not answer on port {port} within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Model folder or Hub id (default: the bundled model).")
    parser.add_argument("--data_dir", help="Kaggle folder whose Testing slices are sent (default: $HF_TUMOR_DATA).")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--images", type=int, default=32, help="Distinct test slices to cycle through.")
    parser.add_argument("--out", default="benchmarks/load.json")
    args = parser.parse_args()
    root = resolve_data_dir(args.data_dir)
    test = root / SPLIT_DIRS["test"]
    images = [p for c in check_layout(root) for p in image_files(test / c)[: max(1, args.images // 4)]]
    port = free_port()
    server = start_space(args.model or default_model(), port)
    try:
        report = load_test(f"http://127.0.0.1:{port}/", images, args.clients, args.seconds, server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    report["model"] = args.model or default_model()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    print(f"wrote {args.out}")
    sys.exit(1 if report["failed"] else 0)


if __name__ == "__main__":
    main()
