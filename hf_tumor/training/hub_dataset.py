"""The audited Kaggle folders as a Hub dataset (``hf-tumor push-dataset``).

Four splits, each exactly what hf-tumor itself uses: ``train`` and ``validation`` as training splits
Training (same fraction, seed and near-duplicate groups), ``test`` (the official Testing folder) and
``clean_test`` (the Testing images with no near twin in Training: the leak-free figure's images).
Every row carries its near-duplicate group, so that users can keep groups on one side of their own
splits. Nothing here touches the network unless ``push_dataset`` is called without ``dry_run``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Image, SplitDict, SplitInfo, Value
from datasets import config as datasets_config
from datasets.arrow_writer import get_writer_batch_size_from_features
from datasets.info import DatasetInfosDict
from datasets.utils.py_utils import convert_file_size_to_int
from huggingface_hub import DatasetCard, DatasetCardData

from hf_tumor.contract import ARGS_FILE, EVAL_RESULTS_FILE, training_split_settings
from hf_tumor.errors import UserError
from hf_tumor.training.audit import run_audit, train_groups
from hf_tumor.training.data import (
    KAGGLE_DATASET, SPLIT_DIRS, DataError, check_layout, image_files, resolve_data_dir, split_train_validation,
)

logger = logging.getLogger("hf_tumor")

DATASET_CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "dataset_card.md"
SPLITS = ("train", "validation", "test", "clean_test")
DATA_DIR_IN_REPO = "data"  # where DatasetDict.push_to_hub puts its shards (its default for the default config)
# The licence the Kaggle page states (CC0: Public Domain). The component sets (figshare, SARTAJ, Br35H)
# were published under their own terms; the card says so.
LICENSE = "cc0-1.0"
KAGGLE_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"
# the split settings of the bundled model (models/resnetv2_50-scratch-128/train_args.json)
DEFAULT_VALIDATION_FRACTION = 0.05
DEFAULT_SPLIT_SEED = 7


def dataset_features(class_names: list[str]) -> Features:
    """The columns of every split; one schema for all, as push_to_hub requires."""
    return Features({
        "image": Image(),
        "label": ClassLabel(names=class_names),
        "group": Value("string"),
        "path": Value("string"),
        "leaks": Value("bool"),
    })


def _group_ids(audit: dict[str, Any]) -> dict[str, str]:
    # the numbering train_groups uses, extended to Testing, so that a test image and its
    # training twin show the same id
    return {member["path"]: f"near-{number}"
            for number, group in enumerate(audit["near_duplicates"]["groups"]) for member in group}


def _check_audit_matches(audit: dict[str, Any], root: Path, files: dict[str, list[Path]]) -> None:
    test_paths = {p.relative_to(root).as_posix() for p in files["test"]}
    audited = set(audit["test_with_train_twin"]["paths"]) | set(audit["clean_test"]["paths"])
    if audit["num_images"]["train"] != len(files["train"]) or audited != test_paths:
        raise DataError(f"The audit given is of another data folder ({audit.get('data_dir')}), not of {root}; "
                        "run the audit on this folder.")


def build_dataset_dict(
    data_dir: str | os.PathLike | None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
    audit: dict[str, Any] | None = None,
    limit_per_class: int | None = None,
) -> DatasetDict:
    """``train`` / ``validation`` / ``test`` / ``clean_test`` of a data folder, images as their original bytes.

    The rows, their order and the train/validation split are those of ``hf_tumor.training.data.load_splits``
    with the audit's groups (what training and evaluation use); ``clean_test`` is the test rows that
    ``hf_tumor.training.evaluation`` counts as leak-free. ``audit`` is ``run_audit(data_dir)`` if the caller
    has it; ``limit_per_class`` mirrors training's option of the same name.
    """
    root = resolve_data_dir(data_dir).resolve()
    classes = check_layout(root)
    all_files = {split: [p for c in classes for p in image_files(root / folder / c)] for split, folder in SPLIT_DIRS.items()}
    audit = audit or run_audit(root)
    _check_audit_matches(audit, root, all_files)

    groups_by_path = _group_ids(audit)
    leaked = set(audit["test_with_train_twin"]["paths"])
    unreadable = set(audit["unreadable"])  # training drops these too (cache_resized), so the split must not see them
    features = dataset_features(classes)
    splits: dict[str, Dataset] = {}
    for split, folder in SPLIT_DIRS.items():
        rows: dict[str, list] = {name: [] for name in features}
        for index, cls in enumerate(classes):
            files = image_files(root / folder / cls)[:limit_per_class]  # first N per class, as first_per_class
            for path in files:
                relative = path.relative_to(root).as_posix()
                if relative in unreadable:
                    continue
                # bytes with the file name: the Image feature stores them as they are, no re-encoding
                rows["image"].append({"bytes": path.read_bytes(), "path": path.name})
                rows["label"].append(index)
                rows["group"].append(groups_by_path.get(relative, relative))
                rows["path"].append(relative)
                rows["leaks"].append(split == "test" and relative in leaked)
        if not rows["path"]:
            raise DataError(f"No readable images in {root / folder}.")
        splits[split] = Dataset.from_dict(rows, features=features)

    train_full = splits["train"]
    # exactly load_splits' call: absolute paths, the audit's training groups, the path itself otherwise
    groups = train_groups(audit, root)
    absolute = [str(root / p) for p in train_full["path"]]
    train_idx, val_idx = split_train_validation(
        train_full["label"], validation_fraction, split_seed, [groups.get(p, p) for p in absolute]
    )
    test = splits["test"]
    return DatasetDict(
        train=train_full.select(train_idx),
        validation=train_full.select(val_idx),
        test=test,
        clean_test=test.select([i for i, leaks in enumerate(test["leaks"]) if not leaks]),
    )


# --------------------------------------------------------------------------- the card


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def _per_class(dataset: Dataset) -> list[int]:
    counts = [0] * len(dataset.features["label"].names)
    for label in dataset["label"]:
        counts[label] += 1
    return counts


def _model_result(model_dir: Path | None, clean_count: int) -> dict[str, Any] | None:
    """The model's leak-free accuracy, if its evaluation was on this very clean_test (same image count)."""
    results_file = model_dir / EVAL_RESULTS_FILE if model_dir else None
    if not results_file or not results_file.is_file():
        return None
    clean = json.loads(results_file.read_text()).get("splits", {}).get("clean_test")
    if not clean:
        return None
    if clean["num_images"] != clean_count:
        logger.warning("%s was evaluated on %d leak-free images, this data folder has %d; its figure is left out of "
                       "the card", results_file, clean["num_images"], clean_count)
        return None
    return {"model": model_dir.name, "accuracy": f"{100 * clean['accuracy']:.2f}%",
            "ci": " to ".join(f"{100 * v:.2f}%" for v in clean["accuracy_ci95"]) if "accuracy_ci95" in clean else None}


