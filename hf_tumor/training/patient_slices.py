"""Real patients with a tumour mask as training slices: the lesion's slices as tumour, the rest as healthy.

The Kaggle tumour classes are almost all post-contrast T1 with skull, its "no tumor" class other
sources and sequences, so a model trained on them alone learns the look of the source. Slices of
one patient's own scans, the lesion's slices labelled as the tumour and the tumour-free slices of
the same scans as healthy, differ only where the lesion is: the same scanner, sequence and
processing on both sides.

The patients are those of the real-patient evaluation (:mod:`hf_tumor.checks.patients`) that ship a mask;
a slice's role (lesion, tumour-free, or the lesion's faint ends, left out) is decided exactly as the
evaluation decides it, and slices are cut as ``hf-tumor predict`` cuts a scan, so training sees what
serving sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image

from hf_tumor.checks.patients import PLANE, PatientDataError, mask_voxels, patient_folder, resolve_data_dir, role_of, select_patients
from hf_tumor.serving.volumes import load_nifti, slices


@dataclass
class PatientSlice:
    patient: str
    sequence: str
    index: int
    lesion: bool
    label: str  # the class a lesion slice of this patient should get
    image: Image.Image


def collect(names: list[str], data_dir: str | os.PathLike | None = None) -> list[PatientSlice]:
    """Every lesion and tumour-free axial head slice of every scan of the named patients (with masks)."""
    root = resolve_data_dir(data_dir)
    found = []
    for patient in select_patients(names):
        if not patient.mask:
            raise PatientDataError(f"patient {patient.id} has no tumour mask; only masked patients can be training data")
        folder = patient_folder(root, patient)
        if folder is None:
            raise PatientDataError(f"patient {patient.id}: no folder {patient.folder} in {root}")
        for scan in patient.scans:
            path = folder / scan.file
            volume = load_nifti(path, name=f"{patient.id}/{scan.file}")
            voxels = mask_voxels(folder / patient.mask, path, volume.data.shape, f"{patient.id}/{patient.mask}")
            for s in slices(volume, PLANE):
                role = role_of(int(voxels[s.index]))
                if role != "excluded":
                    found.append(PatientSlice(patient.id, scan.sequence, s.index, role == "lesion", patient.expected, s.image))
    return found
