"""Assemble the in-browser page (web/) with ONNX Runtime Web from the npm registry and a model's int8 file;
optionally serve it, cross-origin isolated (WASM threads), on 127.0.0.1.

python scripts/build_web.py [--model DIR] [--out web/dist] [--serve PORT]
"""

import argparse
import sys
import time

from hf_tumor.errors import UserError
from hf_tumor.serving.inference import default_model, resolve_model_dir
from hf_tumor.training.web import build_web, serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Model folder or Hub id (default: $HF_TUMOR_MODEL, else the bundled model).")
    parser.add_argument("--out", default="web/dist", help="Where to assemble the page.")
    parser.add_argument("--serve", type=int, metavar="PORT", help="Then serve it on 127.0.0.1:PORT until Ctrl-C.")
    args = parser.parse_args()
    try:
        files = build_web(args.out, resolve_model_dir(args.model or default_model()))
    except (UserError, OSError) as err:
        sys.exit(f"build_web: error: {err}")
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {len(files)} files, {size / 2**20:.1f} MB, to {args.out}")
    if args.serve:
        server = serve(args.out, args.serve)
        print(f"serving http://127.0.0.1:{args.serve}/ (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.shutdown()


if __name__ == "__main__":
    main()