def card_inputs(
    dataset: DatasetDict,
    audit: dict[str, Any],
    repo_id: str,
    split_settings: dict[str, Any],
    model_dir: Path | None = None,
    model_repo: str | None = None,
    dataset_info: DatasetInfo | None = None,
) -> tuple[DatasetCardData, dict[str, Any]]:
    """Card metadata and template variables; every number comes from ``dataset`` or ``audit``."""
    names = dataset["train"].features["label"].names
    total = sum(len(dataset[s]) for s in ("train", "validation", "test"))  # clean_test repeats test rows
    card_data = DatasetCardData(
        license=LICENSE,
        task_categories=["image-classification"],
        pretty_name="Brain Tumor MRI (audited, with a leak-free test split)",
        size_categories=[_size_category(total)],
        tags=["medical", "mri", "brain-mri", "brain-tumor", "hf-tumor"],
        configs=[{"config_name": "default",
                  "data_files": [{"split": s, "path": f"{DATA_DIR_IN_REPO}/{s}-*"} for s in dataset]}],
    )
    if dataset_info is not None:  # what push_to_hub itself writes: features, split sizes
        DatasetInfosDict({"default": dataset_info}).to_dataset_card_data(card_data)

    exact, near, leak = audit["exact_duplicates"], audit["near_duplicates"], audit["test_with_train_twin"]
    num_test = len(dataset["test"])
    descriptions = {
        "train": "Training minus validation",
        "validation": f"a stratified {100 * split_settings['validation_fraction']:g}% of Training "
                      f"(split seed {split_settings['split_seed']}), near-duplicate groups never split",
        "test": "the official Testing folder",
        "clean_test": "the Testing images with no near twin in Training (leak-free)",
    }
    variables = {
        "repo_id": repo_id,
        "model_repo": model_repo or "OWNER/MODEL",
        "kaggle_url": KAGGLE_URL,
        "kaggle_id": KAGGLE_DATASET,
        "class_names": names,
        "split_rows": [{"name": s, "n": len(dataset[s]), "per_class": _per_class(dataset[s]), "description": descriptions[s]}
                       for s in dataset],
        "num_images": total,
        "num_train_folder": len(dataset["train"]) + len(dataset["validation"]),
        "num_test": num_test,
        "validation_fraction": split_settings["validation_fraction"],
        "split_seed": split_settings["split_seed"],
        "limit_per_class": split_settings.get("limit_per_class"),
        "model_name": model_dir.name if model_dir else None,
        "exact_redundant": exact["num_redundant"], "exact_groups": exact["num_groups"],
        "exact_conflicts": exact["num_label_conflicts"],
        "near_groups": near["num_groups"], "near_images": near["num_images_in_groups"],
        "near_cross_split": near["num_cross_split_groups"], "label_conflicts": len(audit["label_conflicts"]),
        "measure": audit["measure"], "threshold": audit["threshold"],
        "leaked": sum(dataset["test"]["leaks"]), "leaked_exact": leak["exact"],
        "leaked_pct": f"{100 * sum(dataset['test']['leaks']) / max(num_test, 1):.1f}",
        "clean_count": len(dataset["clean_test"]),
        "unreadable": len(audit["unreadable"]),
        "model_result": _model_result(model_dir, len(dataset["clean_test"])),
    }
    return card_data, variables


