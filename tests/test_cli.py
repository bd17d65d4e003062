"""The hf-tumor command line on good and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CLASSES, real_images
from hostile_files import BAD, GOOD, build_all

pytestmark = pytest.mark.slow


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_tumor.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    text = root / "notes.jpg"
    text.write_text("this is not an image")
    truncated = root / "truncated.jpg"
    truncated.write_bytes(real_images("Testing", "glioma", 1)[0].read_bytes()[:300])
    return {"text": text, "truncated": truncated, "missing": root / "missing.png"}


def test_predict_good_and_bad_files(trained_model, bad_files):
    good = [str(p) for p in real_images("Testing", "pituitary", 2)]
    result = run_cli("predict", "--model", str(trained_model), good[0], *map(str, bad_files.values()), good[1])
    assert result.returncode == 1  # something failed
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(good[0]) and lines[1].startswith(good[1])
    for line in lines:
        assert all(c in line for c in CLASSES)
    errors = [e for e in result.stderr.splitlines() if ": error:" in e]
    assert len(errors) == 3 and "Traceback" not in result.stderr
    assert any("missing.png" in e and "no such file" in e.lower() for e in errors)


def test_predict_json(trained_model):
    image = str(real_images("Testing", "notumor", 1)[0])
    result = run_cli("predict", "--model", str(trained_model), "--json", image)
    assert result.returncode == 0
    record = json.loads(result.stdout)
    assert record["path"] == image and record["error"] is None
    # a real slice: no image-statistics flag (a 2-epoch model's feature-space check may still find it far)
    assert not any("does not look like a brain MRI slice" in f for f in record["flags"])
    assert list(record["probabilities"]) == CLASSES
    assert abs(sum(record["probabilities"].values()) - 1) < 1e-5
    assert record["label"] == max(record["probabilities"], key=record["probabilities"].get)


def test_evaluate_command(trained_model, tiny_data):
    result = run_cli("evaluate", "--model", str(trained_model), "--data_dir", str(tiny_data))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test accuracy" in result.stdout
    assert json.loads((trained_model / "eval_results.json").read_text())["splits"]["test"]["num_images"] == 16


def test_train_on_a_bad_folder_is_a_clear_error(tmp_path):
    result = run_cli("train", "--data_dir", str(tmp_path / "nope"), "--init", "scratch", "--output_dir", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_train_with_imagenet_offline_is_a_clear_error(tiny_data, tmp_path):
    result = run_cli("train", "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "o"), "--image_size", "64")
    assert result.returncode == 2
    assert "--init scratch" in result.stderr and "Traceback" not in result.stderr


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0 and "predict" in result.stdout and "train" in result.stdout


@pytest.fixture(scope="module")
def predicted_hostile(trained_model, tmp_path_factory, slice_image) -> tuple[dict[str, Path], dict[str, dict], str]:
    """`hf-tumor predict --json` run once over every good, odd and hostile file."""
    files = build_all(tmp_path_factory.mktemp("hostile"), slice_image)
    result = run_cli("predict", "--model", str(trained_model), "--json", *map(str, files.values()))
    records = {json.loads(line)["path"]: json.loads(line) for line in result.stdout.splitlines()}
    return files, records, result.stderr


@pytest.mark.parametrize("kind", [*GOOD, *BAD])
def test_predict_on_every_kind_of_file(kind, predicted_hostile):
    files, records, stderr = predicted_hostile
    record = records[str(files[kind])]
    assert "Traceback" not in stderr
    assert isinstance(record["flags"], list)
    if kind in GOOD:
        assert record["error"] is None and record["label"] in CLASSES
    else:
        assert record["label"] is None and BAD[kind][1] in record["error"]
