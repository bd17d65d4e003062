"""Training throughput: data loader alone, a bare PyTorch loop, and the Trainer, per size and precision.

python scripts/bench_train.py [--data_dir DIR] [--sizes 128 256] [--precisions fp32 bf16] [--steps 5]
                              [--out FILE]

Run on an idle machine. bf16 is skipped where the hardware has no native bf16 (it is emulated there,
and about 17x slower than fp32 on an AVX2 CPU), unless --force_bf16.
"""

import argparse
import json

from benchlib import machine, train_benchmark, write_report
from hf_tumor.training.runtime import bf16_available


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", help="Kaggle folder (default: $HF_TUMOR_DATA).")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps (after 2 warm-up steps).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--force_bf16", action="store_true", help="Measure bf16 even where it is emulated.")
    parser.add_argument("--out", help="Output JSON (default: benchmarks/train_{sizes}px_{machine}.json).")
    args = parser.parse_args()
    runs = []
    for precision in args.precisions:
        for size in args.sizes:
            if precision == "bf16" and not (bf16_available() or args.force_bf16):
                runs.append({"image_size": size, "precision": precision, "skipped": "no native bf16 on this hardware"})
                continue
            runs.append(train_benchmark(args.data_dir, size, precision, args.batch_size, args.steps, args.warmup))
            print(json.dumps(runs[-1]), flush=True)
    report = {"machine": machine(), "runs": runs}
    out = write_report(report, args.out, "train", "-".join(map(str, args.sizes)) + "px")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
