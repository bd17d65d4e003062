"""Load test: N concurrent HTTP API clients against the app started on 127.0.0.1 (loopback only).

python scripts/bench_load.py [--model DIR] [--clients 16] [--seconds 60] [--out FILE]

Starts `space/app.py` on a free local port with the given model, waits for it, runs the clients,
stops the server, and writes latency p50/p95, throughput, failures and the server's memory growth.
"""

import argparse
import json
import sys

from benchlib import free_port, load_test, shown, start_app, write_report
from hf_tumor.serving.inference import default_model
from hf_tumor.training.data import SPLIT_DIRS, check_layout, image_files, resolve_data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Model folder or Hub id (default: the bundled model).")
    parser.add_argument("--data_dir", help="Kaggle folder whose Testing slices are sent (default: $HF_TUMOR_DATA).")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--images", type=int, default=32, help="Distinct test slices to cycle through.")
    parser.add_argument("--no_heatmaps", action="store_true", help="Ask for answers only, not the heatmap after each.")
    parser.add_argument("--out", help="Output JSON (default: benchmarks/load_{clients}x{seconds}s_{machine}.json).")
    args = parser.parse_args()
    root = resolve_data_dir(args.data_dir)
    test = root / SPLIT_DIRS["test"]
    images = [p for c in check_layout(root) for p in image_files(test / c)[: max(1, args.images // 4)]]
    model = args.model or default_model()
    port = free_port()
    try:
        server, _ = start_app(model, port)
    except RuntimeError as err:
        sys.exit(str(err))
    try:
        report = load_test(f"http://127.0.0.1:{port}/", images, args.clients, args.seconds, server.pid,
                           heatmaps=not args.no_heatmaps)
    finally:
        server.terminate()
        server.wait(timeout=30)
    report["model"] = shown(model)
    out = write_report(report, args.out, "load", f"{args.clients}x{args.seconds:.0f}s")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    print(f"wrote {out}")
    sys.exit(1 if report["failed"] else 0)


if __name__ == "__main__":
    main()
