"""The Kaggle Brain Tumor MRI folders as a `datasets` DatasetDict, decoded and resized once into a cache.

Layout: ``DIR/{Training,Testing}/<class>/*.jpg``. Class names are the folder names, sorted (that is
what ImageFolder does), and from here they travel in the model config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import PIL.Image
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_dataset

from hf_tumor.contract import image_size_of
from hf_tumor.errors import UserError
from hf_tumor.serving.preprocessing import create_eval_transform, load_image
from hf_tumor.training.augment import AugmentConfig, augment_array, create_train_augment

logger = logging.getLogger("hf_tumor")

SPLIT_DIRS = {"train": "Training", "test": "Testing"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
KAGGLE_DATASET = "masoudnickparvar/brain-tumor-mri-dataset"
DATA_ENV = "HF_TUMOR_DATA"
CACHE_ENV = "HF_TUMOR_CACHE"
_CACHE_VERSION = 1  # bump when the cached representation changes


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message says what was found and what is expected."""


# --------------------------------------------------------------------------- where the data is


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``--data_dir``, else ``$HF_TUMOR_DATA``, else a Kaggle download (optional client, needs a network)."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return download_dataset()


def download_dataset() -> Path:
    """Download the Kaggle dataset with ``kagglehub``; fail at once, with a way out, when that cannot work."""
    how = (
        "Pass --data_dir DIR (the folder that holds Training/ and Testing/) or set "
        f"{DATA_ENV}=DIR to use a local copy."
    )
    try:
        import kagglehub
    except ImportError:
        raise DataError(
            "No data folder given and the optional Kaggle client is not installed. "
            f"{how} To download it instead: pip install 'hf-tumor[kaggle]'."
        ) from None
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _reachable("www.kaggle.com", 443):
        raise DataError(f"No data folder given and Kaggle cannot be reached (offline?). {how}")
    path = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    candidates = [path, *sorted(p for p in path.iterdir() if p.is_dir())]
    for candidate in candidates:
        if (candidate / SPLIT_DIRS["train"]).is_dir():
            return candidate
    raise DataError(f"The Kaggle download at {path} has no {SPLIT_DIRS['train']}/ folder.")


def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- layout checks


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "nothing"


def check_layout(root: str | os.PathLike) -> list[str]:
    """Check ``root/{Training,Testing}/<class>/<images>`` and return the sorted class names.

    Raises DataError naming what was found and what is expected.
    """
    root = Path(root)
    expected = f"expected {root}/Training/<class>/*.jpg and {root}/Testing/<class>/*.jpg"
    if not root.exists():
        raise DataError(f"Data folder {root} does not exist ({expected}).")
    if not root.is_dir():
        raise DataError(f"Data folder {root} is not a folder ({expected}).")
    missing = [name for name in SPLIT_DIRS.values() if not (root / name).is_dir()]
    if missing:
        hint = ""
        if any(_is_image(p) for d in root.iterdir() if d.is_dir() for p in d.iterdir()):
            hint = " It looks like a single split's class folders: pass the folder above it."
        raise DataError(
            f"Data folder {root} has no {' or '.join(m + '/' for m in missing)} folder; "
            f"found: {_listing(root)}; {expected}.{hint}"
        )
    classes_per_split: dict[str, list[str]] = {}
    for split_dir in SPLIT_DIRS.values():
        folder = root / split_dir
        loose = [p.name for p in folder.iterdir() if _is_image(p)]
        if loose:
            raise DataError(
                f"{folder} holds images directly ({', '.join(sorted(loose)[:3])}, ...); "
                f"expected one sub-folder per class ({expected})."
            )
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(classes) < 2:
            raise DataError(f"{folder} has {len(classes)} class folder(s) (found: {_listing(folder)}); need at least 2.")
        for name in classes:
            if not any(_is_image(p) for p in (folder / name).iterdir()):
                raise DataError(
                    f"Class folder {folder / name} has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})."
                )
        classes_per_split[split_dir] = classes
    train_classes, test_classes = classes_per_split.values()
    if train_classes != test_classes:
        raise DataError(
            f"Training and Testing have different class folders: Training has {train_classes}, "
            f"Testing has {test_classes}."
        )
    return train_classes


# --------------------------------------------------------------------------- loading and caching


def load_image_folder(root: str | os.PathLike) -> DatasetDict:
    """ImageFolder over the two split folders, images left undecoded (paths only)."""
    root = Path(root).resolve()
    classes = check_layout(root)
    data_files = {
        split: [str(p) for c in classes for p in image_files(root / folder / c)]
        for split, folder in SPLIT_DIRS.items()
    }
    features = Features({"image": Image(decode=False), "label": ClassLabel(names=classes)})
    return load_dataset("imagefolder", data_files=data_files, features=features)


