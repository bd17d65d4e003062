"""Real tumour patients, whole scans through the serving path: does the model see the tumour, or say so?

The sibling of :mod:`hf_tumor.checks.external` (healthy heads only): real patients with a brain tumour, each
sequence (T1c, T1, T2, FLAIR) with and without skull where both exist, read exactly as ``hf-tumor
predict`` reads a volume (:func:`hf_tumor.serving.scan.load_scan`, :func:`hf_tumor.serving.scan.predict_scan`, axial,
with the edge flag and the domain check). Per scan it counts:

- lesion slices labelled the expected tumour class, another tumour class, flagged (no label), or
  missed ("notumor" with no flag); a metastasis (no class of its own) counts any tumour label;
- tumour-free slices of the same scan with an unflagged tumour label, and how many at >= 0.9.

A lesion slice holds >= ``LESION_VOXELS`` mask voxels (any label > 0: enhancing tumour, necrosis and
oedema alike); a tumour-free slice none; the slices between are left out of both. Patients without a
mask use a reading by eye (``READINGS``, written down with its reasons in docs/patients.md), whose
uncertain slices at the lesion's ends are left out the same way. Tumour-free slices are only those the
scan path cuts (the head's extent), so a blank slice beyond the head never counts as a correct answer.

A patient a model was trained on (its train_args.json, ``DataArguments.patient_sources``) says nothing
independent about it: it is run and reported apart, never in the headline.

The data are not in the repository: ``$HF_TUMOR_PATIENTS`` or ``<repo>/../shared/data`` holds
``tcga-lgg-fg-6692/`` and ``brats-samples/`` (each with its SOURCE.md, including the cases reserved
for independent checking, which this module never names or reads).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from hf_tumor.contract import ARGS_FILE, HEALTHY_LABEL, PATIENTS_FILE
from hf_tumor.errors import UserError
from hf_tumor.serving.inference import Predictor, load_predictor
from hf_tumor.serving.scan import ScanResult, index_ranges, load_scan, predict_scan
from hf_tumor.serving.volumes import PLANE_AXIS, load_nifti

logger = logging.getLogger("hf_tumor")

PATIENTS_ENV = "HF_TUMOR_PATIENTS"
LESION_VOXELS = 500  # fewer mask voxels than this (but some): the lesion's faint ends, left out of both counts
CONFIDENT = 0.9
SEQUENCES = ("t1c", "t1", "t2", "flair")
ANY_TUMOUR = "any tumour"  # the expected class of a metastasis: the four classes have none of its own
PLANE = "axial"  # the readings and masks are per axial slice; the scans were acquired (or resampled) axially

CLI_HELP = (
    "Classify every axial slice of real tumour patients' scans (TCGA-FG-6692, a lower-grade glioma with and "
    "without skull; six BraTS patients, skull-stripped: gliomas and a metastasis), each sequence (T1c, T1, T2, "
    "FLAIR) as a whole volume through the same path as `hf-tumor predict`, and report per scan how many lesion "
    "slices get the expected tumour label, another tumour label, a flag, or are missed (notumor with no flag), "
    "and how many tumour-free slices get an unflagged tumour label (and how many at >= 0.9). Lesion slices come "
    "from the tumour mask (>= 500 voxels) or, without one, from the reading in docs/patients.md. Patients the "
    "model was trained on (train_args.json, patient_sources) are reported apart, never in the headline. The "
    f"data folder: --data_dir, else ${PATIENTS_ENV}, else shared/data beside the repository."
)


class PatientDataError(UserError, ValueError):
    """The patients' folder, a patient or a file is missing or unusable (the message says what)."""


# --------------------------------------------------------------------------- what is evaluated


@dataclass(frozen=True)
class Reading:
    """A lesion's axial slices read by eye where no mask ships: ``lesion`` (first, last), and slice ranges
    too uncertain to call either way (the lesion's faint ends), left out of both counts."""

    lesion: tuple[int, int]
    uncertain: tuple[tuple[int, int], ...] = ()

    def role(self, index: int) -> str:
        if self.lesion[0] <= index <= self.lesion[1]:
            return "lesion"
        if any(a <= index <= b for a, b in self.uncertain):
            return "excluded"
        return "tumour_free"


@dataclass(frozen=True)
class Scan:
    """One volume of a patient: its sequence, whether the skull is in it, its file in the patient's folder."""

    sequence: str
    skull: bool
    file: str


