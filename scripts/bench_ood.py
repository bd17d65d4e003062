"""Measure the app's "not an MRI slice" check: real test slices wrongly flagged, non-MRI images caught.

python scripts/bench_ood.py [--model DIR] [--data_dir DIR] [--out benchmarks/ood.json] [--stride N]
"""

import argparse
import json
import platform
from pathlib import Path

from hf_tumor.app import Classifier, ood_report
from hf_tumor.data import SPLIT_DIRS, check_layout, image_files, resolve_data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="Model folder or Hub id (default: the bundled model).")
    parser.add_argument("--data_dir", help="Kaggle folder (default: $HF_TUMOR_DATA).")
    parser.add_argument("--out", default="benchmarks/ood.json")
    parser.add_argument("--stride", type=int, default=1, help="Use every N-th test slice (1: all 1,311).")
    args = parser.parse_args()
    root = resolve_data_dir(args.data_dir)
    paths = [str(p) for c in check_layout(root) for p in image_files(root / SPLIT_DIRS["test"] / c)][:: args.stride]
    classifier = Classifier(args.model)
    report = {"model": classifier.source, "machine": platform.platform(), **ood_report(classifier, paths)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
