"""Whole scans: a NIfTI volume or a DICOM series in, one answer per slice and a scan summary out.

The volume is made canonical from its affine and cut along the chosen plane the way a viewer shows it
(:mod:`hf_tumor.serving.volumes`); every slice through the head goes through the same preprocessing, backend
and domain check as a single uploaded slice, in batches. A scan also says where each slice lies, so
slices near the ends of the head, where the training slices seldom lie and a tumour label is least
trustworthy, are flagged instead of labelled.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_tumor.contract import HEALTHY_LABEL
from hf_tumor.serving.dicom_series import read_series
from hf_tumor.serving.inference import Prediction, Predictor
from hf_tumor.serving.volumes import PLANES, Slice, Volume, VolumeError, level_band, load_nifti, slices, volume_from_image

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".mgz")
SCAN_SUFFIXES = (*NIFTI_SUFFIXES, ".zip")
MAX_SCAN_BYTES = 256 * 2**20  # a volume or zipped series; a 1 mm head is 10-40 MB
EDGES = {"axial": ("the skull base", "the vertex"), "coronal": ("the back of the head", "the front of the head"),
         "sagittal": ("the left side of the head", "the right side of the head")}
DISCLAIMER = "Per-slice answers of a research tool, not a diagnosis."
# A scan is judged only where most of its mid-head slices (where training slices lie) were labelled: a
# scan the model cannot judge gets no verdict rather than a "no tumour" made of the few slices it did label.
JUDGED_SHARE = 0.5


def is_scan(path: str | os.PathLike) -> bool:
    """A folder (a DICOM series) or a file named as a volume or a zipped series."""
    return Path(path).is_dir() or str(path).lower().endswith(SCAN_SUFFIXES)


def load_scan(source: str | os.PathLike | Sequence[str | os.PathLike], *, volume_index: int | None = None,
              series: int | None = None, name: str = "") -> Volume:
    """A NIfTI (or MGH) file, a DICOM folder or zip, or a list of DICOM files, as a canonical :class:`Volume`.

    Every problem (missing, truncated, 2-D, 4-D without ``volume_index``, several DICOM series without
    ``series``, absurd sizes, hostile zips) is a :class:`~hf_tumor.serving.volumes.VolumeError` saying what to do.
    """
    if not isinstance(source, (str, os.PathLike)):
        files = [Path(p) for p in source]
        if len(files) == 1:
            return load_scan(files[0], volume_index=volume_index, series=series, name=name)
        return volume_from_image(read_series(files, series, name or "series"), name=name or "series")
    path = Path(source)
    label = name or path.name
    if path.is_file():
        size = path.stat().st_size
        if size == 0:
            raise VolumeError(f"{label}: the file is empty")
        if size > MAX_SCAN_BYTES:
            raise VolumeError(f"{label}: the file is {size / 2**20:,.0f} MB; the limit is {MAX_SCAN_BYTES // 2**20} MB")
    if str(path).lower().endswith(NIFTI_SUFFIXES):
        return load_nifti(path, volume_index=volume_index, name=label)
    return volume_from_image(read_series(path, series, label), name=label)


def edge_flag(plane: str, level: float) -> list[str]:
    """A flag for a slice in the outer fifth of the head along ``plane``, where labels are unreliable."""
    band = level_band(level)
    if band == "middle":
        return []
    where = EDGES[plane][0 if band == "low" else 1]
    return [f"near {where} (level {level:.2f} of the head's extent): the slices this model was trained on "
            "seldom lie there, and its labels there are unreliable"]


@dataclass
class ScanSlice:
    """One slice of a scan as shown, and the model's answer for it."""

    slice: Slice
    prediction: Prediction

    def to_dict(self) -> dict[str, Any]:
        p = self.prediction
        return {"plane": self.slice.plane, "index": self.slice.index, "level": round(self.slice.level, 4),
                "label": p.label, "probabilities": p.probabilities, "flags": p.flags}

    def csv_row(self, class_names: Sequence[str]) -> list[str]:
        """plane, index, level, label (empty where flagged), the probabilities, the flags."""
        p = self.prediction
        return [self.slice.plane, str(self.slice.index), f"{self.slice.level:.4f}", p.label if p.trusted else "",
                *(f"{p.probabilities[c]:.4f}" for c in class_names), "; ".join(p.flags)]