@dataclass(frozen=True)
class Patient:
    """A real patient: where the files are, the class a lesion slice should get, and where the lesion is."""

    id: str
    folder: str  # under the data folder, or one level below (a collection's folder)
    diagnosis: str
    expected: str  # a class name, or ANY_TUMOUR
    scans: tuple[Scan, ...]
    mask: str | None = None  # a tumour mask on the scans' grid (any label > 0 is tumour)
    readings: Mapping[str, Reading] = field(default_factory=dict)  # sequence -> reading, where no mask ships

    def reading(self, sequence: str) -> Reading:
        return self.readings[sequence]


def _both_variants(files: Mapping[str, str]) -> tuple[Scan, ...]:
    return tuple(Scan(seq, skull, f"{'with-skull' if skull else 'skull-stripped'}/{files[seq]}")
                 for skull in (True, False) for seq in SEQUENCES if seq in files)


def _stripped(files: Mapping[str, str]) -> tuple[Scan, ...]:
    return tuple(Scan(seq, False, files[seq]) for seq in SEQUENCES if seq in files)


# Readings by eye (docs/patients.md says how each was made; axial index after nibabel.as_closest_canonical).
# TCGA-FG-6692's sequences are not co-registered and their headers do not line them up (T1/T1c against
# FLAIR/T2 differ by ~3 slices where the affines are followed, but by ~1 on the images), so each
# sequence has its own reading, each from its own images. The two BraTS cases are co-registered: one
# reading, from the FLAIR (the oedema, which the masks count as tumour too), serves every sequence.
_TCGA_T1 = Reading((15, 19), ((14, 14), (20, 20)))
_TCGA_T2 = Reading((14, 19), ((13, 13), (20, 20)))
_GLI = Reading((44, 102), ((38, 43), (103, 110)))
_METS = Reading((52, 120), ((44, 51), (121, 128)))
READINGS: dict[str, dict[str, Reading]] = {
    "TCGA-FG-6692": {"t1c": _TCGA_T1, "t1": _TCGA_T1, "t2": _TCGA_T2, "flair": _TCGA_T2},
    "BraTS-GLI-00001-000": dict.fromkeys(SEQUENCES, _GLI),
    "BraTS-METS-sample": dict.fromkeys(SEQUENCES, _METS),
}

_BRATS_2013 = {"t1c": "T1c_subtrMeanDivStd.nii.gz", "flair": "Flair_subtrMeanDivStd.nii.gz"}  # z-scored in the brain

PATIENTS: tuple[Patient, ...] = (
    Patient("TCGA-FG-6692", "tcga-lgg-fg-6692", "lower-grade glioma (TCGA-LGG)", "glioma",
            _both_variants({s: f"{s}.nii.gz" for s in SEQUENCES}), readings=READINGS["TCGA-FG-6692"]),
    Patient("BraTS2021_00006", "BraTS2021_00006", "glioma (BraTS 2021)", "glioma",
            _stripped({"t1c": "t1ce.nii.gz", "t1": "t1.nii.gz", "t2": "t2.nii.gz", "flair": "flair.nii.gz"}),
            mask="seg.nii.gz"),
    Patient("BraTS-GLI-00001-000", "BraTS-GLI-00001-000", "glioma (BraTS 2023)", "glioma",
            _stripped({"t1c": "t1c.nii.gz", "t1": "t1n.nii.gz", "t2": "t2w.nii.gz", "flair": "t2f.nii.gz"}),
            readings=READINGS["BraTS-GLI-00001-000"]),
    Patient("BraTS-METS-sample", "BraTS-METS-sample", "brain metastasis (BraTS-METS)", ANY_TUMOUR,
            _stripped({s: f"{s}.nii.gz" for s in SEQUENCES}), readings=READINGS["BraTS-METS-sample"]),
    *(Patient(f"brats_2013_pat000{n}_1", f"brats_2013_pat000{n}_1", "high-grade glioma (BRATS 2013)", "glioma",
              _stripped(_BRATS_2013), mask="OTMultiClass.nii.gz") for n in (1, 2, 3)),
)
PATIENT_IDS = tuple(p.id for p in PATIENTS)


# --------------------------------------------------------------------------- finding the data


