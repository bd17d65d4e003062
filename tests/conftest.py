"""Shared fixtures: small real subsets of the Kaggle data (symlinked from ../shared) and a tiny trained model."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Set before anything imports datasets/transformers: nothing is downloaded, caches are private to this run.
os.environ["HF_HUB_OFFLINE"] = "1"
_TMP = Path(tempfile.mkdtemp(prefix="hf_tumor_tests_"))
os.environ["HF_TUMOR_CACHE"] = str(_TMP / "hf_tumor_cache")
os.environ["HF_DATASETS_CACHE"] = str(_TMP / "datasets_cache")
os.environ.pop("HF_TUMOR_DATA", None)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HF_TUMOR_TEST_DATA", REPO.parent / "shared" / "data" / "brain-tumor-mri"))
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
BUNDLED_MODEL = REPO / "models" / "resnetv2_50-scratch-128"
# scripts/ is not installed: the tests import the benchmark library (benchlib, and its browser harness)
# and the bare training loop (train_bare) from there, as the scripts beside them do
sys.path.insert(0, str(REPO / "scripts"))
TEST_IMAGE_SIZE = 64
# Set by `make test` (and so CI): a test that would skip for want of a program, a package or data (chromium,
# npm, the ITK example volume, an optional Python package) fails instead, so that nothing is left out unseen.
REQUIRE_ALL = os.environ.get("HF_TUMOR_REQUIRE_ALL") == "1"


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return f"{longrepr[2].removeprefix('Skipped: ')} ({longrepr[0]}:{longrepr[1]})"
    return str(longrepr)


def _skip_to_failure(report) -> None:
    report.outcome = "failed"
    report.longrepr = (f"skipped under HF_TUMOR_REQUIRE_ALL=1 (make test runs every test): {_skip_reason(report.longrepr)}; "
                       "`make system-deps` installs chromium, npm and the ITK data, `make setup` the Python packages")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        _skip_to_failure(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    if REQUIRE_ALL and report.skipped:  # a module-level importorskip
        _skip_to_failure(report)


def real_images(split: str, cls: str, n: int) -> list[Path]:
    """The first ``n`` real images of a class in the shared copy of the dataset."""
    folder = SHARED_DATA / split / cls
    if not folder.is_dir():
        pytest.fail(f"test data missing: {folder} (the shared copy of the Kaggle dataset)")
    return sorted(folder.iterdir())[:n]


def make_subset(root: Path, train_per_class: int, test_per_class: int) -> Path:
    """A folder in the Kaggle layout whose files are symlinks to real images (nothing is copied)."""
    for split, n in (("Training", train_per_class), ("Testing", test_per_class)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for image in real_images(split, cls, n):
                (root / split / cls / image.name).symlink_to(image)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """12 training and 4 test images per class, real MRI slices."""
    return make_subset(tmp_path_factory.mktemp("tiny_data"), 12, 4)


def train_args(data_dir: Path, output_dir: Path, *extra: str, image_size: int | None = TEST_IMAGE_SIZE) -> list[str]:
    """Flags for a few quick training steps of resnetv2_50 at 64 px, from scratch, on the Kaggle folders
    alone (the recipe's 96 healthy slices would outnumber a tiny subset; the tests of that option pass
    their own); everything else is the default recipe. ``image_size=None`` leaves the size to the
    defaults or to an argument file given first."""
    size = ["--image_size", str(image_size)] if image_size is not None else []
    return [
        "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--init", "scratch", *size,
        "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
        "--warmup_steps", "2", "--logging_steps", "2", "--dataloader_num_workers", "0",
        "--healthy_sources", "none", *extra,
    ]


@pytest.fixture(scope="session")
def tiny_train_size(tiny_data, tmp_path_factory) -> int:
    """How many of ``tiny_data``'s images the default recipe trains on (the rest is validation)."""
    from hf_tumor.training.train import parse_args, prepare_data

    data_args, model_args, _, training_args = parse_args(train_args(tiny_data, tmp_path_factory.mktemp("sizes")))
    return len(prepare_data(data_args, model_args, training_args).splits["train"])


@pytest.fixture(scope="session")
def trained_model(tiny_data, tmp_path_factory) -> Path:
    """A resnetv2_50 model folder trained for 2 epochs by the real training entry point, then evaluated."""
    from hf_tumor.training.train import main

    return main(train_args(tiny_data, tmp_path_factory.mktemp("model") / "run"))


@pytest.fixture(scope="session")
def slice_image():
    """One real meningioma slice as a PIL image."""
    import PIL.Image

    return PIL.Image.open(real_images("Testing", "meningioma", 1)[0])
