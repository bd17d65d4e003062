"""Push a model folder (and the Space) to the Hub: same as `hf-tumor push` (see --help)."""

import sys

from hf_tumor.cli import main

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
