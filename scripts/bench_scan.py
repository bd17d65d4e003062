"""A whole scan: `hf-tumor predict` on a 1 mm head volume (slices/s, peak memory), the library's share, and
the app's Whole scan tab over HTTP. The volume defaults to nilearn's MNI152 template (197 x 233 x 189 voxels).

python scripts/bench_scan.py [--model DIR] [--volume FILE] [--plane axial] [--runs 3] [--out FILE]
"""

import argparse
import json
import sys
from pathlib import Path

from benchlib import scan_benchmark, write_report
from hf_tumor.checks.external import SOURCES
from hf_tumor.errors import UserError
from hf_tumor.serving.inference import default_model
from hf_tumor.serving.volumes import PLANES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Model folder or Hub id (default: the bundled model).")
    parser.add_argument("--volume", help="A NIfTI file or a zipped DICOM series (default: nilearn's MNI152 template).")
    parser.add_argument("--plane", default="axial", choices=PLANES)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", help="Output JSON (default: benchmarks/scan_{plane}_{machine}.json).")
    args = parser.parse_args()
    volume = args.volume or SOURCES["mni152"].path()
    if volume is None:
        sys.exit(f"no volume given and the MNI152 template is not installed: {SOURCES['mni152'].install}")
    try:
        report = scan_benchmark(args.model or default_model(), Path(volume), args.plane, args.runs)
    except (RuntimeError, UserError) as err:
        sys.exit(str(err))
    out = write_report(report, args.out, "scan", args.plane)
    print(json.dumps({part: report[part]["median"] for part in ("cli", "library", "app")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
