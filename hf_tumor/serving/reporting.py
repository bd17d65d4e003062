"""Answers as people read them, for the app and the CLI: the verdict sentence, the batch table and its
CSV, and the model's own test figures."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from hf_tumor.contract import EVAL_RESULTS_FILE
from hf_tumor.serving.inference import Prediction


def verdict(prediction: Prediction) -> str:
    """The sentence shown under the probabilities."""
    if prediction.flags:
        return "⚠️ " + "; ".join(prediction.flags) + ". The label is not meaningful."
    return f"Predicted: **{prediction.label}** ({prediction.probabilities[prediction.label]:.1%})."


def batch_table(predictions: list[Prediction], class_names: list[str]) -> tuple[list[str], list[list[Any]], str]:
    """Header, rows (file, label, probabilities, note) and the same as CSV text. A flagged image gets no label."""
    header = ["file", "label", *class_names, "note"]
    rows = []
    for p in predictions:
        name = Path(p.path or "").name
        if p.error:
            rows.append([name, "", *([None] * len(class_names)), p.error])
        else:
            rows.append([name, p.label if p.trusted else "", *(round(p.probabilities[c], 4) for c in class_names),
                         "; ".join(p.flags)])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return header, rows, buffer.getvalue()


def model_summary(model_dir: str | os.PathLike) -> dict[str, float]:
    """Official and leak-free test accuracy from the model folder's eval_results.json, if it is local."""
    results_file = Path(model_dir) / EVAL_RESULTS_FILE
    if not results_file.is_file():
        return {}
    splits = json.loads(results_file.read_text())["splits"]
    return {name: splits[name]["accuracy"] for name in ("test", "clean_test") if name in splits}


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process; returns whether it applied (glibc only).

    Gradio serves requests from a pool of threads, and glibc gives each its own arena: under 16 clients
    the server's memory grew 14% in 60 s without the cap (docs/benchmarks.md). Same as MALLOC_ARENA_MAX=2.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-8, arenas))  # -8: M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to cap
        return False


class OutputFolder:
    """Where the app writes files for download (batch CSVs), swept as it goes and removed at exit.

    Gradio copies a returned file into its own cache (which ``delete_cache`` sweeps), so the file we
    wrote would otherwise stay in a temporary folder for good, and it names the uploaded files.
    """

    def __init__(self, max_age_s: float = 600.0):
        self._folder = tempfile.TemporaryDirectory(prefix="hf-tumor-")  # removed at exit, even on errors
        self.path = Path(self._folder.name)
        self.max_age_s = max_age_s

    def write(self, name: str, text: str) -> Path:
        """Write ``text`` as ``name`` in a fresh sub-folder; first delete what is older than ``max_age_s``."""
        self.sweep()
        target = self.path / uuid.uuid4().hex / name
        target.parent.mkdir()
        target.write_text(text)
        return target

    def sweep(self) -> int:
        """Delete the files (and their sub-folders) older than ``max_age_s``; return how many."""
        cutoff, removed = time.time() - self.max_age_s, 0
        for sub in list(self.path.iterdir()):
            files = list(sub.iterdir()) if sub.is_dir() else [sub]
            if all(f.stat().st_mtime < cutoff for f in files):
                for f in files:
                    f.unlink(missing_ok=True)
                    removed += 1
                if sub.is_dir():
                    sub.rmdir()
        return removed

    def close(self) -> None:
        self._folder.cleanup()
