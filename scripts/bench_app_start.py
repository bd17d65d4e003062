"""The app's start: seconds until `space/app.py` answers HTTP, and its resident memory then and after a
first /classify (each run a fresh process on 127.0.0.1).

python scripts/bench_app_start.py [--model DIR] [--runs 3] [--out FILE]
"""

import argparse
import json
import sys

from benchlib import app_start_benchmark, write_report
from hf_tumor.serving.inference import default_model
from hf_tumor.training.data import SPLIT_DIRS, check_layout, image_files, resolve_data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Model folder or Hub id (default: the bundled model).")
    parser.add_argument("--data_dir", help="Kaggle folder; its first Testing slice is classified (default: $HF_TUMOR_DATA).")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", help="Output JSON (default: benchmarks/app_start_{machine}.json).")
    args = parser.parse_args()
    root = resolve_data_dir(args.data_dir)
    image = image_files(root / SPLIT_DIRS["test"] / check_layout(root)[0])[0]
    try:
        report = app_start_benchmark(args.model or default_model(), image, args.runs)
    except RuntimeError as err:
        sys.exit(str(err))
    out = write_report(report, args.out, "app", "start")
    print(json.dumps(report["median"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