@dataclass
class ScanResult:
    """Every slice through the head along one plane, with its answer."""

    name: str
    plane: str
    shape: tuple[int, int, int]
    zooms: tuple[float, float, float]
    class_names: list[str]
    slices: list[ScanSlice] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Which slices look like which class (labelled slices only), and how many were flagged."""
        labelled = [s for s in self.slices if s.prediction.trusted]
        classes = {}
        for name in self.class_names:
            hits = [s for s in labelled if s.prediction.label == name]
            entry: dict[str, Any] = {"slices": len(hits), "indices": index_ranges([s.slice.index for s in hits])}
            if hits:
                best = max(hits, key=lambda s: s.prediction.probabilities[name])
                entry |= {"max_probability": round(best.prediction.probabilities[name], 4), "at_index": best.slice.index}
            classes[name] = entry
        indices = [s.slice.index for s in self.slices]
        return {"verdict": self.verdict(), "name": self.name, "plane": self.plane, "shape": list(self.shape),
                "voxel_mm": [round(z, 3) for z in self.zooms], "slices": len(self.slices),
                "head_indices": [min(indices), max(indices)] if indices else [],
                "labelled": len(labelled), "flagged": len(self.slices) - len(labelled), "classes": classes}

    def verdict(self) -> dict[str, str]:
        """The scan in one sentence: ``kind`` is 'tumour_suspected', 'no_tumour_seen' or 'no_verdict', with the reason.

        A tumour label on any labelled slice makes the scan suspect. "No tumour seen" needs most of the
        mid-head slices labelled (``JUDGED_SHARE``): where the domain check flagged most of them, the scan
        is unlike the training slices and a "notumor" would be the confident wrong answer this tool must
        not give.
        """
        middle = [s for s in self.slices if level_band(s.slice.level) == "middle"]
        judged = [s for s in middle if s.prediction.trusted]
        tumour = [s for s in self.slices if s.prediction.trusted and s.prediction.label != HEALTHY_LABEL]
        if tumour:
            classes = sorted({s.prediction.label for s in tumour}, key=lambda c: -sum(s.prediction.label == c for s in tumour))
            text = (f"tumour suspected on slices {index_ranges([s.slice.index for s in tumour])} "
                    f"({', '.join(classes)}); {len(tumour)} of {len(self.slices)} slices")
            return {"kind": "tumour_suspected", "text": text,
                    "reason": "the model gives these slices a tumour label and no check flags them"}
        if not middle or len(judged) < JUDGED_SHARE * len(middle):
            return {"kind": "no_verdict",
                    "text": "this scan is unlike the slices the model was trained on: no verdict",
                    "reason": f"{len(middle) - len(judged)} of {len(middle)} mid-head slices are flagged "
                              "(sequence, processing or framing unlike the training slices)"}
        return {"kind": "no_tumour_seen",
                "text": f"no tumour seen on the {sum(s.prediction.trusted for s in self.slices)} labelled slices",
                "reason": f"{len(judged)} of {len(middle)} mid-head slices labelled, none with a tumour label; "
                          "flagged slices were not judged"}

    def plot_rows(self) -> list[dict[str, Any]]:
        """Long-form rows (slice, class, probability) for a line plot of each class along the scan."""
        return [{"slice": s.slice.index, "class": name, "probability": s.prediction.probabilities[name]}
                for s in self.slices for name in self.class_names]

    def csv_text(self) -> str:
        """One row per slice: index, level, label (empty where flagged), the probabilities, the flags."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["plane", "index", "level", "label", *self.class_names, "flags"])
        writer.writerows(s.csv_row(self.class_names) for s in self.slices)
        return buffer.getvalue()


def index_ranges(indices: Sequence[int]) -> str:
    """'12-15, 18, 20-21' for [12, 13, 14, 15, 18, 20, 21]."""
    ranges: list[list[int]] = []
    for i in sorted(indices):
        if ranges and i == ranges[-1][1] + 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges)


def predict_scan(predictor: Predictor, volume: Volume, plane: str = "axial", batch_size: int = 32) -> ScanResult:
    """Every slice through the head along ``plane``, classified in batches, with the edge flag added."""
    if plane not in PLANES:
        raise VolumeError(f"unknown plane {plane!r}; choose one of {', '.join(PLANES)}")
    cut = slices(volume, plane)  # type: ignore[arg-type]
    result = ScanResult(volume.name, plane, volume.data.shape, volume.zooms, predictor.class_names)
    for start in range(0, len(cut), batch_size):
        chunk = cut[start : start + batch_size]
        for s, prediction in zip(chunk, predictor.predict([s.image for s in chunk])):
            prediction.flags = edge_flag(plane, s.level) + prediction.flags
            result.slices.append(ScanSlice(s, prediction))
    return result


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as a headline and a few short lines, for the terminal and the app."""
    first, last = summary["head_indices"]
    lines = [f"{summary['name']}: {summary['slices']} {summary['plane']} slices through the head (index {first}-{last}), "
             f"voxels {' x '.join(f'{z:g}' for z in summary['voxel_mm'])} mm",
             f"verdict: {summary['verdict']['text']} ({summary['verdict']['reason']})",
             f"{summary['labelled']} labelled, {summary['flagged']} flagged (no label: see each slice's flags)"]
    if summary["verdict"]["kind"] == "no_verdict":  # said once at the top, instead of labels it cannot stand by
        return [*lines, DISCLAIMER]
    for name, entry in summary["classes"].items():
        if entry["slices"]:
            lines.append(f"{name}: {entry['slices']} slices ({entry['indices']}), "
                         f"highest {entry['max_probability']:.2f} at {entry['at_index']}")
    return [*lines, DISCLAIMER]


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as text: the headline, then one indented line each."""
    head, *rest = summary_lines(summary)
    return "\n".join([head, *(f"  {line}" for line in rest)])