def render_dataset_card(card_data: DatasetCardData, variables: dict[str, Any],
                        template: Path = DATASET_CARD_TEMPLATE) -> DatasetCard:
    """Render the dataset card template (``DATASET_CARD_TEMPLATE``)."""
    return DatasetCard.from_template(card_data, template_path=str(template), **variables)


# --------------------------------------------------------------------------- writing and pushing


def num_shards(dataset: Dataset) -> int:
    """push_to_hub's shard count for a split (one per 500 MB, its default); passed to it, so the layouts agree."""
    return int(_nbytes(dataset) / convert_file_size_to_int(datasets_config.MAX_SHARD_SIZE)) + 1


def _nbytes(dataset: Dataset) -> int:
    # the size estimate push_to_hub records as a split's num_bytes (a private method of Dataset)
    estimate = getattr(dataset, "_estimate_nbytes", None)
    return int(estimate()) if estimate else int(dataset.data.nbytes)


def write_parquet(dataset: DatasetDict, folder: Path, shards: dict[str, int]) -> list[str]:
    """Write the splits as ``data/<split>-0000i-of-0000N.parquet``, the file names push_to_hub gives them."""
    data = folder / DATA_DIR_IN_REPO
    data.mkdir(parents=True, exist_ok=True)
    for stale in data.glob("*.parquet"):  # push_to_hub deletes what an earlier push left in data/ too
        stale.unlink()
    files = []
    for split, ds in dataset.items():
        batch_size = get_writer_batch_size_from_features(ds.features)
        for index in range(shards[split]):
            name = f"{DATA_DIR_IN_REPO}/{split}-{index:05d}-of-{shards[split]:05d}.parquet"
            ds.shard(num_shards=shards[split], index=index, contiguous=True).to_parquet(str(folder / name), batch_size=batch_size)
            files.append(name)
    return files


