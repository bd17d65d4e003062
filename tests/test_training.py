"""Training: the defaults are the bundled recipe, the argument files, and a real resnetv2_50 trained for a
few steps (the model folder, reloading, parity of every inference path, resuming, data parallel, the bare loop)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForImageClassification, pipeline

from conftest import BUNDLED_MODEL, CLASSES, REPO, TEST_IMAGE_SIZE, train_args
from hf_tumor.contract import training_split_settings
from hf_tumor.serving.inference import load_predictor
from hf_tumor.serving.model import load_model
from hf_tumor.training.data import attach_transforms, cache_resized, load_image_folder
from hf_tumor.training.evaluation import predict_logits
from hf_tumor.training.hub import card_inputs
from hf_tumor.training.train import parse_args, prepare_data, save_resolved_args

GPU_CONFIG = REPO / "configs" / "gpu-256.yaml"
# fields of train_args.json that say where and when a run was made, not what it trained
RUN_SPECIFIC = {"command", "versions", "hardware"}
PATHS = {("DataArguments", "data_dir"), ("TrainingArguments", "output_dir"), ("TrainingArguments", "logging_dir")}
def resolved_defaults(tmp_path: Path, argv: list[str]) -> dict:
    save_resolved_args(tmp_path, argv, *parse_args(argv))
    return json.loads((tmp_path / "train_args.json").read_text())


# --------------------------------------------------------------------------- arguments (fast)


def test_defaults_are_the_bundled_recipe(tmp_path: Path, monkeypatch):
    """A bare `hf-tumor train --init scratch` trains what is bundled: its resolved arguments equal the bundled
    run's in every field but paths, seed, where it ran and one declared difference: the defaults' healthy
    slices need PyPI packages only, the bundled run also cut the ITK head of a Debian package."""
    # --bf16 and --use_cpu follow the machine (native bf16? a GPU?). The bundled run was trained with bf16
    # autocast on a CPU with native bf16 (AVX512-BF16); probing as that machine compares those two fields
    # too, on any machine, instead of ignoring them.
    monkeypatch.setattr("hf_tumor.training.train.bf16_available", lambda: True)
    monkeypatch.setattr("hf_tumor.training.train.accelerator_available", lambda: False)
    bundled = json.loads((BUNDLED_MODEL / "train_args.json").read_text())
    mine = resolved_defaults(tmp_path, ["--init", "scratch", "--data_dir", "D", "--output_dir", "O"])

    def fields(resolved: dict) -> dict[tuple[str, ...], object]:
        flat = {}
        for key, value in resolved.items():
            if key in RUN_SPECIFIC:
                continue
            if isinstance(value, dict):
                flat.update({(key, name): v for name, v in value.items() if (key, name) not in PATHS})
            else:
                flat[(key,)] = value
        flat.pop(("TrainingArguments", "seed"))
        return flat

    ours, theirs = fields(mine), fields(bundled)
    # options added after the bundled run, absent from its record: each must default to off (cue_break_contrast
    # acts only through cue_break, which is off)
    newer = {
        ("DataArguments", "patient_sources"): [],
        ("DataArguments", "patients_dir"): None,
        ("AugmentConfig", "cue_break"): 0.0,
        ("AugmentConfig", "cue_break_contrast"): True,
    }
    assert set(ours) == set(theirs) | set(newer)
    assert {key: ours.pop(key) for key in newer} == newer
    differing = {key: (ours[key], theirs[key]) for key in ours if ours[key] != theirs[key]}
    assert differing == {("DataArguments", "healthy_sources"): (["mni152"], ["mni152", "itk_t1"])}, differing
    assert bundled["TrainingArguments"]["bf16"] is True and mine["TrainingArguments"]["bf16"] is True
    # --init is the one flag the recipe sets: the default stays timm's ImageNet weights from the Hub
    assert parse_args([])[1].init == "imagenet"
    # `--healthy_sources none` trains on the Kaggle folders alone
    assert parse_args(["--healthy_sources", "none"])[0].healthy_sources == []


def test_bundled_json_names_no_absolute_path():
    """What the repository ships names no directory of the machine that made it; the writer keeps it so."""
    from hf_tumor.training.evaluation import portable_path

    def strings(value):
        if isinstance(value, dict):
            yield from (s for v in value.values() for s in strings(v))
        elif isinstance(value, list):
            yield from (s for v in value for s in strings(v))
        elif isinstance(value, str):
            yield value

    files = sorted((REPO / "models").rglob("*.json"))
    assert BUNDLED_MODEL / "eval_results.json" in files and BUNDLED_MODEL / "onnx" / "parity.json" in files
    absolute = {f"{f.relative_to(REPO)}: {s}" for f in files for s in strings(json.loads(f.read_text()))
                if s.startswith(("/", "~")) or any(f" {root}" in s for root in ("/work/", "/root/", "/tmp/", "/home/"))}
    assert absolute == set()
    assert portable_path("../shared/data/brain-tumor-mri") == "../shared/data/brain-tumor-mri"
    assert portable_path("/work/shared/data/brain-tumor-mri") == "brain-tumor-mri"


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_config_files_only_override_defaults(config: Path):
    """Every file in configs/ parses, names only known arguments, and changes nothing it does not name."""
    values = yaml.safe_load(config.read_text())
    assert values, f"{config.name} overrides nothing"
    defaults = parse_args([])
    from_file = parse_args([str(config)])
    for default_group, file_group in zip(defaults, from_file):
        for name in (f.name for f in dataclasses.fields(file_group)):
            value = getattr(file_group, name)
            if name in values:
                assert value == values[name], name
                assert value != getattr(default_group, name), f"{config.name}: {name} repeats the default"
            elif name != "logging_dir":  # stamped with the time, where transformers has it
                assert value == getattr(default_group, name), name
    assert yaml.safe_load(GPU_CONFIG.read_text())["image_size"] == 256


def test_argument_file_with_overrides(tmp_path):
    args_file = tmp_path / "args.yaml"
    args_file.write_text("image_size: 96\nlearning_rate: 0.01\ninit: scratch\nrotation: 5\n")
    data_args, model_args, augment, training = parse_args([str(args_file), "--learning_rate", "0.02"])
    assert data_args.image_size == 96 and model_args.init == "scratch" and augment.rotation == 5
    assert training.learning_rate == 0.02
    args_file.write_text("imagesize: 96\n")
    with pytest.raises(SystemExit, match="unknown argument.*imagesize"):
        parse_args([str(args_file)])
    for removed in ("teachers", "distill_alpha", "earlier_stages"):
        args_file.write_text(f"{removed}: 1\n")
        with pytest.raises(SystemExit, match=f"unknown argument.*{removed}"):
            parse_args([str(args_file)])


def test_split_seed_draws_validation_apart_from_the_training_seed(tiny_data: Path, tmp_path: Path):
    def validation_paths(*flags: str) -> list[str]:
        data_args, model_args, _, training = parse_args(train_args(tiny_data, tmp_path / "run", *flags))
        return prepare_data(data_args, model_args, training).splits["validation"]["path"]

    assert validation_paths("--seed", "1") != validation_paths("--seed", "2")  # by default the seed draws both
    assert validation_paths("--seed", "1", "--split_seed", "2") == validation_paths("--seed", "2")
    # evaluation rebuilds the same split from the run's argument file
    for flags, expected in ((["--seed", "1", "--split_seed", "2"], 2), (["--seed", "1"], 1)):
        save_resolved_args(tmp_path, flags, *parse_args(train_args(tiny_data, tmp_path / "run", *flags)))
        assert training_split_settings(tmp_path)["split_seed"] == expected


@pytest.mark.parametrize("decay_everything", [False, True])
def test_weight_decay_exemptions(tmp_path: Path, decay_everything: bool):
    from transformers import TrainingArguments

    from hf_tumor.serving.model import create_model
    from hf_tumor.training.train import RecipeTrainer

    model = create_model("resnetv2_50", CLASSES, image_size=TEST_IMAGE_SIZE, init="scratch")
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.05, use_cpu=True, report_to="none")
    trainer = RecipeTrainer(model=model, args=args, decay_everything=decay_everything)
    groups = {group["weight_decay"]: group["params"] for group in trainer.create_optimizer().param_groups}
    decayed = {id(p) for p in groups[0.05]}
    names = {name: id(p) in decayed for name, p in model.named_parameters()}
    assert any(name.endswith("conv.weight") and names[name] for name in names)  # convs are always decayed
    # the Trainer exempts every bias (BatchNorm shifts included) and the final norm's weight; the recipe,
    # like a bare AdamW over model.parameters(), decays them all
    exempt = {name for name, is_decayed in names.items() if not is_decayed}
    if decay_everything:
        assert not exempt and len(groups.get(0.0, [])) == 0
    else:
        assert exempt == {n for n in names if n.endswith(".bias")} | {"timm_model.norm.weight"}


# --------------------------------------------------------------------------- a trained model (slow)


@pytest.mark.slow
def test_model_folder_is_complete(trained_model: Path, tiny_train_size: int):
    for name in ("config.json", "model.safetensors", "train_args.json", "trainer_state.json", "train_results.json",
                 "validation_results.json", "training_curves.png", "eval_results.json", "confusion_matrix.png"):
        assert (trained_model / name).is_file(), name
    assert not (trained_model / ".model-staging").exists()
    config = json.loads((trained_model / "config.json").read_text())
    assert config["label_names"] == CLASSES
    assert config["pretrained_cfg"]["input_size"] == [3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE]
    state = json.loads((trained_model / "trainer_state.json").read_text())
    assert state["global_step"] == 2 * math.ceil(tiny_train_size / 8)  # 2 epochs of batches of 8
    assert any("eval_f1_macro" in h for h in state["log_history"])
    assert state["best_metric"] is not None  # validation macro-F1 is tracked, though the last epoch is kept
    resolved = json.loads((trained_model / "train_args.json").read_text())
    assert resolved["ModelArguments"]["init"] == "scratch"
    assert resolved["TrainingArguments"]["lr_scheduler_type"] == "cosine"
    assert resolved["TrainingArguments"]["load_best_model_at_end"] is False
    # the folder holds the last epoch's weights: the final validation equals the last epoch's evaluation
    last_eval = [h for h in state["log_history"] if "eval_accuracy" in h][-1]
    validation = json.loads((trained_model / "validation_results.json").read_text())
    assert last_eval["step"] == state["global_step"]
    assert validation["validation_accuracy"] == pytest.approx(last_eval["eval_accuracy"])


@pytest.mark.slow
def test_eval_results(trained_model: Path, tiny_data: Path):
    from hf_tumor.training.audit import run_audit

    results = json.loads((trained_model / "eval_results.json").read_text())
    assert set(results["splits"]) == {"validation", "test", "clean_test"}
    # trained and evaluated with absolute paths: the folder names no directory of this machine
    assert results["model"] == trained_model.name and results["data_dir"] == tiny_data.name
    leaked = set(run_audit(tiny_data)["test_with_train_twin"]["paths"])
    n_clean = sum(f"Testing/{c}/{p.name}" not in leaked for c in CLASSES for p in (tiny_data / "Testing" / c).iterdir())
    assert results["splits"]["clean_test"]["num_images"] == n_clean
    for split in ("test", "clean_test"):
        r = results["splits"][split]
        assert r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1]
        assert set(r["calibration"]) == {"ece_before", "ece_after", "nll_before", "nll_after"}
        assert 0 <= r["nn_baseline"]["accuracy"] <= 1
    # the fitted temperature is folded into the saved weights and recorded in the config
    config = json.loads((trained_model / "config.json").read_text())
    assert config.get("calibration_temperature", 1.0) == pytest.approx(results["temperature"])
    for png in ("confusion_matrix_clean.png", "reliability_diagram.png"):
        assert (trained_model / png).stat().st_size > 1000
    test = results["splits"]["test"]
    assert test["num_images"] == 16
    assert 0 <= test["accuracy"] <= 1 and 0 <= test["f1_macro"] <= 1
    assert list(test["per_class"]) == CLASSES
    assert sum(test["per_class"][c]["support"] for c in CLASSES) == 16
    matrix = np.array(test["confusion_matrix"])
    assert matrix.shape == (4, 4) and matrix.sum() == 16
    assert np.isclose(np.trace(matrix) / 16, test["accuracy"])


@pytest.mark.slow
def test_loads_offline_with_pipeline_and_automodel_and_all_paths_agree(trained_model: Path, tiny_data: Path):
    model = AutoModelForImageClassification.from_pretrained(trained_model)
    assert model.config.id2label[2] == "notumor"
    test = cache_resized(load_image_folder(tiny_data)["test"], model.config.pretrained_cfg, "test")
    logits, _ = predict_logits(load_model(trained_model), attach_transforms(test, model.config.pretrained_cfg))
    evaluation_probs = torch.softmax(torch.from_numpy(logits), -1).numpy()

    paths = list(test["path"])
    plain = pipeline("image-classification", model=str(trained_model))
    pipeline_probs = np.array([[{s["label"]: s["score"] for s in out}[c] for c in CLASSES]
                               for out in plain(paths, top_k=None)])
    cli_probs = np.array([[p.probabilities[c] for c in CLASSES] for p in load_predictor(trained_model, "torch").predict_files(paths)])
    np.testing.assert_allclose(pipeline_probs, evaluation_probs, atol=1e-4)
    np.testing.assert_allclose(cli_probs, pipeline_probs, atol=1e-4)


@pytest.mark.slow
def test_the_gpu_config_trains(tiny_data: Path, tmp_path: Path):
    """configs/gpu-256.yaml, given first, trains a step; the test's flags keep it to a CPU-sized batch (and
    precise BN to 8 images, which at 256 px would cost more than the step) but leave its image size alone,
    so the model is a 256 px one."""
    from hf_tumor.training.train import main

    out = main([str(GPU_CONFIG), *train_args(tiny_data, tmp_path / "gpu", "--evaluate_test", "false", image_size=None),
                "--max_steps", "1", "--precise_bn_images", "8"])
    assert load_model(out).config.pretrained_cfg["input_size"] == [3, 256, 256]
    assert json.loads((out / "train_args.json").read_text())["DataArguments"]["image_size"] == 256
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint_in_the_precision_it_started_in(tiny_data: Path, tmp_path: Path):
    """A run restarted into its output folder resumes from its last checkpoint. --bf16 defaults to what the
    machine does natively: a run moved to a machine with another default is refused until --bf16 says which
    precision to go on in, and then goes on in it."""
    from hf_tumor.training.runtime import bf16_available
    from hf_tumor.training.train import main

    out = tmp_path / "run"
    steps = ["--evaluate_test", "False", "--save_strategy", "steps", "--save_steps", "3", "--eval_strategy", "steps", "--eval_steps", "3"]
    started_in = not bf16_available()  # what the other machine would have chosen
    main(train_args(tiny_data, out, *steps, "--max_steps", "3", "--bf16", str(started_in)))
    assert (out / "checkpoint-3").is_dir()

    with pytest.raises(SystemExit) as refused:
        main(train_args(tiny_data, out, *steps, "--max_steps", "6"))
    message = str(refused.value)
    assert str(out / "checkpoint-3") in message and f"--bf16 {started_in}" in message and f"--bf16 {not started_in}" in message
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3  # untouched

    main(train_args(tiny_data, out, *steps, "--max_steps", "6", "--bf16", str(not started_in)))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    first_logged_step = min(h["step"] for h in state["log_history"] if "loss" in h)
    assert first_logged_step == 2  # history carried over from the first run, not restarted
    recorded = json.loads((out / "train_args.json").read_text())
    assert recorded["TrainingArguments"]["bf16"] is (not started_in)


class _Messages(logging.Handler):
    """The messages of the records that reach a logger (training's setup_logging replaces the root's handlers)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _complete_checkpoint(checkpoint: Path) -> bool:
    """Whether the Trainer has finished writing ``checkpoint`` (trainer_state.json is written last)."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_and_finishes(tiny_data: Path, tmp_path: Path):
    """SIGKILL as soon as the first checkpoint is completely written, plus a checkpoint cut short while being
    written: running the same command again resumes from the last complete checkpoint and finishes."""
    out = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"),
           *train_args(tiny_data, out, "--evaluate_test", "False"), "--max_steps", "4", "--save_strategy", "steps",
           "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2"]
    log = tmp_path / "killed.log"
    with log.open("w") as stderr:
        run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 600
        while not _complete_checkpoint(out / "checkpoint-2"):
            assert run.poll() is None, f"the run ended before its first checkpoint: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint in 10 minutes"
            time.sleep(0.02)
        run.send_signal(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "model.safetensors").exists()  # no final model from a killed run
    complete = [p.name for p in out.glob("checkpoint-*") if _complete_checkpoint(p)]
    assert complete == ["checkpoint-2"]  # killed at the point chosen, before the next checkpoint
    cut = out / "checkpoint-4"  # as if killed while saving the next checkpoint
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(b"half a file")

    # the same command again; in this process, which has imported everything already
    from hf_tumor.cli import main as cli

    logged = _Messages()
    logging.getLogger("hf_tumor").addHandler(logged)
    try:
        assert cli(["train", *cmd[2:]]) == 0
    finally:
        logging.getLogger("hf_tumor").removeHandler(logged)
    assert f"resuming from {out / 'checkpoint-2'} (delete the output folder to start afresh)" in logged.messages
    assert any(m.startswith(f"skipping {cut}: incompletely written") for m in logged.messages)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    model = load_model(out)
    assert model(pixel_values=torch.zeros(1, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)).logits.shape == (1, 4)


@pytest.mark.slow
def test_two_process_data_parallel_on_cpu(tiny_data: Path, tmp_path: Path, tiny_train_size: int):
    """accelerate launch with 2 processes (torchrun + gloo on CPU) trains one model, each process on half the data."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "scripts" / "train.py"), *train_args(tiny_data, out, "--evaluate_test", "False",
                                                          "--per_device_train_batch_size", "4", "--num_train_epochs", "1")]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "train_results.json").read_text())
    assert metrics["world_size"] == 2
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == math.ceil(tiny_train_size / (2 * 4))  # one epoch, 2 processes x 4 images a step
    assert AutoModelForImageClassification.from_pretrained(out).config.num_labels == 4


