"""Prediction on image files through ``pipeline("image-classification")``: the path users and the app take."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import ImageClassificationPipeline, pipeline

from hf_tumor.model import class_names_of
from hf_tumor.preprocessing import load_image


@dataclass
class Prediction:
    """One file's result: the label and every class probability, or the reason it could not be read."""

    path: str
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def load_pipeline(model: str | os.PathLike, revision: str | None = None) -> ImageClassificationPipeline:
    """The image-classification pipeline for a model folder or Hub id, computing in fp32."""
    device = 0 if torch.cuda.is_available() else -1
    return pipeline("image-classification", model=str(model), revision=revision, dtype=torch.float32, device=device)


def predict_files(pipe: ImageClassificationPipeline, paths: list[str | os.PathLike], batch_size: int = 8) -> list[Prediction]:
    """Predict every readable file; unreadable ones get an error and do not stop the others."""
    results: list[Prediction] = []
    images, readable = [], []
    for path in paths:
        prediction = Prediction(path=str(path))
        results.append(prediction)
        try:
            if not Path(path).is_file():
                raise FileNotFoundError("no such file")
            images.append(load_image(Path(path)))
            readable.append(prediction)
        except Exception as err:  # any decoder failure: report it for this file and go on
            prediction.error = f"cannot read image ({type(err).__name__}: {err})".splitlines()[0][:300]
    names = class_names_of(pipe.model.config)
    if images:
        outputs = pipe(images, top_k=None, batch_size=batch_size)
        for prediction, scores in zip(readable, outputs):
            by_label = {s["label"]: float(s["score"]) for s in scores}
            prediction.probabilities = {name: by_label[name] for name in names}
            prediction.label = max(prediction.probabilities, key=prediction.probabilities.get)
    return results