def cache_dir() -> Path:
    """Where decoded-and-resized images are kept: ``$HF_TUMOR_CACHE`` or ``~/.cache/hf_tumor``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "hf_tumor")).expanduser()


def _cache_key(paths: Sequence[str], pretrained_cfg: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([_CACHE_VERSION, pretrained_cfg], sort_keys=True).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_resized(dataset: Dataset, pretrained_cfg: dict[str, Any], name: str, num_proc: int | None = None) -> Dataset:
    """Decode and resize every image once (the expensive half of the eval transform) into an Arrow file.

    The file is keyed by the source files (path, size, mtime) and the preprocessing, so it is reused
    across epochs and runs and rebuilt when either changes. Unreadable images are dropped with one
    warning that names and counts them.
    """
    resize = create_eval_transform(pretrained_cfg).resize
    paths = [row["path"] for row in dataset["image"]]
    key = _cache_key(paths, pretrained_cfg)
    size = image_size_of(pretrained_cfg)
    target = cache_dir() / f"{name}-{size}px-{key}.arrow"
    target.parent.mkdir(parents=True, exist_ok=True)

    def decode(batch: dict[str, list]) -> dict[str, list]:
        pixels, errors = [], []
        for image in batch["image"]:
            try:
                array = np.asarray(resize(load_image(image["path"] or image["bytes"])), dtype=np.uint8)
                pixels.append(array.tobytes())
                errors.append("")
            except Exception as err:  # any decoder failure means "unreadable": keep going, report below
                pixels.append(b"")
                errors.append(f"{type(err).__name__}: {err}"[:200])
        return {"pixels": pixels, "error": errors, "path": [image["path"] for image in batch["image"]]}

    if num_proc is None:
        num_proc = min(2, os.cpu_count() or 1) if len(dataset) > 2000 else None
    cached = dataset.map(
        decode,
        batched=True,
        batch_size=64,
        writer_batch_size=256,
        remove_columns=["image"],
        features=Features({"label": dataset.features["label"], "pixels": Value("binary"), "error": Value("string"), "path": Value("string")}),
        cache_file_name=str(target),
        num_proc=num_proc,
        desc=f"Decoding and resizing {name} images to {size}px (once; cached in {target.parent})",
    )
    errors = cached["error"]
    bad = [i for i, e in enumerate(errors) if e]
    if bad:
        shown = "; ".join(f"{cached[i]['path']} ({errors[i]})" for i in bad[:20])
        more = f"; ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        logger.warning("Skipped %d unreadable image(s) in %s: %s%s", len(bad), name, shown, more)
        cached = cached.select([i for i, e in enumerate(errors) if not e])
    if len(cached) == 0:
        raise DataError(f"No readable images in the {name} split.")
    return cached


def cached_rows(
    images: Sequence[PIL.Image.Image], paths: Sequence[str], label: int, features: Features, pretrained_cfg: dict[str, Any]
) -> Dataset:
    """Images made in memory (slices cut from volumes) as rows of a cached split, all with one label."""
    resize = create_eval_transform(pretrained_cfg).resize
    pixels = [np.asarray(resize(image.convert("RGB")), dtype=np.uint8).tobytes() for image in images]
    rows = {"label": [label] * len(pixels), "pixels": pixels, "error": [""] * len(pixels), "path": list(paths)}
    return Dataset.from_dict(rows, features=features)


def split_train_validation(
    labels: Sequence[int], fraction: float, seed: int, groups: Sequence[Any] | None = None
) -> tuple[list[int], list[int]]:
    """Stratified split of indices into (train, validation), never separating members of a group.

    Without groups every image is its own group. Groups are assigned to their majority label and
    taken, in a seeded random order, into validation until each class holds ``fraction`` of its images.
    Raises DataError, naming the smallest class size that works, when no image would go to validation.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be between 0 and 1, got {fraction}")
    labels = np.asarray(labels)
    groups = list(range(len(labels))) if groups is None else list(groups)
    members: dict[Any, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    rng = np.random.default_rng(seed)
    validation: list[int] = []
    for label in np.unique(labels):
        quota = round(fraction * int((labels == label).sum()))
        owned = [g for g, idx in members.items() if np.bincount(labels[idx]).argmax() == label]
        taken = 0
        for g in rng.permutation(len(owned)):
            if taken >= quota:
                break
            group_indices = members[owned[g]]
            if taken + len(group_indices) > quota + max(1, quota // 20):
                continue  # a big group would overshoot the class quota; try smaller ones first
            validation.extend(group_indices)
            taken += len(group_indices)
    if not validation:
        raise DataError(_no_validation_message(labels, fraction))
    in_validation = set(validation)
    train = [i for i in range(len(labels)) if i not in in_validation]
    return train, sorted(validation)


def _smallest_class_with_validation(fraction: float) -> int:
    """The fewest images a class needs for ``fraction`` of it to round to one validation image."""
    n = 1
    while round(fraction * n) < 1:
        n += 1
    return n


def _no_validation_message(labels: np.ndarray, fraction: float) -> str:
    # Checkpoint evaluation, the calibration temperature and the domain check's threshold all come from
    # validation: without it a run could not finish, so it stops before it starts.
    largest = int(np.bincount(labels).max()) if len(labels) else 0
    needed = _smallest_class_with_validation(fraction)
    if largest >= needed:
        return (f"Training has no validation split: at --validation_fraction {fraction:g} every class's near-duplicate "
                "groups (kept whole) are too big for its share. Add images, or raise --validation_fraction.")
    message = (f"Training is too small for a validation split: at --validation_fraction {fraction:g} a class needs at "
               f"least {needed} images for one to go to validation, and the largest class here has {largest}. Add images")
    if not largest:
        return message + "."
    enough = next(percent / 100 for percent in range(1, 100) if round(percent / 100 * largest) >= 1)
    return message + f", or pass --validation_fraction {enough:g} or more."


def load_splits(
    data_dir: str | os.PathLike,
    pretrained_cfg: dict[str, Any],
    validation_fraction: float = 0.15,
    seed: int = 42,
    groups: dict[str, Any] | None = None,
    limit_per_class: int | None = None,
) -> DatasetDict:
    """``train`` / ``validation`` / ``test`` with cached, resized pixels.

    ``groups`` maps image paths to a group id (near-duplicate groups from the audit) so that no group
    straddles train and validation. ``limit_per_class`` keeps the first N images of each class per
    split (quick experiments and tests).
    """
    folders = load_image_folder(data_dir)
    if limit_per_class:
        folders = DatasetDict({s: first_per_class(d, limit_per_class) for s, d in folders.items()})
    train_full = cache_resized(folders["train"], pretrained_cfg, "train")
    test = cache_resized(folders["test"], pretrained_cfg, "test")
    paths = train_full["path"]
    group_ids = [groups.get(p, p) for p in paths] if groups else None
    train_idx, val_idx = split_train_validation(train_full["label"], validation_fraction, seed, group_ids)
    return DatasetDict(train=train_full.select(train_idx), validation=train_full.select(val_idx), test=test)


def first_per_class(dataset: Dataset, n: int) -> Dataset:
    """The first ``n`` rows of each label, in order."""
    counts: dict[int, int] = {}
    keep = []
    for i, label in enumerate(dataset["label"]):
        if counts.get(label, 0) < n:
            counts[label] = counts.get(label, 0) + 1
            keep.append(i)
    return dataset.select(keep)


def class_names(dataset: Dataset) -> list[str]:
    """The label names carried by a split's ClassLabel feature."""
    return list(dataset.features["label"].names)


# --------------------------------------------------------------------------- tensors for the model


def pixels_to_array(pixels: bytes, size: int) -> np.ndarray:
    """A cached row's bytes back to an HWC uint8 array."""
    return np.frombuffer(pixels, dtype=np.uint8).reshape(size, size, 3).copy()  # writable, for torch


def attach_transforms(
    dataset: Dataset, pretrained_cfg: dict[str, Any], augment: AugmentConfig | None = None
) -> Dataset:
    """Return a view of a cached split that yields ``pixel_values`` / ``labels`` for the model.

    With ``augment`` the training augmentation runs first, on the cached uint8 image; both paths then
    go through the same to-tensor-and-normalize half of the eval transform.
    """
    size = image_size_of(pretrained_cfg)
    to_tensor = create_eval_transform(pretrained_cfg).to_tensor
    random_aug = create_train_augment(augment, size) if augment is not None else None

    def transform(batch: dict[str, list]) -> dict[str, list]:
        arrays: Iterable[np.ndarray] = (pixels_to_array(p, size) for p in batch["pixels"])
        if random_aug is not None:
            arrays = (augment_array(a, random_aug) for a in arrays)
        return {"pixel_values": [to_tensor(a) for a in arrays], "labels": batch["label"]}

    return dataset.with_transform(transform, columns=["pixels", "label"])


def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack ``pixel_values`` and ``labels`` of a list of examples."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in batch]),
        "labels": torch.tensor([example["labels"] for example in batch], dtype=torch.long),
    }


def iterate_batches(dataset: Dataset, batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
    """Plain ordered batches of an ``attach_transforms`` view (evaluation needs no DataLoader)."""
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        yield {
            "pixel_values": torch.stack(rows["pixel_values"]),
            "labels": torch.tensor(rows["labels"], dtype=torch.long),
        }