@pytest.mark.slow
def test_bare_loop_control_experiment(tiny_data: Path, tmp_path: Path):
    from train_bare import main as train_bare

    out = tmp_path / "bare"
    # flags the loop ignores, set against what it does: train_args.json must record what it did
    ignored = ["--max_grad_norm", "1.0", "--load_best_model_at_end", "true", "--decay_norm_and_bias", "false",
               "--early_stopping_patience", "3", "--precise_bn_images", "64"]
    assert train_bare(train_args(tiny_data, out, "--num_train_epochs", "4", *ignored)) == 0
    history = json.loads((out / "train_results.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # it learns: measured 1.51-1.79 in the first epoch and 1.17-1.29 in the fourth over seeds 42, 1 and 2
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.1
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results["splits"]) == {"validation", "test", "clean_test"}
    # the folder holds the last epoch's weights: evaluation sees what the loop's last validation saw
    assert results["splits"]["validation"]["accuracy"] == pytest.approx(history[-1]["validation_accuracy"])
    resolved = json.loads((out / "train_args.json").read_text())
    assert resolved["command"].startswith("python scripts/train_bare.py ")
    # what the loop did, not the flags it ignored
    assert resolved["TrainingArguments"]["max_grad_norm"] == 0
    assert resolved["ModelArguments"]["decay_norm_and_bias"] is True and resolved["ModelArguments"]["precise_bn_images"] == 0
    assert resolved["ModelArguments"]["early_stopping_patience"] == 0
    assert resolved["TrainingArguments"]["load_best_model_at_end"] is False
    card_variables = card_inputs(out, "someone/bare")[1]
    assert ("weights kept", "the last epoch's") in card_variables["hyperparameters"]
    # no early stopping and no checkpoint choice: the card must not claim validation did either
    assert card_variables["validation_use"] == "calibration and the out-of-distribution threshold"
    assert load_model(out).config.label_names == CLASSES
    # no checkpoints to resume from, so a second run into the same folder refuses instead of overwriting
    weights = (out / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="already holds a model"):
        train_bare(train_args(tiny_data, out))
    assert (out / "model.safetensors").read_bytes() == weights


@pytest.mark.slow
def test_healthy_volume_slices_join_training_and_leave_the_external_report(tiny_data: Path, tmp_path: Path, tiny_train_size: int):
    """--healthy_sources: real slices of a package's healthy volume become notumor training rows (validation
    untouched), the run records it, and `hf-tumor external` then leaves that source out of the model's report."""
    pytest.importorskip("dipy")
    from hf_tumor.checks.external import available_sources, trained_on
    from hf_tumor.training.train import main

    flags = ["--healthy_sources", "dipy_s0", "--healthy_per_plane", "3", "--mri", "0.5"]
    data_args, model_args, _, training_args = parse_args(train_args(tiny_data, tmp_path / "sizes", *flags))
    splits = prepare_data(data_args, model_args, training_args).splits
    assert len(splits["train"]) == tiny_train_size + 3  # dipy_s0 is cut axially only
    extra = splits["train"].select(range(tiny_train_size, tiny_train_size + 3))
    assert set(extra["label"]) == {CLASSES.index("notumor")}
    assert all(p.startswith("external:dipy_s0/axial/") for p in extra["path"])
    assert not any(p.startswith("external:") for p in splits["validation"]["path"])

    out = main(train_args(tiny_data, tmp_path / "run", *flags, "--max_steps", "2", "--evaluate_test", "false"))
    assert trained_on(out) == ["dipy_s0"]
    assert json.loads((out / "train_args.json").read_text())["AugmentConfig"]["mri"] == 0.5
    report_file = tmp_path / "external.json"
    result = subprocess.run([sys.executable, "-m", "hf_tumor.cli", "external", "--model", str(out), "--backend", "torch",
                             "--output", str(report_file)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left out, the model was trained on their slices: dipy_s0" in result.stderr
    report = json.loads(report_file.read_text())
    assert report["trained_on"] == ["dipy_s0"]
    assert sorted(report["sources"]) == sorted(s for s in available_sources() if s != "dipy_s0")


@pytest.mark.slow
def test_bare_train_needs_pypi_packages_only(tiny_data: Path, tmp_path: Path, monkeypatch, capsys):
    """`hf-tumor train --init scratch --max_steps 1` with every other default (128 px, batch 32, the default
    healthy slices) trains and evaluates with the Debian ITK data absent; asking for it then says what to install."""
    from hf_tumor.checks.external import available_sources
    from hf_tumor.cli import main as cli

    monkeypatch.setattr("hf_tumor.checks.external.ITK_DATA", tmp_path / "no-insighttoolkit5-examples")
    assert "itk_t1" not in available_sources() and "mni152" in available_sources()
    out = tmp_path / "bare"
    assert cli(["train", "--init", "scratch", "--max_steps", "1", "--data_dir", str(tiny_data), "--output_dir", str(out)]) == 0
    resolved = json.loads((out / "train_args.json").read_text())
    assert resolved["DataArguments"]["healthy_sources"] == ["mni152"]
    assert resolved["DataArguments"]["image_size"] == 128 and resolved["TrainingArguments"]["per_device_train_batch_size"] == 32
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    assert json.loads((out / "eval_results.json").read_text())["splits"]["test"]["num_images"] == 4 * len(CLASSES)

    capsys.readouterr()
    opt_in = tmp_path / "with-itk"
    assert cli(["train", "--init", "scratch", "--max_steps", "1", "--healthy_sources", "mni152", "itk_t1",
                "--data_dir", str(tiny_data), "--output_dir", str(opt_in)]) == 2
    err = capsys.readouterr().err
    assert "itk_t1: apt-get install insighttoolkit5-examples" in err and "Traceback" not in err
    assert not (opt_in / "model.safetensors").exists()


def test_a_training_folder_too_small_for_validation_stops_with_the_minimum(tmp_path: Path, capsys):
    """10 real slices per class leave the default 5% validation split empty: a clear error naming the minimum
    and the way out, before any training, instead of the Trainer's KeyError at the first evaluation."""
    from conftest import make_subset
    from hf_tumor.cli import main as cli

    data = make_subset(tmp_path / "ten", 10, 2)
    out = tmp_path / "run"
    assert cli(["train", "--init", "scratch", "--max_steps", "1", "--data_dir", str(data), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert ("Training is too small for a validation split: at --validation_fraction 0.05 a class needs at least 11 "
            "images for one to go to validation, and the largest class here has 10. Add images, or pass "
            "--validation_fraction 0.06 or more.") in err
    assert "Traceback" not in err and not out.exists()
    # the way out it names works: one image of each class goes to validation
    data_args, model_args, _, training_args = parse_args(["--data_dir", str(data), "--output_dir", str(out),
                                                          "--healthy_sources", "none", "--validation_fraction", "0.06"])
    splits = prepare_data(data_args, model_args, training_args).splits
    assert sorted(splits["validation"]["label"]) == [0, 1, 2, 3] and len(splits["train"]) == 36
