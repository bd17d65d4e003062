"""Data loading on folders the tests build: the layout checks, corrupt files, the cache, the splits."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CLASSES, TEST_IMAGE_SIZE, make_subset, real_images
from hf_tumor.serving.preprocessing import make_pretrained_cfg
from hf_tumor.training import data
from hf_tumor.training.data import DataError, check_layout, load_splits, resolve_data_dir, split_train_validation

CFG = make_pretrained_cfg("resnetv2_50", TEST_IMAGE_SIZE)


def test_classes_come_from_the_folders(tiny_data):
    assert check_layout(tiny_data) == CLASSES


def test_load_splits_stratified_and_cached(tiny_data):
    splits = load_splits(tiny_data, CFG, validation_fraction=0.25, seed=0)
    assert set(splits) == {"train", "validation", "test"}
    assert splits["train"].features["label"].names == CLASSES
    assert len(splits["test"]) == 4 * len(CLASSES)
    # stratified: 25% of 12 images = 3 per class in validation
    assert np.bincount(splits["validation"]["label"]).tolist() == [3, 3, 3, 3]
    assert not set(splits["train"]["path"]) & set(splits["validation"]["path"])
    # cached rows hold the resized RGB image
    row = splits["train"][0]
    assert len(row["pixels"]) == TEST_IMAGE_SIZE * TEST_IMAGE_SIZE * 3
    cache_files = sorted(Path(os.environ["HF_TUMOR_CACHE"]).glob("*.arrow"))
    assert cache_files, "decoded images were not cached"
    mtimes = [f.stat().st_mtime_ns for f in cache_files]
    again = load_splits(tiny_data, CFG, validation_fraction=0.25, seed=0)
    assert [f.stat().st_mtime_ns for f in cache_files] == mtimes, "second load rebuilt the cache"
    assert again["validation"]["path"] == splits["validation"]["path"], "split is not reproducible"


def test_corrupt_images_are_skipped_with_one_warning(tmp_path, caplog):
    root = make_subset(tmp_path / "d", 3, 2)
    (root / "Training" / "glioma" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "Training" / "notumor" / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="hf_tumor"):
        splits = load_splits(root, CFG, validation_fraction=0.34, seed=0)
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1
    assert "Skipped 2 unreadable" in warnings[0] and "broken.jpg" in warnings[0] and "empty.png" in warnings[0]
    assert len(splits["train"]) + len(splits["validation"]) == 3 * len(CLASSES)


def _layout(root: Path, spec: dict[str, dict[str, int]]) -> Path:
    image = real_images("Training", "glioma", 1)[0]
    for split, classes in spec.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / cls / f"{i}.jpg").symlink_to(image)
    return root


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "does not exist"),
        ({"Training": {"a": 1, "b": 1}}, "has no Testing/ folder"),
        ({"Training": {"a": 1, "b": 1}, "Testing": {"a": 1, "c": 1}}, "different class folders"),
        ({"Training": {"a": 1, "b": 0}, "Testing": {"a": 1, "b": 1}}, "has no images"),
        ({"Training": {"a": 1}, "Testing": {"a": 1}}, "need at least 2"),
    ],
)
def test_bad_layouts_get_clear_errors(tmp_path, spec, expected):
    root = _layout(tmp_path / "data", spec) if spec else tmp_path / "missing"
    with pytest.raises(DataError, match=expected):
        check_layout(root)


def test_images_directly_in_split_folder(tmp_path):
    root = _layout(tmp_path, {"Training": {"a": 1, "b": 1}, "Testing": {"a": 1, "b": 1}})
    (root / "Testing" / "loose.jpg").symlink_to(real_images("Testing", "glioma", 1)[0])
    with pytest.raises(DataError, match="holds images directly.*one sub-folder per class"):
        check_layout(root)


def test_single_split_folder_gets_a_hint(tmp_path):
    root = _layout(tmp_path, {"Training": {"a": 2, "b": 2}})
    with pytest.raises(DataError, match="pass the folder above it"):
        check_layout(root / "Training")


def test_a_file_is_not_a_data_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        check_layout(tmp_path / "f")


def test_data_dir_resolution(tmp_path, monkeypatch):
    assert resolve_data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("HF_TUMOR_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("HF_TUMOR_DATA")
    # offline (HF_HUB_OFFLINE=1 in tests) or without kagglehub: fails at once and says how to pass a folder
    with pytest.raises(DataError, match="--data_dir"):
        resolve_data_dir(None)


def test_split_is_stratified_and_keeps_groups_together():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    groups = [f"g{i // 3}" for i in range(400)]  # groups of 3 consecutive images
    labels = np.array([labels[(i // 3) * 3] for i in range(400)])  # one label per group
    train, val = split_train_validation(labels, 0.15, seed=1, groups=groups)
    assert sorted(train + val) == list(range(400))
    val_groups = {groups[i] for i in val}
    assert not any(groups[i] in val_groups for i in train), "a group straddles train and validation"
    for label in range(4):
        share = np.isin(val, np.flatnonzero(labels == label)).sum() / (labels == label).sum()
        assert 0.12 <= share <= 0.18
    assert split_train_validation(labels, 0.15, 1, groups) == (train, val)
    assert split_train_validation(labels, 0.15, 2, groups) != (train, val)


@pytest.mark.parametrize("fraction, minimum", [(0.05, 11), (0.15, 4), (0.25, 3)])
def test_a_split_without_validation_is_refused_naming_the_minimum(fraction: float, minimum: int):
    """The smallest class size that puts one image into validation is the one the error names."""
    below = [label for label in range(4) for _ in range(minimum - 1)]
    with pytest.raises(DataError, match=rf"--validation_fraction {fraction:g} a class needs at least {minimum} images.*"
                                        rf"largest class here has {minimum - 1}\. Add images, or pass --validation_fraction"):
        split_train_validation(below, fraction, seed=0)
    at = [label for label in range(4) for _ in range(minimum)]
    train, val = split_train_validation(at, fraction, seed=0)
    assert sorted(at[i] for i in val) == [0, 1, 2, 3] and len(train) == 4 * minimum - 4
    # groups kept whole can leave validation empty too: said so, not a KeyError later
    with pytest.raises(DataError, match="near-duplicate groups"):
        split_train_validation([0] * 40, 0.05, seed=0, groups=["a"] * 20 + ["b"] * 20)


def test_cached_pixels_equal_the_pipeline_resize(tiny_data):
    """The cache holds exactly what timm's eval transform makes of the file (RGB, EXIF, resize)."""
    from hf_tumor.serving.preprocessing import create_eval_transform, load_image

    splits = load_splits(tiny_data, CFG, validation_fraction=0.25, seed=0)
    row = splits["test"][0]
    expected = np.asarray(create_eval_transform(CFG).resize(load_image(Path(row["path"]))))
    assert np.array_equal(data.pixels_to_array(row["pixels"], TEST_IMAGE_SIZE), expected)


