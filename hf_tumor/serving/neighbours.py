"""A domain check in the model's feature space: how far a slice lies from its nearest training slices.

The energy score sees inputs the classifier is unsure of; it cannot see a confident wrong answer. A
skull-stripped research scan called "notumor" at 0.99 is confident, yet its penultimate features lie
far from every training slice. The k-nearest-neighbour distance (Sun et al., 2022: cosine distance
to the k-th nearest of the normalised training features) measures exactly that, needs no
assumption about the features' distribution and is a few NumPy lines at serving time, so every
backend, the int8 one included, computes it without PyTorch.

The reference features and the threshold travel in the model folder (``domain_features.npz``); the
threshold is a quantile of the validation slices' distances, set by ``hf-tumor evaluate``.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hf_tumor.contract import FEATURES_FILE, ModelConfigError
from hf_tumor.errors import UserError

DEFAULT_K = 10
FLAG_RATE = 0.015  # share of validation slices flagged, beside the energy check's 1% (docs/experiments.md, candidate P2)


class NeighbourError(UserError, ValueError):
    """Too few training slices to fit the check."""


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (the pooled features of a ReLU network are all >= 0)."""
    x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_distances(reference: np.ndarray, features: np.ndarray, k: int = DEFAULT_K, exclude_self: bool = False) -> np.ndarray:
    """Cosine distance from each row of ``features`` to its ``k``-th nearest row of ``reference``
    (both normalised); ``exclude_self`` skips the nearest one (the row itself, when scoring the reference)."""
    ref = np.asarray(reference, dtype=np.float32)
    out = np.empty(len(features), dtype=np.float32)
    rank = k if exclude_self else k - 1
    for start in range(0, len(features), 256):  # bounded memory: 256 x N similarities at a time
        sims = normalise(features[start : start + 256]) @ ref.T
        kth = -np.partition(-sims, rank, axis=1)[:, rank]
        out[start : start + 256] = 1.0 - kth
    return out


@dataclass
class NeighbourCheck:
    """Reference features, k and the distance above which a slice is flagged."""

    reference: np.ndarray  # (N, D) float16, unit rows
    k: int
    threshold: float

    def distances(self, features: np.ndarray) -> np.ndarray:
        return knn_distances(self.reference, features, self.k)

    def save(self, model_dir: str | os.PathLike) -> Path:
        path = Path(model_dir) / FEATURES_FILE
        np.savez_compressed(path, reference=self.reference.astype(np.float16), k=np.int64(self.k),
                            threshold=np.float64(self.threshold))
        return path

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> "NeighbourCheck | None":
        """The model folder's check, or None for a folder without one (older models: energy only)."""
        path = Path(model_dir) / FEATURES_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                check = cls(data["reference"].astype(np.float32), int(data["k"]), float(data["threshold"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise ModelConfigError(f"{path} is not a readable neighbour check ({type(err).__name__}); "
                                   "re-run hf-tumor evaluate on the model folder") from err
        if check.reference.ndim != 2 or len(check.reference) <= check.k:
            raise ModelConfigError(f"{path} holds {len(check.reference)} reference slices for k = {check.k}; "
                                   "re-run hf-tumor evaluate on the model folder")
        return check


def fit(train_features: np.ndarray, validation_features: np.ndarray, k: int = DEFAULT_K,
        flag_rate: float = FLAG_RATE, max_reference: int = 2000, seed: int = 0) -> NeighbourCheck:
    """Keep up to ``max_reference`` training slices (drawn at random, seeded) as the reference, and put
    the threshold at the validation distances' ``1 - flag_rate`` quantile."""
    train = normalise(train_features)
    if len(train) <= k:
        raise NeighbourError(f"the neighbour check needs more than k = {k} training slices, got {len(train)}")
    if len(train) > max_reference:
        train = train[np.sort(np.random.default_rng(seed).choice(len(train), max_reference, replace=False))]
    reference = train.astype(np.float16).astype(np.float32)  # what the saved file holds, so the threshold fits it
    threshold = float(np.quantile(knn_distances(reference, validation_features, k), 1 - flag_rate))
    return NeighbourCheck(reference, k, threshold)
