"""Model card rendering from a real evaluation, packaging, the push dry run, and the push at the HfApi boundary."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForImageClassification

from conftest import BUNDLED_MODEL, CLASSES, REPO, real_images
from hf_tumor.hub import CARD_TEMPLATE, PushError, card_inputs, package_model, push

REPO_ID = "someone/hf-tumor-test"


@pytest.fixture(scope="module")
def packaged(trained_model, tmp_path_factory):
    return package_model(trained_model, tmp_path_factory.mktemp("packaged") / "model", REPO_ID)


def _card_text(model_dir) -> str:
    """The card of ``model_dir`` rendered in memory (nothing written there)."""
    card_data, variables = card_inputs(model_dir, REPO_ID)
    return str(ModelCard.from_template(card_data, template_path=str(CARD_TEMPLATE), **variables))


def test_the_card_template_ships_in_the_package_and_model_card_md_is_the_bundled_card():
    import hf_tumor

    assert CARD_TEMPLATE.is_file() and CARD_TEMPLATE.parent.parent == Path(hf_tumor.__file__).resolve().parent
    assert "templates/*.md" in (REPO / "pyproject.toml").read_text()  # package data: installed packages render cards
    top_level = REPO / "model_card.md"
    assert top_level.is_symlink() and top_level.resolve() == (BUNDLED_MODEL / "README.md").resolve()
    assert "{{" not in top_level.read_text()


def test_card_of_the_bundled_run_says_what_it_did(tmp_path):
    """The bundled run's files render a card that states its recipe; a run that kept its best checkpoint and
    stopped early says so instead."""
    args = json.loads((BUNDLED_MODEL / "train_args.json").read_text())
    text = _card_text(BUNDLED_MODEL)
    assert "{{" not in text and "}}" not in text and "{%" not in text
    for row in ("| initial weights | scratch |", "| image size | 128 |", "| gradient clipping (max norm) | none |",
                "| weights kept | the last epoch's |", "| early stopping patience | 0 |", "| bf16 autocast | True |"):
        assert row in text, row
    assert "the last epoch's weights kept" in text and "the checkpoint with the best" not in text
    assert "used for calibration and the out-of-distribution threshold." in text
    assert f"Hardware: {args['hardware']}." in text
    assert text.split("## How to reproduce", 1)[1].split("```bash\n", 1)[1].startswith(args["command"] + "\n")
    for gone in ("distillation", "stage", "reduced scale"):
        assert gone not in text, gone

    # the same run as if it had kept its best checkpoint with early stopping (only the argument file differs)
    for name in ("config.json", "trainer_state.json", "train_results.json", "eval_results.json"):
        shutil.copy2(BUNDLED_MODEL / name, tmp_path / name)
    args["TrainingArguments"]["load_best_model_at_end"] = True
    args["ModelArguments"]["early_stopping_patience"] = 5
    (tmp_path / "train_args.json").write_text(json.dumps(args))
    text = _card_text(tmp_path)
    assert "| weights kept | best validation macro-F1 |" in text and "the checkpoint with the best" in text
    assert "used for early stopping, checkpoint choice, calibration and the out-of-distribution threshold." in text


@pytest.mark.slow
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
    # the recipe's defaults: the last epoch kept, validation used for calibration only
    assert "| weights kept | the last epoch's |" in text and "the last epoch's weights kept" in text
    assert "used for calibration and the out-of-distribution threshold." in text


@pytest.mark.slow
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


@pytest.mark.slow
def test_dry_run_writes_exactly_what_would_be_uploaded(trained_model, tmp_path):
    assert any(p.name.startswith("checkpoint-") for p in trained_model.iterdir())  # a run folder, checkpoints and all
    plan = push(trained_model, REPO_ID, space_id="someone/hf-tumor-space", dry_run=tmp_path / "out")
    model_files = sorted(p.name for p in (tmp_path / "out" / "model").iterdir())
    assert model_files == sorted(plan.model_files)
    assert {"config.json", "model.safetensors", "README.md", "eval_results.json", "confusion_matrix.png"} <= set(model_files)
    assert not any(name.startswith("checkpoint") or name.endswith(".bin") for name in model_files)
    space = tmp_path / "out" / "space"
    # the Space's app and every hf_tumor module it imports
    imported = set(re.findall(r"^from hf_tumor\.(\w+) import", (REPO / "space" / "app.py").read_text(), re.M))
    assert imported and {"app.py", "README.md", "requirements.txt", *(f"hf_tumor/{m}.py" for m in imported)} <= set(plan.space_files)
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


def test_push_uploads_model_and_space_without_leaking_the_token(monkeypatch, caplog, capsys):
    _RecordingApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", _RecordingApi)
    monkeypatch.setenv("HF_TOKEN", "hf_secretTOKEN123")
    with caplog.at_level(logging.DEBUG):
        push(BUNDLED_MODEL, REPO_ID, space_id="someone/space", revision="v1")
    names = [name for name, _ in _RecordingApi.calls]
    assert names == ["whoami", "create_repo", "create_branch", "upload_folder", "create_repo", "upload_folder",
                     "add_space_variable"]
    kinds = [kw.get("repo_type") for name, kw in _RecordingApi.calls if name == "upload_folder"]
    assert kinds == ["model", "space"]
    model_upload = next(kw for name, kw in _RecordingApi.calls if name == "upload_folder")
    assert "model.safetensors" in model_upload["allow_patterns"] and model_upload["revision"] == "v1"
    out = capsys.readouterr()
    assert "hf_secretTOKEN123" not in caplog.text + out.out + out.err


def test_push_without_token_or_network_uploads_nothing(monkeypatch, tmp_path):
    _RecordingApi.calls = []
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login
    monkeypatch.setattr("huggingface_hub.HfApi", _RecordingApi)
    with pytest.raises(PushError, match="No Hugging Face token"):
        push(BUNDLED_MODEL, REPO_ID)
    assert _RecordingApi.calls == []
    monkeypatch.setattr("huggingface_hub.HfApi", HfApi)  # the real client, offline: fails before uploading
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    with pytest.raises(PushError, match="Nothing was uploaded"):
        push(BUNDLED_MODEL, REPO_ID)


@pytest.mark.slow
def test_pipeline_on_the_packaged_model(packaged):
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(packaged))
    assert classify.model.dtype == torch.float32
    out = classify(str(real_images("Testing", "glioma", 1)[0]), top_k=None)
    assert sorted(s["label"] for s in out) == CLASSES
