"""Model card rendering, packaging of a model folder, and pushing model and Space to the Hub.

Nothing here touches the network until ``push`` is called without ``dry_run``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors.torch import load_file, save_file

from hf_tumor.contract import (
    ARGS_FILE, CONFIG_FILE, EVAL_RESULTS_FILE, EXTERNAL_FILE, ONNX_DIR, ONNX_FILES, PARITY_FILE, PATIENTS_FILE, WEIGHTS_FILE,
)
from hf_tumor.errors import UserError

logger = logging.getLogger("hf_tumor")

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # hf_tumor/
REPO_ROOT = PACKAGE_DIR.parent
SPACE_PACKAGE = ("__init__.py", "errors.py", "contract.py", "serving")  # what a Space needs of hf_tumor/
# a Jinja template for huggingface_hub.ModelCard, shipped inside the package (package-data)
CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"
SPACE_DIR = REPO_ROOT / "space"
DATASET_NAME = "brain-tumor-mri"  # the audited data on the Hub (`hf-tumor push-dataset`)
# what a Hub model repo needs; checkpoints, optimizer states and logs stay behind
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, "README.md", EVAL_RESULTS_FILE, ARGS_FILE,
               "train_results.json", "validation_results.json", "trainer_state.json", "training_curves.png",
               "confusion_matrix.png", "confusion_matrix_clean.png", "reliability_diagram.png", EXTERNAL_FILE)


class PushError(UserError, RuntimeError):
    """A push that cannot start (no token, no network); raised before anything is uploaded."""


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _with_ci(split: dict[str, Any], key: str) -> str:
    low, high = split[f"{key}_ci95"]
    return f"{_pct(split[key])} ({_pct(low)} to {_pct(high)})"


def _reproduce_command(args: dict[str, Any]) -> str:
    if args.get("command"):
        return args["command"]
    flags = []
    for group in ("DataArguments", "ModelArguments", "AugmentConfig"):
        for key, value in args.get(group, {}).items():
            if value is not None and key not in ("data_dir",):
                flags.append(f"--{key} {value}")
    training = args.get("TrainingArguments", {})
    for key in ("num_train_epochs", "learning_rate", "weight_decay", "warmup_steps", "lr_scheduler_type",
                "label_smoothing_factor", "per_device_train_batch_size", "seed", "bf16"):
        if key in training:
            flags.append(f"--{key} {training[key]}")
    return "hf-tumor train --data_dir DATA " + " ".join(flags)


def default_dataset_id(repo_id: str) -> str:
    """Where `hf-tumor push-dataset` puts the audited data by default: beside the model, same owner."""
    return f"{repo_id.split('/')[0]}/{DATASET_NAME}"


def card_inputs(
    model_dir: str | os.PathLike, repo_id: str, space_id: str | None = None, dataset_id: str | None = None,
    web_space_id: str | None = None,
) -> tuple[ModelCardData, dict[str, Any]]:
    """Card metadata and template variables, all read from the files training and evaluation wrote.

    The metadata's dataset is the audited Hub dataset (``dataset_id``, default ``default_dataset_id``),
    whose ``test`` and ``clean_test`` splits are the ones the figures were measured on.
    """
    dataset_id = dataset_id or default_dataset_id(repo_id)
    model_dir = Path(model_dir)
    config = _read_json(model_dir / CONFIG_FILE)
    args = _read_json(model_dir / ARGS_FILE)
    state = _read_json(model_dir / "trainer_state.json")
    train = _read_json(model_dir / "train_results.json")
    results = _read_json(model_dir / EVAL_RESULTS_FILE)
    if not config or not results:
        raise FileNotFoundError(f"{model_dir} needs {CONFIG_FILE} and {EVAL_RESULTS_FILE} (run hf-tumor evaluate first)")
    splits, audit = results["splits"], results["audit"]
    model_args = args.get("ModelArguments", {})
    training = args.get("TrainingArguments", {})
    init = model_args.get("init", "unknown")
    architecture = config["architecture"]
    base_model = None
    if init == "imagenet":
        base_model = timm.models.get_pretrained_cfg(architecture).hf_hub_id or None

    eval_results = []
    for split, name in (("test", "official test"), ("clean_test", "leak-free test")):
        if split in splits:
            for metric, value in (("accuracy", splits[split]["accuracy"]), ("f1", splits[split]["f1_macro"])):
                if split == "clean_test" and metric == "f1":
                    continue
                eval_results.append(EvalResult(
                    task_type="image-classification", dataset_type=dataset_id, dataset_name=f"Brain Tumor MRI ({name})",
                    dataset_split=split, metric_type=metric, metric_value=round(value, 4),
                    metric_name=f"{'Accuracy' if metric == 'accuracy' else 'Macro F1'} ({name})",
                ))
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="image-classification", license="apache-2.0",
        tags=["timm", "medical", "brain-mri", "mri", "image-classification", "hf-tumor"],
        datasets=[dataset_id], metrics=["accuracy", "f1"], base_model=base_model,
        model_name=repo_id.split("/")[-1], eval_results=eval_results,
    )

    total_test = audit["num_images"]["test"]
    pretrained = config["pretrained_cfg"]
    split_seed = args.get("DataArguments", {}).get("split_seed")
    keeps_best = training.get("load_best_model_at_end", True)
    validation_use = [*(["early stopping"] if model_args.get("early_stopping_patience") else []),
                      *(["checkpoint choice"] if keeps_best else []), "calibration and the out-of-distribution threshold"]
    hyperparameters = [
        ("architecture", architecture), ("initial weights", init), ("image size", pretrained["input_size"][-1]),
        ("epochs (max)", training.get("num_train_epochs")), ("batch size", training.get("per_device_train_batch_size")),
        ("optimizer", training.get("optim")), ("learning rate", training.get("learning_rate")),
        ("schedule", f"{training.get('lr_scheduler_type')}, {training.get('warmup_steps')} warmup steps"),
        ("weight decay", training.get("weight_decay")),
        ("gradient clipping (max norm)", training.get("max_grad_norm") or "none"),
        ("label smoothing", training.get("label_smoothing_factor")),
        ("dropout", config.get("model_args", {}).get("drop_rate")), ("bf16 autocast", training.get("bf16")),
        ("early stopping patience", model_args.get("early_stopping_patience")),
        ("weights kept", "best validation macro-F1" if keeps_best else "the last epoch's"),
        ("augmentation", ", ".join(f"{k} {v}" for k, v in args.get("AugmentConfig", {}).items())),
        ("seed", training.get("seed")),
        ("validation split seed", "the seed" if split_seed is None else split_seed),
    ]
    best_step = (state.get("best_model_checkpoint") or "").rsplit("-", 1)[-1] or "?"
    eval_rows = [
        {"name": label, "n": splits[s]["num_images"], "accuracy": _with_ci(splits[s], "accuracy"),
         "f1": _with_ci(splits[s], "f1_macro"), "nn": _pct(splits[s]["nn_baseline"]["accuracy"])}
        for s, label in (("test", "official test"), ("clean_test", "leak-free test")) if s in splits
    ]
    per_class_split = "clean_test" if "clean_test" in splits else "test"
    per_class_rows = [
        {"name": name, "precision": _pct(v["precision"]), "recall": _pct(v["recall"]), "f1": _pct(v["f1"]),
         "support": v["support"]}
        for name, v in splits[per_class_split]["per_class"].items()
    ]
    calibration_rows = [
        {"name": s, **{k: f"{v:.4f}" for k, v in splits[s]["calibration"].items()}} for s in splits
    ]
    wall = train.get("train_wall_seconds") or train.get("train_runtime")
    wall_time = f"{wall / 60:.0f} min" if wall else "not recorded"
    origin = {"scratch": "trained from scratch", "imagenet": "fine-tuned from ImageNet weights"}.get(
        init, f"initialised from {init}")
    external = _read_json(model_dir / EXTERNAL_FILE)
    patients = _read_json(model_dir / PATIENTS_FILE)
    variables = {
        "patients": patients and _patients_summary(patients),
        "external": external and {
            "slices": external["overall"]["slices"], "sources": ", ".join(external["sources"]),
            "notumor": _pct(external["overall"]["called_notumor"]),
            "middle_axial": _pct(external["middle_axial_notumor"]), "middle_axial_n": external["middle_axial_slices"],
            "unflagged": external["confident_tumour_unflagged"], "flagged": _pct(external["overall"]["flagged"]),
            "backend": external.get("backend", "?"),
        },
        "model_name": repo_id.split("/")[-1], "repo_id": repo_id, "architecture": architecture,
        "space_id": space_id, "dataset_id": dataset_id, "web_space_id": web_space_id,
        "healthy_sources": ", ".join(args.get("DataArguments", {}).get("healthy_sources") or []),
        "init_description": origin,
        "class_names": results["class_names"], "image_size": pretrained["input_size"][-1],
        "mean": [round(m, 4) for m in pretrained["mean"]], "std": [round(s, 4) for s in pretrained["std"]],
        "temperature": results.get("temperature", 1.0),
        "num_train_total": audit["num_images"]["train"],
        "validation_pct": round(100 * args.get("DataArguments", {}).get("validation_fraction", 0.15)),
        "validation_use": ", ".join(validation_use),
        "leaked": audit["test_with_train_twin"], "num_test_total": total_test,
        "leaked_pct": f"{100 * audit['test_with_train_twin'] / max(total_test, 1):.1f}",
        "audit_measure": audit["measure"], "audit_threshold": audit["threshold"], "exact_twins": audit.get("exact_test_twins"),
        "clean_count": audit["clean_test"], "hyperparameters": hyperparameters,
        "hardware": args.get("hardware", "not recorded"),
        "wall_time": wall_time,
        "throughput": f"{train['train_samples_per_second']:.1f}" if "train_samples_per_second" in train else "?",
        "epochs_run": round(state.get("epoch", 0), 1), "steps": state.get("global_step"),
        "best_metric": state.get("best_metric") or 0.0, "best_step": best_step, "keeps_best": keeps_best,
        "eval_rows": eval_rows, "per_class_split": {"clean_test": "leak-free test", "test": "official test"}[per_class_split],
        "per_class_rows": per_class_rows, "calibration_rows": calibration_rows,
        "command": _reproduce_command(args),
        "onnx_rows": _onnx_rows(model_dir),
    }
    return card_data, variables


def _onnx_rows(model_dir: Path) -> list[dict[str, str]]:
    """The ONNX files present in ``model_dir`` with their parity against PyTorch (for the card)."""
    parity = _read_json(model_dir / ONNX_DIR / PARITY_FILE)
    return [
        {"file": parity[name]["file"], "agreement": _pct(parity[name]["top1_agreement"]),
         "max_diff": f"{parity[name]['max_probability_difference']:.4f}", "accuracy": _pct(parity[name]["accuracy"]),
         "n": parity["num_images"]}
        for name in ONNX_FILES if name in parity and (model_dir / parity[name]["file"]).is_file()
    ]


def render_model_card(
    model_dir: str | os.PathLike, repo_id: str, space_id: str | None = None, dataset_id: str | None = None,
    template: Path = CARD_TEMPLATE, web_space_id: str | None = None,
) -> ModelCard:
    """Render the card template (``CARD_TEMPLATE``) for a model folder and write it there as README.md."""
    card_data, variables = card_inputs(model_dir, repo_id, space_id, dataset_id, web_space_id)
    card = ModelCard.from_template(card_data, template_path=str(template), **variables)
    (Path(model_dir) / "README.md").write_text(str(card))
    return card


def package_model(
    run_dir: str | os.PathLike, dest: str | os.PathLike, repo_id: str, half: bool = True,
    space_id: str | None = None, dataset_id: str | None = None, web_space_id: str | None = None,
) -> Path:
    """Copy what a Hub model repo needs from a training run, weights in fp16 and in timm's key layout.

    timm-style keys (no ``timm_model.`` prefix) load in transformers (``from_pretrained``/``pipeline``)
    and in ``timm.create_model("hf-hub:...")`` alike; ``config.json`` keeps ``dtype: float32`` so that
    both upcast on load and compute in fp32 on a CPU.
    """
    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if name not in (WEIGHTS_FILE, "README.md") and (run_dir / name).is_file():
            shutil.copy2(run_dir / name, dest / name)
    if (run_dir / ONNX_DIR).is_dir() and run_dir.resolve() != dest.resolve():  # exports and their parity report
        shutil.copytree(run_dir / ONNX_DIR, dest / ONNX_DIR, dirs_exist_ok=True)
    state = load_file(str(run_dir / WEIGHTS_FILE))
    state = {
        k.removeprefix("timm_model."): (v.half() if half and v.is_floating_point() else v).contiguous()
        for k, v in state.items()
    }
    partial = dest / f"{WEIGHTS_FILE}.partial"
    save_file(state, str(partial), metadata={"format": "pt"})
    partial.chmod(0o644)
    os.replace(partial, dest / WEIGHTS_FILE)
    config = _read_json(dest / CONFIG_FILE)
    config["dtype"] = "float32"
    (dest / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    render_model_card(dest, repo_id, space_id, dataset_id, web_space_id=web_space_id)
    return dest


@dataclass
class PushPlan:
    """What a push uploads: files per repo, relative to their folders."""

    model_repo: str
    model_files: list[str]
    space_repo: str | None = None
    space_files: list[str] | None = None
    model_revision: str | None = None  # the commit of the model upload (None in a dry run)
    web_space_repo: str | None = None
    web_space_files: list[str] | None = None


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def serving_modules() -> list[str]:
    """The ``hf_tumor`` files a Space holds, relative to the package: its ``__init__.py``, ``errors.py``,
    ``contract.py`` and the whole ``serving/`` folder. The serving path imports nothing else (a test
    parses it to keep it so), so the training stack stays out of the Space."""
    files = []
    for name in SPACE_PACKAGE:
        path = PACKAGE_DIR / name
        files += [str(p.relative_to(PACKAGE_DIR)) for p in path.rglob("*.py")] if path.is_dir() else [name]
    return sorted(files)


def space_examples(data_dir: str | os.PathLike) -> dict[str, Path]:
    """Example slices for the Space: per class, the first Testing slice (by name) with no near-twin in
    Training, and one photograph that is no MRI (matplotlib's sample of Grace Hopper, public domain).

    Leak-free, so that a visitor does not see the model recite a training image; taken by name, not
    by what the model says about them.
    """
    from matplotlib import cbook

    from hf_tumor.training.audit import run_audit

    root = Path(data_dir)
    clean = sorted(run_audit(root)["clean_test"]["paths"])
    examples: dict[str, Path] = {}
    for path in map(Path, clean):  # relative to the data folder: Testing/<class>/<file>
        examples.setdefault(path.parent.name, root / path)
    examples["not-mri"] = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return examples


def _patients_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The real-patient suite's headline for the card: held-out scans only, the trained-on ones named apart."""
    head = report["headline"]
    lesion, free = head["lesion"], head["tumour_free"]
    return {"scans": head["scans"], "lesion": lesion["slices"], "missed": lesion["missed"],
            "missed_pct": _pct(lesion["missed"] / max(1, lesion["slices"])), "expected": lesion["expected"],
            "other": lesion["other_tumour"], "flagged": lesion["flagged"], "free": free["slices"],
            "false_alarms": free["tumour_confident"], "backend": report.get("backend", "?"),
            "trained_on": ", ".join(report.get("trained_on") or [])}


def stage_space(dest: Path, repo_id: str, examples: dict[str, Path] | None = None) -> Path:
    """The Space repo's files: ``space/``, the ``hf_tumor`` files of the serving path (``serving_modules``)
    and the examples (``examples/<name>.jpg``), pointed at ``repo_id``."""
    shutil.copytree(SPACE_DIR, dest, ignore=shutil.ignore_patterns("__pycache__", ".*", "examples"), dirs_exist_ok=True)
    for name in serving_modules():
        (dest / "hf_tumor" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE_DIR / name, dest / "hf_tumor" / name)
    if examples:
        (dest / "examples").mkdir(exist_ok=True)
    for name, path in (examples or {}).items():
        shutil.copy2(path, dest / "examples" / f"{name}{path.suffix.lower()}")
    readme = dest / "README.md"
    if readme.is_file():  # the Spaces header names the model it serves
        readme.write_text(readme.read_text().replace("HF_TUMOR_MODEL_REPO", repo_id))
    return dest


def stage_web_space(dest: Path, model_dir: Path, repo_id: str) -> Path:
    """The static Space of the in-browser page: the page with its runtime and the int8 model
    (``hf_tumor.training.web.build_web``) and its card, pointed at ``repo_id``."""
    from hf_tumor.training.web import WEB_DIR, build_web

    build_web(dest, model_dir)
    (dest / "README.md").write_text((WEB_DIR / "README.md").read_text().replace("HF_TUMOR_MODEL_REPO", repo_id))
    return dest


def hub_client(token: str | None) -> tuple[Any, str]:
    """An ``HfApi`` with a usable token, and the user it belongs to; a ``PushError`` before anything
    is uploaded when there is no token or no Hub."""
    from huggingface_hub import HfApi, get_token

    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise PushError("No Hugging Face token: set HF_TOKEN or run `hf auth login`. Nothing was uploaded.")
    api = HfApi(token=token)
    try:
        return api, api.whoami()["name"]
    except Exception as err:
        raise PushError(f"Cannot use the Hub ({type(err).__name__}); check the network and the token. "
                        "Nothing was uploaded.") from None


def push(
    model_dir: str | os.PathLike,
    repo_id: str,
    space_id: str | None = None,
    private: bool = False,
    revision: str | None = None,
    dry_run: str | os.PathLike | None = None,
    token: str | None = None,
    data_dir: str | os.PathLike | None = None,
    dataset_id: str | None = None,
    web_space_id: str | None = None,
) -> PushPlan:
    """Package ``model_dir`` (fp16 weights, rendered card) and upload it, the Space with ``space_id``
    (its examples taken from ``data_dir``; ``space_examples``), pinned to the model commit just made,
    and the static in-browser page with ``web_space_id``.

    With ``dry_run`` the exact files are written under ``dry_run/model``, ``dry_run/space`` and
    ``dry_run/web`` and nothing touches the network. Token and connectivity are checked before any
    upload starts.
    """
    import tempfile

    if space_id and data_dir is None:
        raise PushError("A Space needs its example slices: pass --data_dir DIR (the folder with Testing/). "
                        "Nothing was uploaded.")
    examples = space_examples(data_dir) if space_id else None
    with tempfile.TemporaryDirectory(prefix="hf-tumor-push-") as tmp:
        staged_model = package_model(model_dir, Path(tmp) / "model", repo_id, space_id=space_id, dataset_id=dataset_id,
                                     web_space_id=web_space_id)
        staged_space = stage_space(Path(tmp) / "space", repo_id, examples) if space_id else None
        staged_web = stage_web_space(Path(tmp) / "web", Path(model_dir), repo_id) if web_space_id else None
        plan = PushPlan(repo_id, _files(staged_model), space_id, _files(staged_space) if staged_space else None,
                        web_space_repo=web_space_id, web_space_files=_files(staged_web) if staged_web else None)
        if dry_run is not None:
            out = Path(dry_run)
            for name, staged in (("model", staged_model), ("space", staged_space), ("web", staged_web)):
                if staged is not None:
                    shutil.copytree(staged, out / name, dirs_exist_ok=True)
            return plan

        api, user = hub_client(token)
        logger.info("pushing as %s to %s", user, repo_id)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, repo_type="model", branch=revision, exist_ok=True)
        commit = api.upload_folder(folder_path=str(staged_model), repo_id=repo_id, repo_type="model", revision=revision,
                                   allow_patterns=plan.model_files, commit_message="Upload hf-tumor model")
        plan.model_revision = commit.oid
        if staged_space is not None:
            api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
            api.upload_folder(folder_path=str(staged_space), repo_id=space_id, repo_type="space",
                              commit_message="Upload hf-tumor Space")
            api.add_space_variable(space_id, "HF_TUMOR_MODEL", repo_id)
            # the Space serves the model it was tested with, not whatever is pushed to the repo later
            api.add_space_variable(space_id, "HF_TUMOR_REVISION", commit.oid)
        if staged_web is not None:
            api.create_repo(web_space_id, repo_type="space", space_sdk="static", private=private, exist_ok=True)
            api.upload_folder(folder_path=str(staged_web), repo_id=web_space_id, repo_type="space",
                              commit_message="Upload hf-tumor in-browser page")
    return plan
