"""Train hf-tumor: `accelerate launch scripts/train.py [ARGS.yaml] [--flag value ...]` (same as `hf-tumor train`)."""

import sys

from hf_tumor.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
