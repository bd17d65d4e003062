"""The shortcut audit's transforms on real slices, its skull removal, and its bookkeeping with the bundled model."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from scipy import ndimage as ndi

from conftest import BUNDLED_MODEL, CLASSES, SHARED_DATA, real_images
from hf_tumor.checks import shortcuts as sc

# axial slices with the skull in view: a post-contrast T1 glioma (figshare) and a framed FLAIR "no tumor"
SKULL_SLICES = ["glioma/Te-gl_0291.jpg", "notumor/Te-no_0309.jpg", "meningioma/Te-meTr_0001.jpg"]

TRANSFORMS = [sc.skull_removed, sc.inverted, sc.gamma, sc.folded, sc.windowed, sc.zoomed_out,
              sc.cropped_to_head, sc.letterboxed, sc.resampled, sc.jpeg]


def _slice(name: str) -> PIL.Image.Image:
    path = SHARED_DATA / "Testing" / name
    if not path.is_file():
        pytest.fail(f"test data missing: {path}")
    return PIL.Image.open(path)


@pytest.fixture(scope="module")
def slices() -> list[PIL.Image.Image]:
    """One real slice per class: 'L' and 'RGB' files, square, tall and wide; the framed FLAIR last."""
    names = ["glioma/Te-gl_0291.jpg", "meningioma/Te-meTr_0001.jpg", "notumor/Te-noTr_0002.jpg",
             "pituitary/Te-pi_0010.jpg", "notumor/Te-no_0309.jpg"]
    return [_slice(name) for name in names]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: t.__name__)
def test_transform_keeps_size_mode_and_is_deterministic(transform, slices):
    modes = {image.mode for image in slices}
    assert modes == {"L", "RGB"} and {image.size[0] == image.size[1] for image in slices} == {True, False}
    for image in slices:
        out = transform(image)
        assert isinstance(out, PIL.Image.Image) and out.size == image.size and out.mode == image.mode
        grey = sc.as_grey(image)
        array = transform(grey)
        assert array.dtype == np.uint8 and array.shape == grey.shape
        assert np.array_equal(array, sc.as_grey(out))  # the PIL and the array paths agree
        drawn = [transform(grey, rng=np.random.default_rng(seed)) for seed in (1, 1, 2)]
        assert np.array_equal(drawn[0], drawn[1])  # a Generator's seed fixes the output
    # on a slice with something to change, every transform changes it (letterboxing needs a non-square one)
    wide = slices[-1] if transform is not sc.letterboxed else next(i for i in slices if i.size[0] != i.size[1])
    assert not np.array_equal(transform(wide), sc.as_grey(wide))


def test_random_draws_differ_between_seeds(slices):
    grey = sc.as_grey(slices[0])
    for transform in (sc.gamma, sc.windowed, sc.zoomed_out, sc.resampled, sc.jpeg, sc.folded):
        outs = [transform(grey, rng=np.random.default_rng(seed)) for seed in range(4)]
        assert len({o.tobytes() for o in outs}) > 1, transform.__name__


@pytest.mark.parametrize("name", SKULL_SLICES)
def test_skull_removal_drops_the_bright_ring_and_keeps_the_centre(name):
    grey = sc.as_grey(_slice(name))
    head = sc.head_mask(grey)
    depth = ndi.distance_transform_edt(head)
    radius = depth.max()
    ring, centre = head & (depth < 0.05 * radius), depth > 0.4 * radius
    out = sc.skull_removed(grey)
    assert grey[ring].mean() > 50 and out[ring].mean() < 0.1 * grey[ring].mean()  # the scalp and skull are gone
    assert (out[centre] == grey[centre]).mean() > 0.95  # the brain's middle is untouched
    brain = out > 0
    assert 0.4 < brain.sum() / head.sum() < 0.9
    # stripping a stripped slice again finds no skull to take: the brain is kept
    assert (sc.brain_mask(out) & brain).sum() / brain.sum() > 0.9


def test_head_mask_is_tight_and_brain_inside_it():
    grey = sc.as_grey(_slice("notumor/Te-no_0309.jpg"))  # a frame line at the border, a black background
    head = sc.head_mask(grey)
    assert not head[0].any() and not head[:, 0].any()  # the frame is not head
    assert grey[~head].mean() < 15 < grey[head].mean()
    assert not (sc.brain_mask(grey, head=head) & ~head).any()


def test_contrast_remaps_act_inside_the_head_only():
    grey = sc.as_grey(_slice("glioma/Te-gl_0291.jpg"))
    head = sc.head_mask(grey)
    for transform in (sc.inverted, sc.gamma, sc.folded):
        out = transform(grey, head=head)
        assert np.array_equal(out[~head], grey[~head])
        assert (out[head] != grey[head]).mean() > 0.5, transform.__name__
    inside = grey[head].astype(float)
    dark, bright = inside < np.percentile(inside, 10), inside > np.percentile(inside, 90)
    out = sc.inverted(grey, head=head)[head].astype(float)
    assert out[dark].mean() > out[bright].mean()  # inverted: what was dark is now the brighter


def test_framing():
    grey = sc.as_grey(_slice("glioma/Te-gl_0291.jpg"))
    head_share = sc.head_mask(grey).mean()
    assert sc.head_mask(sc.zoomed_out(grey, 1.5)).mean() == pytest.approx(head_share / 1.5**2, rel=0.15)
    assert sc.head_mask(sc.cropped_to_head(grey)).mean() > head_share * 1.1
    tall = sc.as_grey(_slice("meningioma/Te-meTr_0001.jpg"))  # 257 x 307
    boxed = sc.letterboxed(tall)
    assert boxed.shape == tall.shape and (boxed[:, :3] <= np.percentile(tall, 20) + 2).all()  # padded sides


def test_bad_input_is_a_user_error():
    with pytest.raises(sc.ShortcutError, match="uint8"):
        sc.jpeg(np.zeros((64, 64), np.float32))
    with pytest.raises(sc.ShortcutError, match="mask has shape"):
        sc.skull_removed(np.zeros((64, 64), np.uint8), brain=np.ones((32, 32), bool))
    with pytest.raises(sc.ShortcutError, match="gamma"):
        sc.gamma(np.zeros((64, 64), np.uint8), -1.0)


def test_audit_counts_add_up(tmp_path):
    from hf_tumor.serving.inference import load_predictor

    predictor = load_predictor(BUNDLED_MODEL, backend="onnx-int8")
    paths = [p for c in CLASSES for p in real_images("Testing", c, 2)]
    unchanged = sc.Shortcut("unchanged", "the slice as it is", "control", lambda g, head, brain: g.copy())
    chosen = [unchanged] + [s for s in sc.SHORTCUTS if s.name in ("skull_removed", "inverted", "zoomed_out")]
    report = sc.run_audit_shortcuts(predictor, paths, shortcuts=chosen, progress=False)
    assert report["num_slices"] == len(paths) and not report["unreadable"]
    direct = predictor.predict_files(paths)
    assert [s["label"] for s in report["slices"]] == [p.label for p in direct]
    for name, per in report["summary"].items():
        assert sum(per[c]["n"] for c in CLASSES) == per["all"]["n"] == len(paths)
        for c in CLASSES + ["all"]:
            row = per[c]
            assert sum(row["labels"].values()) == row["n"]
            assert row["to_negative"] + row["from_negative"] <= row["changed"] <= row["n"]
            assert row["correct_before"] == report["baseline"][c]["correct"]
    control = report["summary"]["unchanged"]["all"]
    assert control["changed"] == 0 and control["mean_delta_true"] == pytest.approx(0, abs=1e-6)
    for level in report["level"].values():
        assert sum(b["n"] for c in CLASSES for b in level["per_class"][c]) == len(paths)
    table = sc.format_table(report)
    assert all(s.name in table for s in chosen) and all(c in table for c in CLASSES)


def test_audit_refuses_folders_that_are_not_classes(tmp_path):
    from hf_tumor.serving.inference import load_predictor

    stray = tmp_path / "tumour" / "x.jpg"
    stray.parent.mkdir()
    stray.symlink_to(SHARED_DATA / "Testing" / "glioma" / "Te-gl_0291.jpg")
    with pytest.raises(sc.ShortcutError, match="not classes of the model"):
        sc.run_audit_shortcuts(load_predictor(BUNDLED_MODEL, backend="onnx-int8"), [stray], progress=False)
    with pytest.raises(sc.ShortcutError, match="No folder"):
        sc.labelled_paths(tmp_path / "missing")
    with pytest.raises(sc.ShortcutError, match="Unknown shortcut blur"):
        sc.select_shortcuts(["inverted", "blur"])
    assert [s.name for s in sc.select_shortcuts(["jpeg_20", "inverted"])] == ["inverted", "jpeg_20"]


@pytest.mark.parametrize("sequence", ["t1c", "flair"])
def test_brain_mask_agrees_with_hd_bet_on_a_real_patient(sequence):
    """TCGA-FG-6692 ships with HD-BET's brain mask (a deep skull-stripping model): on the middle 60% of
    the axial slices the 2-D heuristic should find nearly the same brain."""
    import nibabel as nib

    from hf_tumor.serving.volumes import window

    folder = SHARED_DATA.parent / "tcga-lgg-fg-6692"
    if not folder.is_dir():
        pytest.fail(f"test data missing: {folder}")
    image = nib.as_closest_canonical(nib.load(folder / "with-skull" / f"{sequence}.nii.gz")).get_fdata()
    reference = nib.as_closest_canonical(nib.load(folder / "brain-mask" / f"{sequence}.nii.gz")).get_fdata() > 0
    levels = [k for k in range(image.shape[2]) if reference[:, :, k].sum() >= 500]
    middle = levels[int(0.2 * len(levels)) : int(0.8 * len(levels)) + 1]
    dice = []
    for k in middle:
        mask = sc.brain_mask(np.asarray(window(image[:, :, k].T[::-1])))
        truth = reference[:, :, k].T[::-1]
        dice.append(2 * (mask & truth).sum() / (mask.sum() + truth.sum()))
    assert len(middle) >= 12 and np.median(dice) > 0.88 and min(dice) > 0.65
