"""Model card rendering from a real evaluation, packaging, the push dry run, and the push at the HfApi boundary."""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard
from transformers import AutoModelForImageClassification

from conftest import BUNDLED_MODEL, CLASSES, REPO, SHARED_DATA, real_images
from hf_tumor.training.hub import CARD_TEMPLATE, PushError, card_inputs, package_model, push, serving_modules

REPO_ID = "someone/hf-tumor-test"


@pytest.fixture(scope="module")
def packaged(trained_model, tmp_path_factory):
    return package_model(trained_model, tmp_path_factory.mktemp("packaged") / "model", REPO_ID)


def _card_text(model_dir) -> str:
    """The card of ``model_dir`` rendered in memory (nothing written there)."""
    card_data, variables = card_inputs(model_dir, REPO_ID)
    return str(ModelCard.from_template(card_data, template_path=str(CARD_TEMPLATE), **variables))


def test_the_card_template_ships_in_the_package_and_model_card_md_is_the_bundled_card():
    import hf_tumor.training

    assert CARD_TEMPLATE.is_file() and CARD_TEMPLATE.parent.parent == Path(hf_tumor.training.__file__).resolve().parent
    assert "templates/*.md" in (REPO / "pyproject.toml").read_text()  # package data: installed packages render cards
    top_level = REPO / "model_card.md"
    assert top_level.is_symlink() and top_level.resolve() == (BUNDLED_MODEL / "README.md").resolve()
    assert "{{" not in top_level.read_text()


