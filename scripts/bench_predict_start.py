"""`hf-tumor predict` with the int8 backend as a fresh process, on one slice and on a whole 1 mm head, beside a
bare ONNX Runtime script on the same slice: wall time, peak memory, whether PyTorch was imported.

python scripts/bench_predict_start.py [--model DIR] [--image FILE] [--volume FILE] [--runs 5] [--before DIR] [--out FILE]

--before DIR: also run the CLI of an older checkout (e.g. `git worktree add /tmp/before COMMIT`), in turns with
this one's. The slice defaults to the Testing split's first; the volume to nilearn's MNI152 template.
"""

import argparse
import json
import sys
from pathlib import Path

from benchlib import predict_start_benchmark, write_report
from hf_tumor.checks.external import SOURCES
from hf_tumor.errors import UserError
from hf_tumor.serving.inference import default_model
from hf_tumor.training.data import SPLIT_DIRS, check_layout, image_files, resolve_data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Local model folder with a checked int8 export (default: the bundled model).")
    parser.add_argument("--image", help="The slice (default: the first Testing slice of $HF_TUMOR_DATA / --data_dir).")
    parser.add_argument("--data_dir", help="Kaggle folder for the default slice (default: $HF_TUMOR_DATA).")
    parser.add_argument("--volume", help="A NIfTI head volume (default: nilearn's MNI152 template).")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", help="A checkout of older code whose CLI is measured too, for comparison.")
    parser.add_argument("--out", help="Output JSON (default: benchmarks/predict_start_{machine}.json).")
    args = parser.parse_args()
    try:
        if args.image:
            image = Path(args.image)
        else:
            root = resolve_data_dir(args.data_dir)
            image = image_files(root / SPLIT_DIRS["test"] / check_layout(root)[0])[0]
        volume = args.volume or SOURCES["mni152"].path()
        if volume is None:
            sys.exit(f"no volume given and the MNI152 template is not installed: {SOURCES['mni152'].install}")
        report = predict_start_benchmark(args.model or default_model(), image, Path(volume), args.runs, args.before)
    except (RuntimeError, UserError) as err:
        sys.exit(str(err))
    out = write_report(report, args.out, "predict", "start")
    summary = {name: {what: report[name][what]["median"] | {"torch": report[name][what]["torch_imported"]}
                      for what in ("image", "scan")} for name in ("before", "after") if name in report}
    print(json.dumps({"bare_onnxruntime": report["bare_onnxruntime"]["median"], **summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