def _dataset_info(dataset: DatasetDict, folder: Path) -> DatasetInfo:
    splits = SplitDict()
    for split, ds in dataset.items():
        splits.add(SplitInfo(name=split, num_bytes=_nbytes(ds), num_examples=len(ds)))
    download = sum(p.stat().st_size for p in (folder / DATA_DIR_IN_REPO).glob("*.parquet"))
    size = sum(s.num_bytes for s in splits.values())
    return DatasetInfo(features=dataset["train"].features, splits=splits, download_size=download, dataset_size=size,
                       size_in_bytes=download + size)


@dataclass
class DatasetPushPlan:
    """What a dataset push uploads (or, in a dry run, wrote under ``folder``)."""

    repo_id: str
    num_rows: dict[str, int]
    files: list[str]
    folder: Path | None = None
    card: str = field(default="", repr=False)


def _split_settings(model_dir: Path | None, validation_fraction: float, split_seed: int) -> dict[str, Any]:
    if model_dir is None:
        return {"validation_fraction": validation_fraction, "split_seed": split_seed, "limit_per_class": None}

    if not model_dir.is_dir():
        raise UserError(f"Model folder {model_dir} does not exist; it is read for its {ARGS_FILE} (split settings).")
    return training_split_settings(model_dir)


def push_dataset(
    data_dir: str | os.PathLike | None,
    repo_id: str,
    dry_run: str | os.PathLike | None = None,
    token: str | None = None,
    private: bool = False,
    model_dir: str | os.PathLike | None = None,
    model_repo: str | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
    audit: dict[str, Any] | None = None,
) -> DatasetPushPlan:
    """Build the audited DatasetDict and its card, and upload both to the dataset repo ``repo_id``.

    With ``dry_run`` the repo's files (parquet shards under ``data/`` and README.md) are written under
    that folder, which ``load_dataset(str(folder))`` reads offline, and nothing touches the network.
    ``model_dir`` supplies the split settings (its train_args.json) and the leak-free figure the card
    quotes; ``model_repo`` is the model the card's snippet evaluates.
    """
    from hf_tumor.training.hub import hub_client

    api = None
    if dry_run is None:  # fail before the slow part, and before anything is uploaded
        api, user = hub_client(token)
        logger.info("pushing the dataset as %s to %s", user, repo_id)

    model_dir = Path(model_dir) if model_dir is not None else None
    settings = _split_settings(model_dir, validation_fraction, split_seed)
    root = resolve_data_dir(data_dir).resolve()
    check_layout(root)  # a clear error before the audit starts
    audit = audit or run_audit(root)
    dataset = build_dataset_dict(root, settings["validation_fraction"], settings["split_seed"], audit,
                                 settings["limit_per_class"])
    shards = {split: num_shards(ds) for split, ds in dataset.items()}

    with tempfile.TemporaryDirectory(prefix="hf-tumor-dataset-") as tmp:
        folder = Path(dry_run) if dry_run is not None else Path(tmp)
        files = write_parquet(dataset, folder, shards)
        card_data, variables = card_inputs(dataset, audit, repo_id, settings, model_dir, model_repo,
                                           _dataset_info(dataset, folder))
        card = render_dataset_card(card_data, variables)
        card.save(str(folder / "README.md"))
        plan = DatasetPushPlan(repo_id, {s: len(d) for s, d in dataset.items()}, [*files, "README.md"],
                               folder if dry_run is not None else None, str(card))
        if api is None:
            return plan
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        # the card first: push_to_hub then merges its configs and dataset_info into it and keeps the rest
        api.upload_file(path_or_fileobj=str(folder / "README.md"), path_in_repo="README.md", repo_id=repo_id,
                        repo_type="dataset", commit_message="Add the dataset card")
        dataset.push_to_hub(repo_id, private=private, token=api.token, num_shards=shards,
                            commit_message="Upload the hf-tumor dataset")
    return plan