def test_card_links_the_space_and_the_dataset_and_says_what_is_out_of_scope():
    card_data, variables = card_inputs(BUNDLED_MODEL, REPO_ID, space_id="someone/tumor-space", dataset_id="org/audited")
    text = str(ModelCard.from_template(card_data, template_path=str(CARD_TEMPLATE), **variables))
    assert "https://huggingface.co/spaces/someone/tumor-space" in text
    assert card_data.datasets == ["org/audited"]
    uses = text.split("## Uses", 1)[1].split("\n## ", 1)[0]
    assert "**Out of scope**: diagnosis" in uses and "**In scope**" in uses
    bibtex = text.split("```bibtex", 1)[1].split("```", 1)[0]
    assert bibtex.count("@") == 3 and f"Model {REPO_ID}" in bibtex
    assert "transformers.js" not in text  # it does not run there (no timm_wrapper model type)
    assert "huggingface.co/spaces" not in _card_text(BUNDLED_MODEL)


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
    # the audited dataset on the Hub (`hf-tumor push-dataset`), not a Kaggle slug the Hub cannot resolve
    assert data.datasets == ["someone/brain-tumor-mri"]
    assert {r.dataset_type for r in data.eval_results} == {"someone/brain-tumor-mri"}
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
def test_dry_run_writes_exactly_what_would_be_uploaded(trained_model, tiny_data, tmp_path):
    assert any(p.name.startswith("checkpoint-") for p in trained_model.iterdir())  # a run folder, checkpoints and all
    with pytest.raises(PushError, match="--data_dir"):
        push(trained_model, REPO_ID, space_id="someone/hf-tumor-space", dry_run=tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    plan = push(trained_model, REPO_ID, space_id="someone/hf-tumor-space", dry_run=tmp_path / "out", data_dir=tiny_data)
    model_files = sorted(p.name for p in (tmp_path / "out" / "model").iterdir())
    assert model_files == sorted(plan.model_files)
    assert {"config.json", "model.safetensors", "README.md", "eval_results.json", "confusion_matrix.png"} <= set(model_files)
    assert not any(name.startswith("checkpoint") or name.endswith(".bin") for name in model_files)
    space = tmp_path / "out" / "space"
    # the Space's app and every hf_tumor module it imports
    imported = set(re.findall(r"^from hf_tumor\.([\w.]+) import", (REPO / "space" / "app.py").read_text(), re.M))
    assert imported and {"app.py", "README.md", "requirements.txt",
                         *(f"hf_tumor/{m.replace('.', '/')}.py" for m in imported)} <= set(plan.space_files)
    assert REPO_ID in (space / "README.md").read_text()


class _RecordingApi:
    """Stands in for the Hub's HTTP API at the HfApi boundary and records every call."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None, **_):
        self.token = token

    def whoami(self):
        self.calls.append(("whoami", {}))
        return {"name": "someone"}

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        oid = f"{len(self.calls):040d}"
        url = f"https://huggingface.co/{kwargs['repo_id']}/commit/{oid}"
        return CommitInfo(commit_url=url, commit_message="", commit_description="", oid=oid)

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, {**kwargs, "args": args}))
        return record


def test_push_uploads_model_and_space_without_leaking_the_token(monkeypatch, caplog, capsys, tiny_data):
    _RecordingApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", _RecordingApi)
    monkeypatch.setenv("HF_TOKEN", "hf_secretTOKEN123")
    with caplog.at_level(logging.DEBUG):
        plan = push(BUNDLED_MODEL, REPO_ID, space_id="someone/space", revision="v1", data_dir=tiny_data)
    names = [name for name, _ in _RecordingApi.calls]
    assert names == ["whoami", "create_repo", "create_branch", "upload_folder", "create_repo", "upload_folder",
                     "add_space_variable", "add_space_variable"]
    variables = [kw["args"] for name, kw in _RecordingApi.calls if name == "add_space_variable"]
    # the Space serves the model commit the push made, whatever lands on the model repo later
    model_commit = f"{names.index('upload_folder') + 1:040d}"
    assert plan.model_revision == model_commit
    assert variables == [("someone/space", "HF_TUMOR_MODEL", REPO_ID), ("someone/space", "HF_TUMOR_REVISION", model_commit)]
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hf_tumor_imports(path: Path) -> set[str]:
    """Every ``hf_tumor`` module a file imports, at its top or inside a function, read from the source."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hf_tumor":
            # `from hf_tumor.serving import scan` imports hf_tumor.serving.scan where that is a module
            found |= {f"{node.module}.{alias.name}" if (REPO / node.module.replace(".", "/") / f"{alias.name}.py").is_file()
                      else node.module for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "hf_tumor"}
    return found


def test_the_serving_path_imports_only_what_a_space_holds():
    """What a Space holds (hf_tumor's __init__, errors, contract and serving/) imports nothing from
    hf_tumor.training or hf_tumor.checks, and nothing of hf_tumor outside itself."""
    held = {("hf_tumor/" + name).removesuffix(".py").removesuffix("/__init__").replace("/", ".") for name in serving_modules()}
    assert {"hf_tumor", "hf_tumor.errors", "hf_tumor.contract", "hf_tumor.serving", "hf_tumor.serving.inference",
            "hf_tumor.serving.model", "hf_tumor.serving.scan"} <= held
    assert len(serving_modules()) == len(list((REPO / "hf_tumor" / "serving").glob("*.py"))) + 3
    for name in serving_modules():
        imported = _hf_tumor_imports(REPO / "hf_tumor" / name)
        assert not {m for m in imported if m.startswith(("hf_tumor.training", "hf_tumor.checks"))}, name
        assert imported <= held, (name, imported - held)
    # the parser sees what it must: training's own imports of both subpackages, at the top and inside functions
    train = _hf_tumor_imports(REPO / "hf_tumor" / "training" / "train.py")
    assert {"hf_tumor.training.data", "hf_tumor.checks.external", "hf_tumor.checks.patients"} <= train


@pytest.mark.slow
def test_the_staged_space_runs_as_the_hub_runs_it(tmp_path):
    """A dry-run push stages the Space; its card obeys the Spaces rules, it holds only serving code and
    leak-free examples, and its app.py, started from the staged folder with the environment a Space gets,
    binds 0.0.0.0 and answers /classify on its own examples as the library does."""
    import importlib.metadata
    import os
    import subprocess
    import sys
    import time

    import gradio
    import psutil
    from gradio_client import Client, handle_file
    from huggingface_hub import SpaceCard

    from hf_tumor.serving.inference import load_predictor
    from hf_tumor.training.audit import run_audit

    push(BUNDLED_MODEL, REPO_ID, space_id="someone/hf-tumor", dry_run=tmp_path / "out", data_dir=SHARED_DATA)
    space, model = tmp_path / "out" / "space", tmp_path / "out" / "model"
    card = SpaceCard.load(space / "README.md").data.to_dict()
    assert 0 < len(card["short_description"]) <= 60  # the Hub refuses longer ones
    assert card["sdk"] == "gradio" and card["sdk_version"] == gradio.__version__
    assert (space / card["app_file"]).is_file()
    assert card["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert card["models"] == [REPO_ID]
    for line in (space / "requirements.txt").read_text().splitlines():  # pinned to what is tested here
        if line and not line.startswith("#"):
            name, version = line.split("==")
            assert importlib.metadata.version(name) == version, line
    staged = sorted(str(p.relative_to(space / "hf_tumor")) for p in (space / "hf_tumor").rglob("*") if p.is_file())
    assert staged == serving_modules()
    assert {"__init__.py", "errors.py", "contract.py", "serving/__init__.py", "serving/inference.py"} <= set(staged)
    assert not [name for name in staged if name.startswith(("training/", "checks/")) or name == "cli.py"]
    examples = sorted(p.name for p in (space / "examples").iterdir())
    assert examples == ["glioma.jpg", "meningioma.jpg", "not-mri.jpg", "notumor.jpg", "pituitary.jpg"]
    clean = {(SHARED_DATA / p).read_bytes() for p in run_audit(SHARED_DATA)["clean_test"]["paths"]
             if Path(p).parent.name in CLASSES}
    assert all((space / "examples" / f"{c}.jpg").read_bytes() in clean for c in CLASSES)

    # the staged package is complete: importing the app from the staged folder loads only staged modules
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); import app; print('\\n'.join("
                            "m.__file__ for n, m in sys.modules.items() if n.startswith('hf_tumor')))"],
                           cwd=space, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert all(Path(f).resolve().is_relative_to(space.resolve()) for f in probe.stdout.split()), probe.stdout

    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(port), "SPACE_ID": "someone/hf-tumor",
           "SYSTEM": "spaces", "HF_TUMOR_MODEL": str(model), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(c.laddr.port == port for c in psutil.Process(server.pid).net_connections()):
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()[-3000:]
            time.sleep(1)
        # listening sockets only: Gradio's own start-up request to itself is an accepted connection on 127.0.0.1
        listening = [c for c in psutil.Process(server.pid).net_connections()
                     if c.laddr.port == port and c.status == psutil.CONN_LISTEN]
        assert {c.laddr.ip for c in listening} == {"0.0.0.0"}
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        library = load_predictor(model)
        for name in ("glioma", "not-mri"):
            example = space / "examples" / f"{name}.jpg"
            label, message = client.predict(handle_file(str(example)), api_name="/classify")
            expected = library.predict_files([example])[0]
            if expected.trusted:
                assert label["label"] == expected.label and message.startswith(f"Predicted: **{expected.label}**")
            else:
                assert "label" not in label or label["label"] is None
                assert message.startswith("⚠️")
        assert not expected.trusted  # the photograph is flagged
    finally:
        server.terminate()
        server.wait(timeout=30)
