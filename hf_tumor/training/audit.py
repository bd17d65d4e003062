"""Duplicate and leakage audit of the Training/Testing folders (``hf-tumor audit``).

Three levels of sameness, within and across splits:
- exact: the same bytes (sha256 of the file);
- pixel-identical: the same decoded RGB pixels (different files, e.g. re-saved with other metadata);
- near: Pearson correlation of small grayscale thumbnails at or above a threshold. Correlation is
  invariant to brightness/contrast changes and, on thumbnails, robust to re-encoding and resizing.

The report lists the groups (union of all near pairs, which contain the exact ones), the groups
whose members carry different labels, and the test images with a near twin in Training; the rest of
Testing is the leak-free "clean test" split. Thumbnails are cached, keyed like the image cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from hf_tumor.serving.preprocessing import load_image
from hf_tumor.training.data import SPLIT_DIRS, DataError, cache_dir, check_layout, image_files

logger = logging.getLogger("hf_tumor")

AUDIT_THUMB = 128  # near-duplicate measure: correlation of 128x128 grayscale thumbnails
NN_THUMB = 32  # the nearest-neighbour baseline looks up 32x32 thumbnails
DEFAULT_THRESHOLD = 0.99
_VERSION = 1


@dataclass
class Fingerprints:
    """Per-image hashes and grayscale thumbnails (flattened, float32) of every image, in ``paths`` order."""

    paths: list[str]  # relative to the data folder, e.g. "Training/glioma/Tr-gl_0001.jpg"
    labels: list[str]
    splits: list[str]  # "train" or "test"
    file_sha256: list[str]
    pixel_sha256: list[str]  # "" where the file could not be decoded
    audit_thumbs: np.ndarray  # (N, AUDIT_THUMB**2)
    nn_thumbs: np.ndarray  # (N, NN_THUMB**2)


def _fingerprint(path: str) -> tuple[str, str, np.ndarray, np.ndarray]:
    data = Path(path).read_bytes()
    file_hash = hashlib.sha256(data).hexdigest()
    try:
        image = load_image(data)
    except Exception:  # unreadable: no pixels; it joins no group (data loading reports it)
        return file_hash, "", np.zeros(AUDIT_THUMB**2, np.float32), np.zeros(NN_THUMB**2, np.float32)
    pixels = np.asarray(image)
    pixel_hash = hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest()
    gray = image.convert("L")
    thumbs = [np.asarray(gray.resize((s, s), PIL.Image.BILINEAR), np.float32).ravel() for s in (AUDIT_THUMB, NN_THUMB)]
    return file_hash, pixel_hash, thumbs[0], thumbs[1]


def fingerprints(data_dir: str | os.PathLike, workers: int | None = None) -> Fingerprints:
    """Hashes and thumbnails of every image under Training/ and Testing/, computed once and cached."""
    root = Path(data_dir).resolve()
    classes = check_layout(root)
    entries = [
        (split, cls, path)
        for split, folder in SPLIT_DIRS.items()
        for cls in classes
        for path in image_files(root / folder / cls)
    ]
    digest = hashlib.sha256(f"{_VERSION}:{AUDIT_THUMB}:{NN_THUMB}".encode())
    for _, _, path in entries:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    target = cache_dir() / f"fingerprints-{digest.hexdigest()[:16]}.npz"
    meta = {
        "paths": [str(p.relative_to(root)) for _, _, p in entries],
        "labels": [cls for _, cls, _ in entries],
        "splits": [split for split, _, _ in entries],
    }
    if target.is_file():
        stored = np.load(target)
        return Fingerprints(**meta, file_sha256=list(stored["file_sha256"]), pixel_sha256=list(stored["pixel_sha256"]),
                            audit_thumbs=stored["audit_thumbs"], nn_thumbs=stored["nn_thumbs"])

    workers = workers or min(2, os.cpu_count() or 1)
    paths = [str(p) for _, _, p in entries]
    with ProcessPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(_fingerprint, paths, chunksize=32), total=len(paths), desc="Fingerprinting images"))
    file_hashes, pixel_hashes, audit_thumbs, nn_thumbs = zip(*results)
    result = Fingerprints(**meta, file_sha256=list(file_hashes), pixel_sha256=list(pixel_hashes),
                          audit_thumbs=np.stack(audit_thumbs), nn_thumbs=np.stack(nn_thumbs))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial.npz")
    np.savez(partial, file_sha256=np.array(result.file_sha256), pixel_sha256=np.array(result.pixel_sha256),
             audit_thumbs=result.audit_thumbs, nn_thumbs=result.nn_thumbs)
    os.replace(partial, target)
    return result


def standardize(thumbs: np.ndarray) -> torch.Tensor:
    """Rows centred and scaled to unit norm, so that a dot product is the Pearson correlation."""
    x = torch.from_numpy(np.asarray(thumbs, np.float32))
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)


def correlated_pairs(a: torch.Tensor, b: torch.Tensor, threshold: float, same: bool, block: int = 1024) -> np.ndarray:
    """Index pairs (i, j) with corr(a_i, b_j) >= threshold; for ``same`` (a is b) only i < j."""
    pairs = []
    for start in range(0, len(a), block):
        corr = a[start : start + block] @ b.T
        rows, cols = torch.nonzero(corr >= threshold, as_tuple=True)
        rows = rows + start
        if same:
            keep = rows < cols
            rows, cols = rows[keep], cols[keep]
        pairs.append(torch.stack([rows, cols], 1))
    return torch.cat(pairs).numpy() if pairs else np.zeros((0, 2), np.int64)


def _union_groups(n: int, pairs: np.ndarray) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(int(i))] = find(int(j))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def _hash_groups(hashes: list[str]) -> list[list[int]]:
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if h:
            by_hash.setdefault(h, []).append(i)
    return sorted((g for g in by_hash.values() if len(g) > 1), key=lambda g: g[0])


def _describe(groups: list[list[int]], fp: Fingerprints) -> dict[str, Any]:
    per_split: dict[str, int] = {}
    for group in groups:
        for i in group[1:]:
            per_split[fp.splits[i]] = per_split.get(fp.splits[i], 0) + 1
    return {
        "num_groups": len(groups),
        "num_images_in_groups": sum(len(g) for g in groups),
        "num_redundant": sum(len(g) - 1 for g in groups),  # images beyond the first of each group
        "num_cross_split_groups": sum(len({fp.splits[i] for i in g}) > 1 for g in groups),
        "num_label_conflicts": sum(len({fp.labels[i] for i in g}) > 1 for g in groups),
        "groups": [[{"path": fp.paths[i], "label": fp.labels[i]} for i in g] for g in groups],
    }


def run_audit(data_dir: str | os.PathLike, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Audit a data folder; returns the JSON-ready report (see the module docstring)."""
    if not 0 < threshold <= 1:
        raise DataError(f"--threshold must be in (0, 1], got {threshold}")
    fp = fingerprints(data_dir)
    n = len(fp.paths)
    thumbs = standardize(fp.audit_thumbs)
    decoded = torch.tensor([bool(h) for h in fp.pixel_sha256])
    thumbs[~decoded] = 0  # undecodable images correlate with nothing
    near_pairs = correlated_pairs(thumbs, thumbs, threshold, same=True)
    near_groups = _union_groups(n, near_pairs)

    train_idx = [i for i in range(n) if fp.splits[i] == "train"]
    test_idx = [i for i in range(n) if fp.splits[i] == "test"]
    cross = correlated_pairs(thumbs[test_idx], thumbs[train_idx], threshold, same=False)
    leaked = sorted({test_idx[i] for i in cross[:, 0]})
    leaked_set = set(leaked)
    clean = [i for i in test_idx if i not in leaked_set]

    def per_class(indices: list[int]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for i in indices:
            counts[fp.labels[i]] = counts.get(fp.labels[i], 0) + 1
        return dict(sorted(counts.items()))

    exact = _describe(_hash_groups(fp.file_sha256), fp)
    pixel = _describe(_hash_groups(fp.pixel_sha256), fp)
    near = _describe(near_groups, fp)
    conflicts = [g for g in near["groups"] if len({m["label"] for m in g}) > 1]
    return {
        "version": _VERSION,
        "data_dir": str(Path(data_dir).resolve()),
        "measure": f"Pearson correlation of {AUDIT_THUMB}x{AUDIT_THUMB} grayscale thumbnails",
        "threshold": threshold,
        "num_images": {"train": len(train_idx), "test": len(test_idx)},
        "per_class": {"train": per_class(train_idx), "test": per_class(test_idx)},
        "unreadable": [fp.paths[i] for i in range(n) if not fp.pixel_sha256[i]],
        "exact_duplicates": exact,
        "pixel_duplicates": pixel,
        "near_duplicates": near,
        "label_conflicts": conflicts,
        "test_with_train_twin": {
            "count": len(leaked),
            "per_class": per_class(leaked),
            "exact": sum(
                any(fp.file_sha256[i] == fp.file_sha256[j] for j in train_idx) for i in leaked
            ) if leaked else 0,
            "paths": [fp.paths[i] for i in leaked],
        },
        "clean_test": {"count": len(clean), "per_class": per_class(clean), "paths": [fp.paths[i] for i in clean]},
    }


def train_groups(report: dict[str, Any], data_dir: str | os.PathLike) -> dict[str, str]:
    """Absolute Training image path -> near-duplicate group id, for the group-aware validation split."""
    root = Path(data_dir).resolve()
    groups: dict[str, str] = {}
    for number, group in enumerate(report["near_duplicates"]["groups"]):
        for member in group:
            if member["path"].startswith(SPLIT_DIRS["train"] + "/"):
                groups[str(root / member["path"])] = f"near-{number}"
    return groups


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    exact, pixel, near = report["exact_duplicates"], report["pixel_duplicates"], report["near_duplicates"]
    leak, clean = report["test_with_train_twin"], report["clean_test"]
    total_test = report["num_images"]["test"]
    return "\n".join([
        f"images: {report['num_images']['train']} train, {total_test} test; unreadable: {len(report['unreadable'])}",
        f"byte-identical: {exact['num_redundant']} redundant files in {exact['num_groups']} groups "
        f"({exact['num_label_conflicts']} with conflicting labels)",
        f"pixel-identical: {pixel['num_redundant']} redundant images in {pixel['num_groups']} groups",
        f"near-duplicates ({report['measure']} >= {report['threshold']}): {near['num_images_in_groups']} images in "
        f"{near['num_groups']} groups, {near['num_cross_split_groups']} spanning train and test, "
        f"{len(report['label_conflicts'])} with conflicting labels",
        f"test images with a near twin in Training: {leak['count']} of {total_test} "
        f"({leak['count'] / max(total_test, 1):.1%}; {leak['exact']} byte-identical)",
        f"clean test (no twin in Training): {clean['count']} images {clean['per_class']}",
    ])
