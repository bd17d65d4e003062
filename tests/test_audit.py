"""The audit finds exactly what a test plants: copies, re-encodings, resizes, a label conflict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hf_tumor.training.audit import run_audit, summary, train_groups


def smooth_image(seed: int, size: int = 256) -> Image.Image:
    """A distinct grayscale image: seeded random 16x16 field, upsampled smoothly (JPEG-friendly)."""
    field = np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)
    return Image.fromarray(field, "L").resize((size, size), Image.BICUBIC)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("planted")
    for split in ("Training", "Testing"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
    seed = 0
    for split, n in (("Training", 6), ("Testing", 3)):
        for cls in ("a", "b"):
            for i in range(n):
                smooth_image(seed).save(root / split / cls / f"{cls}{i}.png")
                seed += 1
    train = root / "Training"
    # 1. byte-identical copy across splits
    (root / "Testing" / "a" / "copy.png").write_bytes((train / "a" / "a0.png").read_bytes())
    # 2. byte-identical copy inside Training under another label (a label conflict)
    (train / "b" / "conflict.png").write_bytes((train / "a" / "a1.png").read_bytes())
    # 3. the same pixels in another file format (pixel-identical, different bytes), inside Training
    Image.open(train / "b" / "b3.png").save(train / "b" / "b3-again.bmp")
    # 4. a JPEG re-encoding across splits
    Image.open(train / "b" / "b4.png").save(root / "Testing" / "b" / "reencoded.jpg", quality=70)
    # 5. a resized copy across splits
    Image.open(train / "a" / "a5.png").resize((150, 150), Image.BILINEAR).save(root / "Testing" / "a" / "resized.png")
    return root


def _group_paths(section: dict) -> list[set[str]]:
    return [{m["path"] for m in g} for g in section["groups"]]


def test_exact_pixel_and_near_duplicates(planted):
    report = run_audit(planted)
    assert report["num_images"] == {"train": 6 * 2 + 2, "test": 3 * 2 + 3}
    assert _group_paths(report["exact_duplicates"]) == [
        {"Training/a/a0.png", "Testing/a/copy.png"},
        {"Training/a/a1.png", "Training/b/conflict.png"},
    ]
    assert report["exact_duplicates"]["num_redundant"] == 2
    assert {"Training/b/b3.png", "Training/b/b3-again.bmp"} in _group_paths(report["pixel_duplicates"])
    assert report["pixel_duplicates"]["num_groups"] == 3
    near = _group_paths(report["near_duplicates"])
    assert len(near) == 5
    assert {"Training/b/b4.png", "Testing/b/reencoded.jpg"} in near
    assert {"Training/a/a5.png", "Testing/a/resized.png"} in near
    assert [{m["path"] for m in g} for g in report["label_conflicts"]] == [{"Training/a/a1.png", "Training/b/conflict.png"}]


def test_test_twins_and_clean_test(planted):
    report = run_audit(planted)
    twins = report["test_with_train_twin"]
    assert sorted(twins["paths"]) == ["Testing/a/copy.png", "Testing/a/resized.png", "Testing/b/reencoded.jpg"]
    assert twins["exact"] == 1
    assert report["clean_test"]["count"] == 6
    assert not set(report["clean_test"]["paths"]) & set(twins["paths"])
    assert "3 of 9" in summary(report)


def test_threshold_is_respected(planted):
    strict = run_audit(planted, threshold=1.0 - 1e-9)
    # only bit-exact pixel groups survive a threshold of (almost) 1; the JPEG re-encoding drops out
    assert "Testing/b/reencoded.jpg" not in strict["test_with_train_twin"]["paths"]
    with pytest.raises(ValueError, match="threshold"):
        run_audit(planted, threshold=1.5)


def test_train_groups_map_absolute_training_paths(planted):
    groups = train_groups(run_audit(planted), planted)
    root = planted.resolve()
    assert groups[str(root / "Training/a/a1.png")] == groups[str(root / "Training/b/conflict.png")]
    assert not any(p.startswith(str(root / "Testing")) for p in groups)


def test_audit_command_writes_report(planted, tmp_path):
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "hf_tumor.cli", "audit", "--data_dir", str(planted), "--output", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test images with a near twin in Training: 3 of 9" in result.stdout
    assert json.loads(out.read_text())["exact_duplicates"]["num_groups"] == 2


def test_a_bad_threshold_is_a_clear_error_on_the_command_line(planted, tmp_path):
    from hf_tumor.cli import main

    assert main(["audit", "--data_dir", str(planted), "--threshold", "0", "--output", str(tmp_path / "a.json")]) == 2
    assert not (tmp_path / "a.json").exists()
