"""Is an input inside the model's domain? The checks shared by ``hf-tumor predict`` and the app.

A flag is a plain-language reason to distrust the label, never a diagnosis: image statistics catch
what is plainly no MRI slice (colour, blank, a white page, noise), and the energy score
(-logsumexp of the logits) catches inputs the classifier finds unlike its training slices. Its
threshold is the 99th percentile on validation slices, written by ``hf-tumor evaluate`` into
``config.json`` (``ood_energy_threshold``). Neither sees a confident wrong answer on a slice unlike
every training slice; the feature-space neighbour distance (:mod:`hf_tumor.serving.neighbours`) does, where
the model folder has its reference features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import PIL.Image

from hf_tumor.serving.neighbours import NeighbourCheck


def image_checks(image: PIL.Image.Image | np.ndarray) -> list[str]:
    """Reasons, from image statistics alone, why this does not look like a brain MRI slice.

    ``image``: a PIL image, or the model's input before normalization as (3, H, W) values in 0-255
    (what prediction has at hand already: resizing the upload again would cost more than the model's
    own preprocessing).
    """
    if isinstance(image, PIL.Image.Image):
        small = np.asarray(image.convert("RGB").resize((128, 128), PIL.Image.BILINEAR), dtype=np.float32)
    else:
        small = np.moveaxis(np.asarray(image, dtype=np.float32), 0, -1)
    reasons = []
    chroma = np.abs(small - small.mean(axis=2, keepdims=True)).mean()
    if chroma > 6:  # MRI slices are grayscale, even when stored as RGB (measured <= 2 on the dataset)
        reasons.append("it is a colour image (MRI slices are grayscale)")
    gray = small.mean(axis=2)
    if gray.std() < 4:
        reasons.append("it is blank or nearly uniform")
        return reasons
    # Thresholds set on the 5,712 Training slices (never on Testing) and offline non-MRI images: the
    # brightest training slice has 22% of its pixels above 200 (a page: 90%), the roughest a mean
    # neighbour difference of 0.58 standard deviations (noise: 0.95). A dark background is no test:
    # 1.8% of the training slices (cropped "no tumor" slices above all) have none.
    if (gray > 200).mean() > 0.5:
        reasons.append("it is mostly white, like a document or a page")
    roughness = (np.abs(np.diff(gray, axis=0)).mean() + np.abs(np.diff(gray, axis=1)).mean()) / (2 * gray.std())
    if roughness > 0.75:
        reasons.append("it looks like noise rather than anatomy")
    return reasons


def energy_scores(logits: np.ndarray) -> np.ndarray:
    """Energy score, -logsumexp(logits) per row: higher means less like the training data."""
    z = np.asarray(logits, np.float64)
    top = z.max(axis=1)
    return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def energy_threshold(validation_logits: np.ndarray, flag_rate: float = 0.01) -> float:
    """The energy above which an input is flagged: its (1 - flag_rate) quantile on validation slices."""
    return float(np.quantile(energy_scores(validation_logits), 1 - flag_rate))


@dataclass
class DomainCheck:
    """One model's checks: image statistics, and the energy threshold from its ``config.json`` (if any)."""

    energy_limit: float | None = None
    neighbours: NeighbourCheck | None = None

    @classmethod
    def of(cls, config: Any, neighbours: NeighbourCheck | None = None) -> "DomainCheck":
        return cls(getattr(config, "ood_energy_threshold", None), neighbours)

    def flags(self, images: Sequence[PIL.Image.Image | np.ndarray], logits: np.ndarray,
              features: np.ndarray | None = None) -> list[list[str]]:
        """Every reason to distrust each image's label (an empty list where nothing is wrong); ``images`` as
        ``image_checks`` takes them, ``features`` the pooled penultimate features (for the neighbour check)."""
        far = [False] * len(logits)
        if self.neighbours is not None and features is not None:
            far = list(self.neighbours.distances(features) > self.neighbours.threshold)
        flags = []
        for image, energy, unlike in zip(images, energy_scores(logits), far):
            reasons = [f"this does not look like a brain MRI slice: {r}" for r in image_checks(image)]
            if self.energy_limit is not None and energy > self.energy_limit:
                reasons.append("unlike the slices this model was trained on: its energy score is above the "
                               "99th percentile of validation slices")
            if unlike:
                reasons.append("unlike every slice this model was trained on: in the model's own features its "
                               "nearest training slices are far, so a confident answer here means nothing")
            flags.append(reasons)
        return flags