def default_data_dir() -> Path:
    """``$HF_TUMOR_PATIENTS``, else ``shared/data`` beside the repository (where the project keeps them)."""
    env = os.environ.get(PATIENTS_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The patients' folder, which must exist; the error names the folder and where it was looked for."""
    if data_dir is not None:
        root, how = Path(data_dir), "the folder given"
    elif os.environ.get(PATIENTS_ENV):
        root, how = default_data_dir(), f"${PATIENTS_ENV}"
    else:
        root, how = default_data_dir(), f"the default: ${PATIENTS_ENV} is not set"
    if not root.is_dir():
        raise PatientDataError(
            f"the patients' data folder {root} ({how}) does not exist. It should hold tcga-lgg-fg-6692/ and "
            f"brats-samples/ (see docs/patients.md); pass --data_dir or set ${PATIENTS_ENV}.")
    return root


def patient_folder(root: Path, patient: Patient) -> Path | None:
    """``root/<folder>`` or ``root/<collection>/<folder>``."""
    for candidate in (root / patient.folder, *sorted(root.glob(f"*/{patient.folder}"))):
        if candidate.is_dir():
            return candidate
    return None


def select_patients(names: Sequence[str] | None = None) -> list[Patient]:
    """The named patients (ids or folder names, any case), or all of them."""
    if names is None:
        return list(PATIENTS)
    chosen = []
    for name in names:
        match = [p for p in PATIENTS if _key(name) in (_key(p.id), _key(p.folder))]
        if not match:
            raise PatientDataError(f"unknown patient {name!r}; known: {', '.join(PATIENT_IDS)}")
        chosen += [p for p in match if p not in chosen]
    return chosen


def _key(name: str) -> str:
    """A patient named by id, folder name or path, compared without case."""
    return Path(str(name).rstrip("/")).name.lower()


# --------------------------------------------------------------------------- which patients a model saw


def trained_patients(model_dir: str | os.PathLike) -> list[str]:
    """The patient sources a model was trained on: ``DataArguments.patient_sources`` in its train_args.json.

    The contract for training code: a list of patient ids or folder names (a path's last part counts).
    A missing file, key or null is no patient; a single string is one; anything else is an error, since
    guessing "none" would put a trained-on patient in the headline.
    """
    path = Path(model_dir) / ARGS_FILE
    if not path.is_file():
        return []
    try:
        args = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PatientDataError(f"{path}: not readable JSON ({error}); cannot tell which patients the model "
                               "was trained on") from error
    if not isinstance(args, dict):
        raise PatientDataError(f"{path}: not a JSON object; cannot tell which patients the model was trained on")
    data_args = args.get("DataArguments")
    sources = data_args.get("patient_sources") if isinstance(data_args, dict) else None
    if sources is None:
        sources = args.get("patient_sources")  # a flat argument file
    if sources is None:
        return []
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise PatientDataError(f"{path}: patient_sources should be a list of patient ids, got {sources!r}")
    return [s for s in sources if s.strip() and s.strip().lower() != "none"]


def is_trained_on(patient: Patient, trained: Sequence[str]) -> bool:
    keys = {_key(s) for s in trained}
    return _key(patient.id) in keys or _key(patient.folder) in keys


# --------------------------------------------------------------------------- one scan


def _flag_kind(flag: str) -> str:
    if flag.startswith("near "):
        return "edge"
    if flag.startswith("unlike the slices"):
        return "energy"
    if flag.startswith("this does not look like"):
        return "image"
    return "other"


def _canonical_affine(path: Path) -> np.ndarray:
    return nib.as_closest_canonical(nib.load(path)).affine  # headers only: the voxels stay on disk


def mask_voxels(mask_path: Path, image_path: Path, shape: tuple[int, ...], label: str) -> np.ndarray:
    """Tumour voxels (label > 0) per axial slice of the mask, indexed as the scan's slices are.

    Both files are made canonical by the same loader as the scan; the mask must then have the scan's
    shape and affine, or its slice ``i`` is not the scan's slice ``i``.
    """
    mask = load_nifti(mask_path, name=label)
    if mask.data.shape != tuple(shape):
        raise PatientDataError(f"{label}: the mask has shape {mask.data.shape}, the scan {tuple(shape)}; "
                               "it must be on the scan's grid")
    if not np.allclose(_canonical_affine(mask_path), _canonical_affine(image_path), atol=1e-2):
        raise PatientDataError(f"{label}: the mask's affine differs from the scan's; it must be on the scan's grid")
    axis = PLANE_AXIS[PLANE]
    return (mask.data > 0).sum(axis=tuple(a for a in range(3) if a != axis))


def role_of(voxels: int) -> str:
    """A masked slice's role: a lesion slice, a tumour-free one, or the lesion's faint ends (left out of both)."""
    if voxels >= LESION_VOXELS:
        return "lesion"
    return "tumour_free" if voxels == 0 else "excluded"


def score_scan(result: ScanResult, roles: Mapping[int, str], expected: str, confident: float = CONFIDENT,
               voxels: np.ndarray | None = None) -> dict[str, Any]:
    """Count one scan's answers: ``roles`` maps every axial index of the volume to 'lesion', 'tumour_free'
    or 'excluded'; lesion slices the scan path did not cut (outside the head's extent) are 'not_cut'."""
    tumour_classes = [c for c in result.class_names if c != HEALTHY_LABEL]
    if expected != ANY_TUMOUR and expected not in tumour_classes:
        raise ValueError(f"expected class {expected!r} is not one of the tumour classes {tumour_classes}")
    lesion = {"slices": 0, "expected": 0, "other_tumour": 0, "flagged": 0, "missed": 0, "not_cut": 0}
    free = {"slices": 0, "notumor": 0, "tumour": 0, "tumour_confident": 0, "flagged": 0}
    at: dict[str, list[int]] = {"expected": [], "other_tumour": [], "flagged": [], "missed": [], "not_cut": [],
                                "tumour_free_tumour": []}
    other_labels: dict[str, int] = {}
    per_slice = []
    cut = {s.slice.index for s in result.slices}
    for s in result.slices:
        index, p = s.slice.index, s.prediction
        role = roles[index]
        probability = p.probabilities[p.label]
        entry: dict[str, Any] = {"index": index, "level": round(s.slice.level, 3), "role": role, "label": p.label,
                                 "probability": round(probability, 4),
                                 "flags": sorted({_flag_kind(f) for f in p.flags})}
        if voxels is not None:
            entry["mask_voxels"] = int(voxels[index])
        per_slice.append(entry)
        if role == "lesion":
            lesion["slices"] += 1
            if not p.trusted:
                kind = "flagged"
            elif p.label == HEALTHY_LABEL:
                kind = "missed"
            elif expected in (ANY_TUMOUR, p.label):
                kind = "expected"
            else:
                kind = "other_tumour"
                other_labels[p.label] = other_labels.get(p.label, 0) + 1
            lesion[kind] += 1
            at[kind].append(index)
        elif role == "tumour_free":
            free["slices"] += 1
            if not p.trusted:
                free["flagged"] += 1
            elif p.label == HEALTHY_LABEL:
                free["notumor"] += 1
            else:
                free["tumour"] += 1
                free["tumour_confident"] += probability >= confident
                at["tumour_free_tumour"].append(index)
    for index, role in roles.items():
        if role == "lesion" and index not in cut:
            lesion["slices"] += 1
            lesion["not_cut"] += 1
            at["not_cut"].append(index)
    summary = result.summary()
    return {
        "head_indices": summary["head_indices"],
        "slices_cut": summary["slices"],
        "lesion": {**lesion, "other_labels": other_labels,
                   "at": {k: index_ranges(v) for k, v in at.items() if k != "tumour_free_tumour"}},
        "tumour_free": {**free, "tumour_at": index_ranges(at["tumour_free_tumour"])},
        "excluded": sum(1 for s in result.slices if roles[s.slice.index] == "excluded"),
        "per_slice": per_slice,
    }


def evaluate_scan(predictor: Predictor, root: Path, patient: Patient, scan: Scan, *, trained: bool = False,
                  confident: float = CONFIDENT, batch_size: int = 32) -> dict[str, Any]:
    """One volume of one patient through ``load_scan`` and ``predict_scan`` (axial), scored."""
    folder = patient_folder(root, patient)
    if folder is None:
        raise PatientDataError(f"patient {patient.id}: no folder {patient.folder!r} in {root} or one level below")
    path = folder / scan.file
    label = f"{patient.id}/{scan.file}"
    volume = load_scan(path, name=label)
    result = predict_scan(predictor, volume, PLANE, batch_size)
    depth = volume.data.shape[PLANE_AXIS[PLANE]]
    if patient.mask:
        voxels = mask_voxels(folder / patient.mask, path, volume.data.shape, f"{patient.id}/{patient.mask}")
        roles = {i: role_of(int(voxels[i])) for i in range(depth)}
        source = f"mask (>= {LESION_VOXELS} voxels)"
    else:
        reading = patient.reading(scan.sequence)
        if reading.lesion[1] >= depth:
            raise PatientDataError(f"{label}: the reading's lesion slices {reading.lesion} lie beyond the scan's "
                                   f"{depth} axial slices")
        voxels = None
        roles = {i: reading.role(i) for i in range(depth)}
        source = "reading"
    scored = score_scan(result, roles, patient.expected, confident, voxels)
    return {"patient": patient.id, "diagnosis": patient.diagnosis, "sequence": scan.sequence,
            "skull": "with skull" if scan.skull else "skull-stripped", "file": f"{patient.folder}/{scan.file}",
            "lesion_from": source, "expected": patient.expected, "trained_on": trained,
            "shape": list(volume.data.shape), "voxel_mm": [round(z, 3) for z in volume.zooms], **scored}


# --------------------------------------------------------------------------- the suite


def _totals(scans: Sequence[dict[str, Any]]) -> dict[str, Any]:
    lesion_keys = ("slices", "expected", "other_tumour", "flagged", "missed", "not_cut")
    free_keys = ("slices", "notumor", "tumour", "tumour_confident", "flagged")
    lesion = {k: sum(s["lesion"][k] for s in scans) for k in lesion_keys}
    free = {k: sum(s["tumour_free"][k] for s in scans) for k in free_keys}
    return {"scans": len(scans), "lesion": lesion, "tumour_free": free,
            "missed_share": round(lesion["missed"] / lesion["slices"], 4) if lesion["slices"] else None}


def summarize(scans: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the held-out scans (the headline), by patient, and over trained-on scans apart."""
    held = [s for s in scans if not s["trained_on"]]
    trained = [s for s in scans if s["trained_on"]]
    patients = list(dict.fromkeys(s["patient"] for s in scans))
    return {
        "headline": _totals(held),
        "headline_with_mask": _totals([s for s in held if s["lesion_from"] != "reading"]),
        "headline_by_reading": _totals([s for s in held if s["lesion_from"] == "reading"]),
        "trained_on_totals": _totals(trained) if trained else None,
        "patients": {p: _totals([s for s in scans if s["patient"] == p]) | {"trained_on": any(
            s["trained_on"] for s in scans if s["patient"] == p)} for p in patients},
    }


def run_patients(model: str | os.PathLike | None = None, backend: str = "auto",
                 data_dir: str | os.PathLike | None = None, *, patients: Sequence[str] | None = None,
                 sequences: Sequence[str] | None = None, skull: bool | None = None, include_trained: bool = True,
                 confident: float = CONFIDENT, batch_size: int = 32, predictor: Predictor | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every selected patient x sequence x skull variant, as whole scans through the serving path.

    ``model``/``backend`` as ``hf-tumor predict`` takes them (default: the bundled model), or a loaded
    ``predictor``. ``patients`` (ids or folder names), ``sequences`` (of ``SEQUENCES``) and ``skull``
    (True: with skull only, False: skull-stripped only, None: both) narrow the suite. Patients the
    model was trained on run too but only count apart (``include_trained=False`` skips them). The data
    are checked before the model is loaded, so a missing folder fails at once.
    """
    root = resolve_data_dir(data_dir)
    chosen = select_patients(patients)
    seqs = tuple(SEQUENCES if sequences is None else sequences)
    unknown = [s for s in seqs if s not in SEQUENCES]
    if unknown:
        raise PatientDataError(f"unknown sequence(s) {unknown}; choose from {', '.join(SEQUENCES)}")
    plan = [(p, s) for p in chosen for s in p.scans if s.sequence in seqs and (skull is None or s.skull == skull)]
    if not plan:
        raise PatientDataError("no scan left to run: the chosen patients have none of the chosen sequences and "
                               "skull variants")
    missing = []
    for patient, scan in plan:
        folder = patient_folder(root, patient)
        if folder is None:
            missing.append(f"{patient.id} (no folder {patient.folder!r})")
        else:
            missing += [f"{patient.id}: {folder / name}" for name in (scan.file, patient.mask) if name
                        and not (folder / name).is_file()]
    if missing:
        raise PatientDataError(f"missing in the patients' folder {root}: " + "; ".join(dict.fromkeys(missing))
                               + ". Choose the patients that are present (--patients), or restore the files "
                               "(their SOURCE.md says where from).")
    if predictor is None:
        from hf_tumor.serving.inference import default_model

        predictor = load_predictor(model if model is not None else default_model(), backend)
    trained = trained_patients(predictor.model_dir)
    scans = []
    for patient, scan in plan:
        seen = is_trained_on(patient, trained)
        if seen and not include_trained:
            continue
        if progress:
            progress(f"{patient.id} {scan.sequence} {'with skull' if scan.skull else 'skull-stripped'}")
        scans.append(evaluate_scan(predictor, root, patient, scan, trained=seen, confident=confident,
                                   batch_size=batch_size))
    local = Path(predictor.source).exists()
    return {
        "model": os.path.relpath(predictor.source) if local else predictor.source,
        "backend": predictor.backend,
        "plane": PLANE,
        "lesion_voxels": LESION_VOXELS,
        "confident": confident,
        "readings": {p.id: {seq: {"lesion": list(r.lesion), "uncertain": [list(u) for u in r.uncertain]}
                            for seq, r in p.readings.items()} for p in chosen if not p.mask},
        "trained_on": trained,
        **summarize(scans),
        "scans": scans,
    }


# --------------------------------------------------------------------------- output


def _count(n: int, total: int) -> str:
    return f"{n}" if not total else f"{n} ({100 * n / total:.0f}%)"


def _table(scans: Sequence[dict[str, Any]]) -> list[str]:
    head = ("patient", "sequence", "skull", "lesion from", "lesion slices", "expected class", "other tumour",
            "flagged", "missed", "missed at", "tumour-free slices", "tumour label (unflagged)", ">= confident",
            "tumour at")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in scans:
        les, free = s["lesion"], s["tumour_free"]
        other = ", ".join(f"{k} {v}" for k, v in les["other_labels"].items())
        missed = les["missed"] + les["not_cut"]
        cells = (s["patient"], s["sequence"], s["skull"], s["lesion_from"].split(" ")[0], str(les["slices"]),
                 f"{les['expected']}" + (" (any)" if s["expected"] == ANY_TUMOUR else ""),
                 f"{les['other_tumour']}" + (f" ({other})" if other else ""), str(les["flagged"]),
                 f"**{missed}**" if missed else "0", les["at"]["missed"] or "-", str(free["slices"]),
                 str(free["tumour"]), f"**{free['tumour_confident']}**" if free["tumour_confident"] else "0",
                 free["tumour_at"] or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _headline(name: str, totals: dict[str, Any], confident: float) -> str:
    les, free = totals["lesion"], totals["tumour_free"]
    n = les["slices"]
    not_cut = f", {les['not_cut']} outside the cut head" if les["not_cut"] else ""
    return (f"{name} ({totals['scans']} scans): {_count(les['missed'], n)} of {n} lesion slices missed "
            f"(notumor, no flag){not_cut}; {_count(les['expected'], n)} the expected class, "
            f"{_count(les['other_tumour'], n)} another tumour class, {_count(les['flagged'], n)} flagged. "
            f"Tumour-free slices: {free['tumour']} of {free['slices']} with an unflagged tumour label, "
            f"{free['tumour_confident']} of them >= {confident:g}.")


def format_table(report: dict[str, Any]) -> str:
    """The report as markdown: the held-out scans' table and headline, then the trained-on ones apart."""
    confident = report["confident"]
    held = [s for s in report["scans"] if not s["trained_on"]]
    trained = [s for s in report["scans"] if s["trained_on"]]
    lines = [f"Model {report['model']}, backend {report['backend']}; whole scans, {report['plane']} slices, as "
             "`hf-tumor predict` reads a volume. Lesion slices: mask >= "
             f"{report['lesion_voxels']} voxels, or the reading in docs/patients.md; \"missed\" = notumor with no "
             f"flag; \"tumour label\" on tumour-free slices = unflagged, \">= confident\" at >= {confident:g}.", ""]
    if held:
        lines += ["**Held-out patients**", "", *_table(held), "",
                  "- " + _headline("Headline, held-out patients", report["headline"], confident),
                  "- " + _headline("with a mask", report["headline_with_mask"], confident),
                  "- " + _headline("with a reading", report["headline_by_reading"], confident)]
    else:
        lines.append("No held-out patient was run.")
    if trained:
        lines += ["", f"**Trained on** ({ARGS_FILE} lists {', '.join(report['trained_on'])}; not in the "
                  "headline: these say nothing independent about this model)", "", *_table(trained), "",
                  "- " + _headline("Trained-on patients", report["trained_on_totals"], confident)]
    return "\n".join(lines)


def write_report(report: dict[str, Any], model_dir: str | os.PathLike) -> Path:
    """``patients_results.json`` in the model folder (beside external_results.json); returns its path."""
    path = Path(model_dir) / PATIENTS_FILE
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path
