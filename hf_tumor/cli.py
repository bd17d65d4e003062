"""``hf-tumor``: train, evaluate and predict. Each subcommand parses arguments and calls hf_tumor."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from hf_tumor.data import DataError
from hf_tumor.model import ModelInitError


def _evaluate(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-tumor evaluate", description="Evaluate a model folder on the Testing split.")
    parser.add_argument("--model", required=True, help="Model folder written by training.")
    parser.add_argument("--data_dir", help="Folder with Training/ and Testing/ (default: $HF_TUMOR_DATA).")
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args(argv)
    from hf_tumor.evaluation import evaluate_model
    from hf_tumor.training import setup_logging

    setup_logging()
    results = evaluate_model(args.model, args.data_dir, args.batch_size)
    test = results["splits"]["test"]
    print(f"test accuracy {test['accuracy']:.4f}  macro-F1 {test['f1_macro']:.4f}  ({test['num_images']} images)")
    print(f"wrote {args.model}/eval_results.json")
    return 0


def _predict(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-tumor predict", description="Classify MRI slice image files.")
    parser.add_argument("images", nargs="+", help="Image files (JPEG, PNG, ...).")
    parser.add_argument("--model", required=True, help="Model folder or Hub repo id.")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) to pin.")
    parser.add_argument("--json", action="store_true", help="One JSON object per line.")
    args = parser.parse_args(argv)
    from hf_tumor.inference import load_pipeline, predict_files

    predictions = predict_files(load_pipeline(args.model, args.revision), args.images)
    for p in predictions:
        if args.json:
            print(json.dumps({"path": p.path, "label": p.label, "probabilities": p.probabilities, "error": p.error}))
        elif p.error:
            print(f"{p.path}: error: {p.error}", file=sys.stderr)
        else:
            probs = "  ".join(f"{name} {value:.4f}" for name, value in p.probabilities.items())
            print(f"{p.path}: {p.label}  ({probs})")
    return 1 if any(p.error for p in predictions) else 0


def _train(argv: Sequence[str]) -> int:
    from hf_tumor.training import main as train_main

    train_main(argv)
    return 0


COMMANDS = {
    "train": (_train, "train a model folder (same flags as scripts/train.py; --help lists them)"),
    "evaluate": (_evaluate, "evaluate a model folder on the Testing split"),
    "predict": (_predict, "classify image files"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: hf-tumor COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = COMMANDS[argv[0]][0], argv[1:]
    try:
        return command(rest)
    except (DataError, ModelInitError, FileNotFoundError) as err:
        print(f"hf-tumor {argv[0]}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
