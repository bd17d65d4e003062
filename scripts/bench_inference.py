"""Inference latency and throughput per backend (PyTorch, ONNX Runtime fp32, ONNX Runtime int8).

python scripts/bench_inference.py [--model DIR] [--images FILE ...] [--repeats 100] [--out FILE]

Run it on an idle machine: it measures wall time. Backends other than torch are those whose
parity check passed (`hf-tumor export --model DIR --quantize int8`).
"""

import argparse
import json
from pathlib import Path

from benchlib import first_of_each_kind, inference_benchmark, write_report
from hf_tumor.serving.inference import resolve_model_dir
from hf_tumor.serving.inference import default_model
from hf_tumor.training.data import resolve_data_dir
from transformers import AutoConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Local model folder (default: the bundled model).")
    parser.add_argument("--images", nargs="+", type=Path,
                        help="Slices to time end to end, one of each storage kind at most: grayscale, gray stored as "
                             "RGB, coloured (default: the Testing split's first of each; the dataset has all three).")
    parser.add_argument("--data_dir", help="Kaggle folder for the default image (default: $HF_TUMOR_DATA).")
    parser.add_argument("--backends", nargs="+", help="Subset of torch, onnx, onnx-int8 (default: all usable).")
    parser.add_argument("--repeats", type=int, default=100, help="Timed calls of each stage, taken in turns.")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", help="Output JSON (default: benchmarks/inference_{size}px_{machine}.json).")
    args = parser.parse_args()
    images = args.images
    if not images:
        images = first_of_each_kind(resolve_data_dir(args.data_dir))
    try:
        report = inference_benchmark(args.model or default_model(), images, args.backends, args.repeats, tuple(args.batch_sizes))
    except ValueError as err:  # an unreadable file (InputError) or two files of one kind
        parser.error(str(err))
    model = args.model or default_model()
    size = AutoConfig.from_pretrained(resolve_model_dir(model)).pretrained_cfg["input_size"][-1]
    out = write_report(report, args.out, "inference", f"{size}px")
    print(json.dumps(report["backends"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
