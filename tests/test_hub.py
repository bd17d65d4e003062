"""Model card rendering from a real evaluation, packaging, the push dry run, and the push at the HfApi boundary."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForImageClassification

from conftest import CLASSES, real_images, train_args
from hf_tumor.hub import PushError, package_model, push

pytestmark = pytest.mark.slow
REPO_ID = "someone/hf-tumor-test"


@pytest.fixture(scope="module")
def packaged(trained_model, tmp_path_factory):
    return package_model(trained_model, tmp_path_factory.mktemp("packaged") / "model", REPO_ID)


def test_card_metadata_round_trip(packaged, trained_model):
    results = json.loads((trained_model / "eval_results.json").read_text())
    card = ModelCard.load(packaged / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert {"timm", "medical", "brain-mri"} <= set(data.tags)
    assert data.base_model is None  # trained from scratch
    values = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert values[("test", "accuracy")] == pytest.approx(results["splits"]["test"]["accuracy"], abs=1e-4)
    assert values[("test", "f1")] == pytest.approx(results["splits"]["test"]["f1_macro"], abs=1e-4)
    assert values[("clean_test", "accuracy")] == pytest.approx(results["splits"]["clean_test"]["accuracy"], abs=1e-4)
    text = card.text
    for needle in ("Not a medical device", "How to use", "Training data", "Training procedure", "Evaluation",
                   "Calibration", "Limitations", "How to reproduce", "Citation", f'model="{REPO_ID}"'):
        assert needle in text, needle
    assert f"{results['audit']['test_with_train_twin']} of its {results['audit']['num_images']['test']}" in text
    assert "{{" not in text and "}}" not in text
    clipping = json.loads((trained_model / "train_args.json").read_text())["TrainingArguments"]["max_grad_norm"]
    assert f"| gradient clipping (max norm) | {clipping or 'none'} |" in text
    assert "| weights kept | best validation macro-F1 |" in text and "the checkpoint with the best" in text
    assert "used for early stopping, checkpoint choice, calibration and the out-of-distribution threshold." in text


def test_packaged_weights_are_fp16_and_load_in_fp32_everywhere(packaged, trained_model):
    from safetensors import safe_open

    with safe_open(str(packaged / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if "num_batches" not in k} == {torch.float16}
    model = AutoModelForImageClassification.from_pretrained(packaged)
    assert model.dtype == torch.float32 and model.config.id2label[0] == CLASSES[0]
    original = AutoModelForImageClassification.from_pretrained(trained_model).eval()
    via_timm = timm.create_model(f"local-dir:{packaged}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = original(pixel_values=x).logits.softmax(-1)
        torch.testing.assert_close(model.eval()(pixel_values=x).logits.softmax(-1), reference, atol=2e-3, rtol=0)
        torch.testing.assert_close(via_timm(x).softmax(-1), reference, atol=2e-3, rtol=0)


def test_dry_run_writes_exactly_what_would_be_uploaded(trained_model, tmp_path):
    plan = push(trained_model, REPO_ID, space_id="someone/hf-tumor-space", dry_run=tmp_path / "out")
    model_files = sorted(p.name for p in (tmp_path / "out" / "model").iterdir())
    assert model_files == sorted(plan.model_files)
    assert {"config.json", "model.safetensors", "README.md", "eval_results.json", "confusion_matrix.png"} <= set(model_files)
    assert not any(name.startswith("checkpoint") or name.endswith(".bin") for name in model_files)
    space = tmp_path / "out" / "space"
    assert {"app.py", "README.md", "requirements.txt", "hf_tumor/app.py"} <= set(plan.space_files)
    assert REPO_ID in (space / "README.md").read_text()


class _RecordingApi:
    """Stands in for the Hub's HTTP API at the HfApi boundary and records every call."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None, **_):
        self.token = token

    def whoami(self):
        self.calls.append(("whoami", {}))
        return {"name": "someone"}

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, kwargs))
        return record


def test_push_uploads_model_and_space_without_leaking_the_token(trained_model, monkeypatch, caplog, capsys):
    _RecordingApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", _RecordingApi)
    monkeypatch.setenv("HF_TOKEN", "hf_secretTOKEN123")
    with caplog.at_level(logging.DEBUG):
        push(trained_model, REPO_ID, space_id="someone/space", revision="v1")
    names = [name for name, _ in _RecordingApi.calls]
    assert names == ["whoami", "create_repo", "create_branch", "upload_folder", "create_repo", "upload_folder",
                     "add_space_variable"]
    kinds = [kw.get("repo_type") for name, kw in _RecordingApi.calls if name == "upload_folder"]
    assert kinds == ["model", "space"]
    model_upload = next(kw for name, kw in _RecordingApi.calls if name == "upload_folder")
    assert "model.safetensors" in model_upload["allow_patterns"] and model_upload["revision"] == "v1"
    out = capsys.readouterr()
    assert "hf_secretTOKEN123" not in caplog.text + out.out + out.err


def test_push_without_token_or_network_uploads_nothing(trained_model, monkeypatch, tmp_path):
    _RecordingApi.calls = []
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login
    monkeypatch.setattr("huggingface_hub.HfApi", _RecordingApi)
    with pytest.raises(PushError, match="No Hugging Face token"):
        push(trained_model, REPO_ID)
    assert _RecordingApi.calls == []
    monkeypatch.setattr("huggingface_hub.HfApi", HfApi)  # the real client, offline: fails before uploading
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    with pytest.raises(PushError, match="Nothing was uploaded"):
        push(trained_model, REPO_ID)


def test_pipeline_on_the_packaged_model(packaged):
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(packaged))
    assert classify.model.dtype == torch.float32
    out = classify(str(real_images("Testing", "glioma", 1)[0]), top_k=None)
    assert sorted(s["label"] for s in out) == CLASSES


def test_a_model_trained_in_two_stages_records_and_describes_both(trained_model, tiny_data, tmp_path):
    """Stage 2 continues from stage 1's folder: its arguments name stage 1, and the card reproduces both."""
    from hf_tumor.training import main

    stage2 = main(train_args(tiny_data, tmp_path / "stage2", "--init", str(trained_model), "--max_steps", "2"))
    first = json.loads((trained_model / "train_args.json").read_text())
    second = json.loads((stage2 / "train_args.json").read_text())
    assert [stage["command"] for stage in second["earlier_stages"]] == [first["command"]]
    assert second["earlier_stages"][0]["init"] == "scratch" and second["earlier_stages"][0]["continued_from"] == str(trained_model)
    packaged = package_model(stage2, tmp_path / "packaged", REPO_ID)
    card = ModelCard.load(packaged / "README.md")
    assert card.data.base_model is None
    assert "trained from scratch in 2 stages" in card.text
    reproduce = card.text.split("## How to reproduce", 1)[1]
    assert reproduce.index(first["command"]) < reproduce.index(second["command"])
