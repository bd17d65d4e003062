"""The model in the browser: the page's download size, model load, first slice and steady per-slice latency in
headless Chromium (ONNX Runtime Web, int8, WASM threads), on Testing slices.

python scripts/bench_web.py [--model DIR] [--data_dir DIR] [--images 100] [--out FILE]
"""

import argparse
import itertools
import json
import sys

from benchlib import web_benchmark, write_report
from hf_tumor.errors import UserError
from hf_tumor.serving.inference import default_model, resolve_model_dir
from hf_tumor.training.data import SPLIT_DIRS, check_layout, image_files, resolve_data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Model folder or Hub id (default: the bundled model).")
    parser.add_argument("--data_dir", help="Kaggle folder (default: $HF_TUMOR_DATA).")
    parser.add_argument("--images", type=int, default=100, help="Testing slices, taken in turn from each class.")
    parser.add_argument("--out", help="Output JSON (default: benchmarks/web_int8_{machine}.json).")
    args = parser.parse_args()
    try:
        root = resolve_data_dir(args.data_dir)
        per_class = [image_files(root / SPLIT_DIRS["test"] / name) for name in check_layout(root)]
        # in turn from each class, as long as any has slices left
        images = [f for row in itertools.zip_longest(*per_class) for f in row if f is not None][: args.images]
        report = web_benchmark(str(resolve_model_dir(args.model or default_model())), images)
    except UserError as err:
        sys.exit(str(err))
    out = write_report(report, args.out, "web", "int8")
    print(json.dumps({k: v for k, v in report.items() if k not in ("files_bytes", "machine")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
