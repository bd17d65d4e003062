"""Inference latency and throughput per backend (PyTorch, ONNX Runtime fp32, ONNX Runtime int8).

python scripts/bench_inference.py [--model DIR] [--image FILE] [--repeats 100] [--out benchmarks/inference.json]

Run it on an idle machine: it measures wall time. Backends other than torch are those whose
parity check passed (`hf-tumor export --model DIR --quantize int8`).
"""

import argparse
import json
from pathlib import Path

from hf_tumor.benchmark import inference_benchmark
from hf_tumor.data import SPLIT_DIRS, check_layout, image_files, resolve_data_dir
from hf_tumor.model import default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Local model folder (default: the bundled model).")
    parser.add_argument("--image", help="A JPEG slice (default: the first glioma slice of the Testing split).")
    parser.add_argument("--data_dir", help="Kaggle folder for the default image (default: $HF_TUMOR_DATA).")
    parser.add_argument("--backends", nargs="+", help="Subset of torch, onnx, onnx-int8 (default: all usable).")
    parser.add_argument("--repeats", type=int, default=100, help="Timed calls of each stage, taken in turns.")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", default="benchmarks/inference.json")
    args = parser.parse_args()
    image = Path(args.image) if args.image else None
    if image is None:
        root = resolve_data_dir(args.data_dir)
        image = image_files(root / SPLIT_DIRS["test"] / check_layout(root)[0])[0]
    report = inference_benchmark(args.model or default_model(), image, args.backends, args.repeats, tuple(args.batch_sizes))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["backends"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
