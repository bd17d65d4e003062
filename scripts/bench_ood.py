"""Measure the domain check: real test slices wrongly flagged, non-MRI images caught.

python scripts/bench_ood.py [--model DIR] [--data_dir DIR] [--stride N] [--out FILE]
"""

import argparse
import json

from benchlib import ood_report, write_report
from hf_tumor.serving.inference import load_predictor
from hf_tumor.serving.inference import default_model
from hf_tumor.training.data import SPLIT_DIRS, check_layout, image_files, resolve_data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="Model folder or Hub id (default: the bundled model).")
    parser.add_argument("--data_dir", help="Kaggle folder (default: $HF_TUMOR_DATA).")
    parser.add_argument("--stride", type=int, default=1, help="Use every N-th test slice (1: all 1,311).")
    parser.add_argument("--out", help="Output JSON (default: benchmarks/ood_{size}px_{backend}_{machine}.json).")
    args = parser.parse_args()
    root = resolve_data_dir(args.data_dir)
    paths = [str(p) for c in check_layout(root) for p in image_files(root / SPLIT_DIRS["test"] / c)][:: args.stride]
    predictor = load_predictor(args.model or default_model())
    report = ood_report(predictor, paths)
    size = predictor.config.pretrained_cfg["input_size"][-1]
    out = write_report(report, args.out, "ood", f"{size}px_{predictor.backend}")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