def test_grayscale_and_rgb_inputs_give_three_channels(tmp_path):
    from hf_tumor.serving.preprocessing import create_eval_transform, load_image

    gray = tmp_path / "g.png"
    Image.fromarray(np.full((40, 50), 128, np.uint8), "L").save(gray)
    tensor = create_eval_transform(CFG)(load_image(gray))
    assert tensor.shape == (3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)


def test_grayscale_preprocessing_equals_rgb_conversion(slice_image):
    """A grayscale image, or an RGB one with three equal channels, is resized as one channel: the same
    input as timm's transform of the RGB conversion, bit for bit; one differing pixel makes it colour."""
    from hf_tumor.serving.preprocessing import create_eval_transform, gray_if_neutral

    transform = create_eval_transform(CFG)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (41, 67), np.uint8), "L")
    for gray in (slice_image.convert("L"), noise):
        rgb = gray.convert("RGB")
        expected = transform(rgb).numpy()
        assert gray_if_neutral(rgb).mode == "L"
        assert np.array_equal(transform.to_array(gray), expected)
        assert np.array_equal(transform.to_array(rgb), expected)
        tinted = np.array(rgb)
        tinted[20, 30, 2] ^= 1  # one blue value off by one
        tinted = Image.fromarray(tinted)
        assert gray_if_neutral(tinted) is tinted
        assert np.array_equal(transform.to_array(tinted), transform(tinted).numpy())


def test_numpy_preprocessing_equals_timm_transform(slice_image):
    """Prediction's NumPy twin of ToTensor + Normalize (every backend uses it) gives timm's tensor bit for bit."""
    from hf_tumor.serving.preprocessing import create_eval_transform

    transform = create_eval_transform(CFG)
    for image in (slice_image.convert("RGB"), Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), np.uint8))):
        expected = transform(image).numpy()
        actual = transform.to_array(image)
        assert actual.dtype == np.float32 and actual.shape == expected.shape
        assert np.array_equal(actual, expected)


def test_mri_artefacts_change_a_real_slice_and_keep_it_a_grey_uint8_image(slice_image):
    """--mri: TorchIO's artefacts on a real slice: same size, grey, uint8; each artefact changes the image,
    and the off switch leaves the augmentation as it was (no TorchIO step at all)."""
    import torch

    from hf_tumor.training.augment import AugmentConfig, MriArtefacts, augment_array, create_train_augment

    pixels = np.array(slice_image.convert("RGB").resize((96, 96)))
    torch.manual_seed(0)
    augmented = augment_array(pixels, create_train_augment(AugmentConfig(hflip=0, rotation=0, translate=0, scale=0,
                                                                         brightness=0, contrast=0, mri=1.0), 96))
    assert augmented.shape == pixels.shape and augmented.dtype == np.uint8
    assert (augmented[..., 0] == augmented[..., 1]).all() and (augmented[..., 0] == augmented[..., 2]).all()
    grey = pixels.mean(axis=2)
    assert np.abs(augmented[..., 0] - grey).mean() > 2  # changed, but still the same slice:
    assert np.corrcoef(augmented[..., 0].ravel(), grey.ravel())[0, 1] > 0.6
    artefacts = MriArtefacts(1.0)
    for step in artefacts.transform.transforms:  # each one on its own does something
        alone = MriArtefacts(1.0)
        alone.transform.transforms = [step]
        torch.manual_seed(1)
        out = alone(torch.from_numpy(pixels).permute(2, 0, 1)).numpy()[0]
        assert np.abs(out.astype(float) - grey).mean() > 0.5, type(step).__name__
    steps = create_train_augment(AugmentConfig(mri=0), 96).transforms
    assert not any(isinstance(s, MriArtefacts) for s in steps)


def test_cue_breaking_removes_the_skull_and_remaps_the_head_on_a_real_slice(slice_image):
    """--cue_break: on a real slice with skull, p=1 blacks out the ring outside the brain and remaps the
    contrast inside the head; the image stays a grey uint8 of its size, the same seed repeats it, another
    differs; off (the default), no step is added."""
    import torch

    from hf_tumor.checks.shortcuts import brain_mask
    from hf_tumor.training.augment import AugmentConfig, CueBreaking, augment_array, create_train_augment

    pixels = np.array(slice_image.convert("RGB").resize((128, 128)))
    plain = dict(hflip=0, rotation=0, translate=0, scale=0, brightness=0, contrast=0, mri=0)
    augment = create_train_augment(AugmentConfig(**plain, cue_break=1.0), 128)
    torch.manual_seed(0)
    first = augment_array(pixels, augment)
    torch.manual_seed(0)
    assert np.array_equal(first, augment_array(pixels, augment))
    torch.manual_seed(1)
    assert not np.array_equal(first, augment_array(pixels, augment))
    assert first.shape == pixels.shape and first.dtype == np.uint8
    assert (first[..., 0] == first[..., 1]).all() and (first[..., 0] == first[..., 2]).all()
    grey = pixels.mean(axis=2).round().astype(np.uint8)
    brain = brain_mask(grey)
    from scipy import ndimage

    ring = ~ndimage.binary_dilation(brain, iterations=4) & (grey > 30)  # scalp and skull beyond the edge's jitter
    assert ring.sum() > 200 and (first[..., 0][ring] == 0).mean() > 0.95
    inside = ndimage.binary_erosion(brain, iterations=4)
    assert np.abs(first[..., 0][inside].astype(float) - grey[inside]).mean() > 5  # the contrast moved too
    skull_only = augment_array(pixels, create_train_augment(AugmentConfig(**plain, cue_break=1.0, cue_break_contrast=False), 128))
    assert (skull_only[..., 0][ring] == 0).mean() > 0.95
    assert np.array_equal(skull_only[..., 0][inside], grey[inside])  # --cue_break_contrast false: the head untouched
    assert not any(isinstance(s, CueBreaking) for s in create_train_augment(AugmentConfig(), 128).transforms)
