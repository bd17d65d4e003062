"""Shortcut audit: what besides the lesion moves the model's answer (``hf-tumor shortcuts``).

In the Kaggle data the three tumour classes are nearly all post-contrast T1 slices with the skull in view
(the figshare set), while "no tumor" comes from other sources and sequences. A model can then learn
"looks like a post-contrast clinical slice" for tumour and "looks like something else" for no tumour.
The audit applies transforms that change that look and leave the lesion where it is, and counts per true
class how often the label changes, how often it becomes "notumor", and how far the true class's
probability moves:

- skull removed: a 2-D brain mask (``brain_mask``), everything outside it black, as in skull-stripped
  research data (BraTS);
- contrast remapped inside the head: inverted (T1 -> T2-like), a gamma, a non-monotonic fold
  (FLAIR-like: dark CSF, bright tissue, the brightest T1 signal dimmed);
- display window: narrower (percentile clipping) or wider (washed out, as a wide DICOM window);
- framing and source look: zoomed out onto a larger canvas, cropped to the head, letterboxed to a
  square instead of squashed, downsampled and upsampled, JPEG recompressed.

It also reports the labels against two cheap level proxies of each original slice: the head's share of
the frame and the brain mask's share of the head (small near the skull base, where orbits, sinuses and
muscles fill the head; also small on sagittal and coronal slices that reach the neck).

Every transform takes a PIL image (returned in its own mode and size) or a uint8 (H, W) array (returned
as one), is deterministic, and draws its parameter from a ``numpy.random.Generator`` when given one, so
that the same functions serve as cue-breaking training augmentations applied to every class alike.
NumPy, Pillow and ``scipy.ndimage`` (which scikit-learn, in the ``train`` extra, brings); no per-pixel
Python loops. ``brain_mask`` is a heuristic, not a skull-stripping model: docs/shortcuts.md shows where it
fails (skull base, orbits, neck on sagittal and coronal slices).
"""

from __future__ import annotations

import functools
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import PIL.Image
from scipy import ndimage as ndi

from hf_tumor.contract import HEALTHY_LABEL
from hf_tumor.errors import UserError
from hf_tumor.serving.explain import head_mask as _blurred_head_mask

NEGATIVE = HEALTHY_LABEL  # the class that the transforms are suspected of pushing answers towards
MASK_SIDE = 128  # explain.head_mask runs at this size (it is 1 s at 512 px, 25 ms at 128)
BRAIN_SIDE = 256  # the brain mask is computed at most at this size and scaled up
AUDIT_BATCH = 32
TISSUE_LEVEL = 0.55  # brain mask: tissue is brighter than this fraction of the head's inner median
EROSION = 0.06  # brain mask: erosion that cuts scalp-brain bridges, a fraction of the head's inner radius

HELP = (
    "Shortcut audit: apply transforms that change how a slice looks but not where its lesion is (skull "
    "removed, contrast remapped, display window, framing, resolution, JPEG) to labelled slices, and count per "
    "true class how often the label changes, how often it becomes 'notumor', and the mean change in the true "
    "class's probability; also the labels against the head's share of the frame and the brain's share of the "
    "head. Reads DIR/<class>/*.jpg (e.g. the Kaggle Testing folder); writes a JSON report and prints a table."
)

Img = TypeVar("Img", PIL.Image.Image, np.ndarray)


class ShortcutError(UserError, ValueError):
    """Input the audit or a transform cannot use; the message says what is expected."""


# --------------------------------------------------------------------------- grey arrays in and out


def as_grey(image: PIL.Image.Image | np.ndarray) -> np.ndarray:
    """A uint8 (H, W) array of a PIL image (any mode) or of a uint8 (H, W), (H, W, 1) or (H, W, 3) array."""
    if isinstance(image, PIL.Image.Image):
        if image.mode == "L":
            return np.asarray(image)
        if image.mode == "RGB":
            pixels = np.asarray(image)
            if np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2]):
                return np.ascontiguousarray(pixels[..., 0])
        return np.asarray(image.convert("L"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ShortcutError(f"Expected a uint8 image array, got {array.dtype}.")
    if array.ndim == 3 and array.shape[-1] in (1, 3):
        array = array[..., 0] if array.shape[-1] == 1 else np.asarray(PIL.Image.fromarray(array).convert("L"))
    if array.ndim != 2 or min(array.shape) < 8:
        raise ShortcutError(f"Expected a grey (H, W) image of at least 8 x 8 pixels, got shape {array.shape}.")
    return array


def _like(grey: np.ndarray, original: PIL.Image.Image | np.ndarray) -> PIL.Image.Image | np.ndarray:
    if not isinstance(original, PIL.Image.Image):
        return grey
    out = PIL.Image.fromarray(grey, "L")
    return out if original.mode == "L" else out.convert(original.mode)


def grey_transform(fn: Callable[..., np.ndarray]) -> Callable[..., Any]:
    """Let an (H, W) uint8 array function take and return PIL images as well (same mode and size): the
    decorated function's body always sees the grey array."""

    @functools.wraps(fn)
    def wrapper(image, *args, **kwargs):
        grey = as_grey(image)
        out = fn(grey, *args, **kwargs)
        if out.shape != grey.shape or out.dtype != np.uint8:
            raise AssertionError(f"{fn.__name__} returned {out.dtype} {out.shape} for {grey.shape}")
        return _like(out, image)

    return wrapper


def _resize(grey: np.ndarray, size: tuple[int, int], resample=PIL.Image.Resampling.BILINEAR) -> np.ndarray:
    """``grey`` resized to (width, height); Pillow's filters widen with the scale, so shrinking is antialiased."""
    if grey.shape[::-1] == tuple(size):
        return grey
    return np.asarray(PIL.Image.fromarray(grey).resize(size, resample))


def _resize_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if mask.shape == tuple(shape):
        return mask
    return _resize(np.uint8(mask) * 255, (shape[1], shape[0])) > 127


def _shrunk(grey: np.ndarray, side: int) -> np.ndarray:
    scale = side / max(grey.shape)
    if scale >= 1:
        return grey
    return _resize(grey, (max(8, round(grey.shape[1] * scale)), max(8, round(grey.shape[0] * scale))))


def _check_mask(mask: np.ndarray | None, grey: np.ndarray, name: str) -> np.ndarray | None:
    if mask is not None and np.shape(mask) != grey.shape:
        raise ShortcutError(f"The {name} mask has shape {np.shape(mask)}, the image {grey.shape}.")
    return None if mask is None else np.asarray(mask, bool)


# --------------------------------------------------------------------------- masks


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8-ranged values."""
    hist = np.bincount(np.clip(values, 0, 255).astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    w0, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0))
    return float(np.nanargmax(between)) if np.isfinite(between).any() else 0.0


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask
    return labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1


def head_mask(image: PIL.Image.Image | np.ndarray) -> np.ndarray:
    """Where the head is, tight to its outline: (H, W) bool.

    ``explain.head_mask`` (blurred threshold, opening, largest component; robust to frames and burnt-in
    labels, but blurred wider than the head) on a copy of at most ``MASK_SIDE`` pixels, cut down to the
    pixels above half the slice's Otsu threshold, largest component, holes filled. A blank slice is all head.
    """
    grey = as_grey(image)
    if grey.max() == grey.min():
        return np.ones(grey.shape, bool)
    outline = _resize_mask(_blurred_head_mask(_shrunk(grey, MASK_SIDE)), grey.shape)
    smooth = ndi.gaussian_filter(grey.astype(np.float32), max(grey.shape) / 256)
    tight = _largest(outline & (smooth > 0.5 * _otsu(smooth)))
    return ndi.binary_fill_holes(tight) if tight.any() else outline


def _skull_depth(smooth: np.ndarray, depth: np.ndarray, radius: float) -> float:
    """How deep below the head's outline the brain starts, from the mean intensity against depth.

    Scalp (fat, bright on T1 and T2), then skull and CSF (dark), then brain: the first dip below 0.8 of the
    outer peak, and from it the depth where the profile climbs half-way back to the brain's level. 0 where
    there is no dip (a skull-stripped slice); at most a quarter of the head's inner radius.
    """
    last = max(3, int(0.3 * radius))
    profile = ndi.mean(smooth, labels=np.floor(depth).astype(np.int32), index=np.arange(1, last + 1))
    profile = ndi.uniform_filter1d(np.nan_to_num(profile), 3)
    brain_level = float(np.median(smooth[depth > 0.3 * radius]))
    peak = int(np.argmax(profile[: max(1, int(0.12 * radius))]))
    dip = peak + int(np.argmin(profile[peak:]))
    if not profile[dip] < 0.8 * profile[peak]:
        return 0.0
    back = np.flatnonzero(profile[dip:] > (profile[dip] + brain_level) / 2)
    return float(min(dip + (int(back[0]) if len(back) else 0) + 1, 0.25 * radius))


def brain_mask(image: PIL.Image.Image | np.ndarray, head: np.ndarray | None = None) -> np.ndarray:
    """The brain of a 2-D slice without a deep model: (H, W) bool. Computed at most at ``BRAIN_SIDE`` px.

    1. the head (``head_mask``) and the depth of each pixel below its outline;
    2. the skull's depth from the intensity profile against depth (``_skull_depth``): the ring above it
       (scalp, bone) is never brain;
    3. tissue: below that ring, brighter than 0.55 of the median of the head's inner part (this drops bone,
       CSF and air, and so cuts most bridges between scalp and brain);
    4. tissue eroded by 6% of the head's inner radius, and its components that reach into the inner 70%
       of the head kept (the scalp never does);
    5. grown back inside the tissue as far as it was eroded, holes (ventricles, dark lesions) filled.
    Where this keeps under 15% of the head the slice has no separable brain and the ring's inside is returned.
    Good on axial slices through the cerebrum; keeps orbits, sinuses and the neck at the skull base and on
    sagittal/coronal slices, and may shave cortex where the skull is thin (docs/shortcuts.md).
    """
    grey = as_grey(image)
    head = _check_mask(head, grey, "head")
    if grey.max() == grey.min():
        return np.ones(grey.shape, bool)
    work = _shrunk(grey, BRAIN_SIDE)
    head_work = head_mask(work) if head is None else _resize_mask(head, work.shape)
    smooth = ndi.gaussian_filter(work.astype(np.float32), 1.0)
    depth = ndi.distance_transform_edt(head_work)
    radius = float(depth.max())
    if radius < 4:
        return _resize_mask(head_work, grey.shape)
    inside = depth > _skull_depth(smooth, depth, radius)
    tissue = inside & (smooth > TISSUE_LEVEL * float(np.median(smooth[depth > 0.3 * radius])))
    erosion = max(1.0, EROSION * radius)
    labels, n = ndi.label(ndi.distance_transform_edt(tissue) > erosion)
    brain = inside
    if n:
        inner = ndi.sum(depth > 0.3 * radius, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero((inner > 0) & (inner >= 0.2 * inner.max())) + 1
        core = np.isin(labels, keep)
        grown = ndi.binary_fill_holes(ndi.binary_dilation(core, iterations=int(np.ceil(erosion)) + 1, mask=tissue))
        if grown.sum() >= 0.15 * head_work.sum():
            brain = grown
    return _resize_mask(brain, grey.shape)


# --------------------------------------------------------------------------- transforms


def _head_window(grey: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    values = grey[region] if region.any() else grey.ravel()
    low, high = np.percentile(values, [1, 99])
    return float(low), float(max(high, low + 1))


def _remap_in(grey: np.ndarray, region: np.ndarray, curve: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``curve`` (of [0, 1] onto [0, 1]) applied inside ``region`` to its own 1st-99th percentile window,
    as a 256-entry lookup table; outside ``region`` the slice is untouched."""
    low, high = _head_window(grey, region)
    x = np.clip((np.arange(256, dtype=np.float64) - low) / (high - low), 0, 1)
    lut = np.uint8(np.clip(np.rint(low + curve(x) * (high - low)), 0, 255))
    return np.where(region, lut[grey], grey)


@grey_transform
def skull_removed(image: Img, rng: np.random.Generator | None = None, *, brain: np.ndarray | None = None) -> Img:
    """Everything outside ``brain_mask`` set to 0, as in skull-stripped data.

    With ``rng``: the mask's edge moved in or out by up to 2% of the image side, so that a network trained
    on it does not learn this heuristic's outline.
    """
    mask = _check_mask(brain, image, "brain")
    mask = brain_mask(image) if mask is None else mask
    if rng is not None:
        limit = max(1, round(0.02 * max(image.shape)))
        step = int(rng.integers(-limit, limit + 1))
        if step > 0:
            mask = ndi.binary_dilation(mask, iterations=step)
        elif step < 0:
            mask = ndi.binary_erosion(mask, iterations=-step)
    return np.where(mask, image, 0).astype(np.uint8)


@grey_transform
def inverted(image: Img, rng: np.random.Generator | None = None, *, head: np.ndarray | None = None) -> Img:
    """Intensities inside the head inverted within their own window: dark CSF bright, bright fat dark; a
    crude T1 -> T2-like contrast (bone, dark on both, turns bright). With ``rng``: a gamma in [0.7, 1.4]
    after the inversion."""
    region = _check_mask(head, image, "head")
    region = head_mask(image) if region is None else region
    gamma = 1.0 if rng is None else float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
    return _remap_in(image, region, lambda x: (1 - x) ** gamma)


@grey_transform
def gamma(image: Img, value: float | None = None, rng: np.random.Generator | None = None, *,
          head: np.ndarray | None = None) -> Img:
    """A gamma inside the head: ``value`` < 1 brightens the mid-tones, > 1 darkens them. Default 0.5;
    with ``rng`` (and no ``value``): log-uniform in [0.4, 2.5]."""
    region = _check_mask(head, image, "head")
    region = head_mask(image) if region is None else region
    value = _factor(value, rng, "gamma")
    return _remap_in(image, region, lambda x: x ** value)


def _factor(value: float | None, rng: np.random.Generator | None, name: str) -> float:
    """``value``, else 0.5, else (with ``rng``) log-uniform in [0.4, 2.5]; it must be positive."""
    if value is None:
        value = 0.5 if rng is None else float(np.exp(rng.uniform(np.log(0.4), np.log(2.5))))
    if not value > 0:
        raise ShortcutError(f"{name} must be positive, got {value}")
    return value


@grey_transform
def folded(image: Img, rng: np.random.Generator | None = None, *, head: np.ndarray | None = None) -> Img:
    """A non-monotonic remap inside the head: intensities up to the head's median rise to the top, those
    above fall back to 0.3 of it. Dark CSF stays dark, mid-grey tissue becomes brightest and the brightest
    T1 signal (fat, contrast enhancement) is dimmed: FLAIR-like. With ``rng``: the peak at a quantile in
    [0.3, 0.7] of the head and the brightest input ending in [0, 0.6]."""
    region = _check_mask(head, image, "head")
    region = head_mask(image) if region is None else region
    quantile, tail = (0.5, 0.3) if rng is None else (float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.0, 0.6)))
    low, high = _head_window(image, region)
    values = image[region] if region.any() else image.ravel()
    peak = float(np.clip((np.quantile(values, quantile) - low) / (high - low), 0.05, 0.95))
    return _remap_in(image, region, lambda x: np.where(x <= peak, x / peak, 1 - (1 - tail) * (x - peak) / (1 - peak)))


@grey_transform
def windowed(image: Img, width: float | None = None, rng: np.random.Generator | None = None, *,
             head: np.ndarray | None = None) -> Img:
    """A display window over the whole slice, centred on the head's 1st-99th percentile window and
    ``width`` times as wide: < 1 narrower (clips dark and bright, more contrast), > 1 wider (washed out;
    the black background turns grey). Default 0.5; with ``rng`` (and no ``width``): log-uniform in
    [0.4, 2.5]."""
    region = _check_mask(head, image, "head")
    region = head_mask(image) if region is None else region
    width = _factor(width, rng, "window width")
    low, high = _head_window(image, region)
    centre, half = (low + high) / 2, (high - low) / 2 * width
    lut = np.uint8(np.clip(np.rint((np.arange(256) - (centre - half)) / (2 * half) * 255), 0, 255))
    return lut[image]


def _background(grey: np.ndarray) -> int:
    """The background's level: the median of the darkest fifth of the slice (its border can be a frame)."""
    return int(np.median(grey[grey <= np.percentile(grey, 20)]))


@grey_transform
def zoomed_out(image: Img, factor: float | None = None, rng: np.random.Generator | None = None) -> Img:
    """The slice shrunk by ``factor`` and centred on a canvas of its own size, filled with its background's
    level: more background around a smaller head. Default 1.5; with ``rng``: [1.1, 2.0] and an off-centre
    position."""
    if factor is None:
        factor = 1.5 if rng is None else float(rng.uniform(1.1, 2.0))
    if not factor >= 1:
        raise ShortcutError(f"zoom-out factor must be at least 1, got {factor}")
    h, w = image.shape
    small = _resize(image, (max(1, round(w / factor)), max(1, round(h / factor))))
    canvas = np.full_like(image, _background(image))
    fy, fx = (0.5, 0.5) if rng is None else rng.uniform(0, 1, 2)
    top, left = int(fy * (h - small.shape[0])), int(fx * (w - small.shape[1]))
    canvas[top : top + small.shape[0], left : left + small.shape[1]] = small
    return canvas


@grey_transform
def cropped_to_head(image: Img, margin: float | None = None, rng: np.random.Generator | None = None, *,
                    head: np.ndarray | None = None) -> Img:
    """The smallest box of the slice's own aspect ratio around the head plus ``margin`` (a fraction of the
    head's size on each side), scaled up to fill the frame. Default 0.03; with ``rng``: [0, 0.15]."""
    region = _check_mask(head, image, "head")
    region = head_mask(image) if region is None else region
    if margin is None:
        margin = 0.03 if rng is None else float(rng.uniform(0.0, 0.15))
    h, w = image.shape
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    if not len(rows):
        return image.copy()
    box_h, box_w = (rows[-1] - rows[0] + 1) * (1 + 2 * margin), (cols[-1] - cols[0] + 1) * (1 + 2 * margin)
    scale = max(box_h / h, box_w / w)  # the box keeps the frame's aspect, so it scales back without squashing
    if scale >= 1:
        return image.copy()
    ch, cw = h * scale, w * scale
    cy, cx = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    top, left = float(np.clip(cy - ch / 2, 0, h - ch)), float(np.clip(cx - cw / 2, 0, w - cw))
    box = (left, top, left + cw, top + ch)
    return np.asarray(PIL.Image.fromarray(image).resize((w, h), PIL.Image.Resampling.BILINEAR, box=box))


@grey_transform
def letterboxed(image: Img, rng: np.random.Generator | None = None) -> Img:
    """A non-square slice padded to a square (with its background's level) before the model squashes it to its
    square input, then scaled back to the slice's size: the model sees the anatomy undistorted. Square
    slices are returned as they are. With ``rng``: the slice placed anywhere along the padded side."""
    h, w = image.shape
    if h == w:
        return image.copy()
    side = max(h, w)
    canvas = np.full((side, side), _background(image), np.uint8)
    where = 0.5 if rng is None else float(rng.uniform(0, 1))
    top, left = int(where * (side - h)), int(where * (side - w))
    canvas[top : top + h, left : left + w] = image
    return _resize(canvas, (w, h))


@grey_transform
def resampled(image: Img, factor: float | None = None, rng: np.random.Generator | None = None) -> Img:
    """Downsampled by ``factor`` (antialiased) and upsampled back (bilinear): the blur of a low-resolution
    source. Default 0.4 (512 px to 205 px, below most 'notumor' files' own size); with ``rng``: [0.3, 0.8]."""
    if factor is None:
        factor = 0.4 if rng is None else float(rng.uniform(0.3, 0.8))
    if not 0 < factor <= 1:
        raise ShortcutError(f"resampling factor must be in (0, 1], got {factor}")
    h, w = image.shape
    small = _resize(image, (max(4, round(w * factor)), max(4, round(h * factor))))
    return _resize(small, (w, h))


@grey_transform
def jpeg(image: Img, quality: int | None = None, rng: np.random.Generator | None = None) -> Img:
    """JPEG-compressed at ``quality`` and decoded again. Default 20; with ``rng``: [10, 60]."""
    if quality is None:
        quality = 20 if rng is None else int(rng.integers(10, 61))
    if not 1 <= quality <= 100:
        raise ShortcutError(f"JPEG quality must be 1-100, got {quality}")
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, "JPEG", quality=int(quality))
    return np.asarray(PIL.Image.open(buffer).convert("L"))


# --------------------------------------------------------------------------- the audit


@dataclass(frozen=True)
class Shortcut:
    """One audited transform: its name in the report, a line for the table, and how it is applied to a
    grey slice whose head and brain masks are already computed."""

    name: str
    description: str
    group: str
    apply: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (grey, head, brain) -> grey


SHORTCUTS: tuple[Shortcut, ...] = (
    Shortcut("skull_removed", "outside the 2-D brain mask set to 0", "skull",
             lambda g, head, brain: skull_removed(g, brain=brain)),
    Shortcut("skull_removed_inverted", "skull removed, then inverted inside the brain (skull-stripped T2-like)",
             "skull", lambda g, head, brain: inverted(skull_removed(g, brain=brain), head=brain)),
    Shortcut("skull_removed_folded", "skull removed, then the FLAIR-like fold inside the brain", "skull",
             lambda g, head, brain: folded(skull_removed(g, brain=brain), head=brain)),
    Shortcut("inverted", "inside the head, intensities inverted in their own window (T2-like)", "contrast",
             lambda g, head, brain: inverted(g, head=head)),
    Shortcut("folded", "inside the head, non-monotonic: peak at the head's median, brightest to 0.3 (FLAIR-like)",
             "contrast", lambda g, head, brain: folded(g, head=head)),
    Shortcut("gamma_0.5", "inside the head, gamma 0.5 (mid-tones brighter)", "contrast",
             lambda g, head, brain: gamma(g, 0.5, head=head)),
    Shortcut("gamma_2", "inside the head, gamma 2 (mid-tones darker)", "contrast",
             lambda g, head, brain: gamma(g, 2.0, head=head)),
    Shortcut("window_narrow", "display window half as wide (clipped)", "window",
             lambda g, head, brain: windowed(g, 0.5, head=head)),
    Shortcut("window_wide", "display window twice as wide (washed out, grey background)", "window",
             lambda g, head, brain: windowed(g, 2.0, head=head)),
    Shortcut("zoomed_out", "shrunk 1.5x onto a canvas of the same size", "framing",
             lambda g, head, brain: zoomed_out(g, 1.5)),
    Shortcut("cropped_to_head", "cropped to the head (3% margin), aspect kept", "framing",
             lambda g, head, brain: cropped_to_head(g, 0.03, head=head)),
    Shortcut("letterboxed", "non-square slices padded to a square, not squashed (square ones unchanged)",
             "framing", lambda g, head, brain: letterboxed(g)),
    Shortcut("resampled_0.4", "downsampled to 0.4x and back", "source",
             lambda g, head, brain: resampled(g, 0.4)),
    Shortcut("jpeg_20", "JPEG quality 20", "source", lambda g, head, brain: jpeg(g, 20)),
)

def select_shortcuts(names: Sequence[str] | None = None) -> tuple[Shortcut, ...]:
    """The audited transforms named (all of them for None or an empty list), in the table's order."""
    if not names:
        return SHORTCUTS
    known = {s.name for s in SHORTCUTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ShortcutError(f"Unknown shortcut {', '.join(unknown)}; choose from {', '.join(sorted(known))}.")
    return tuple(s for s in SHORTCUTS if s.name in set(names))


HEAD_FRACTION_BINS = (0.0, 0.35, 0.5, 0.65, 1.0)  # the head's share of the frame
BRAIN_RATIO_BINS = (0.0, 0.5, 0.65, 0.8, 1.0)  # the brain mask's share of the head


def labelled_paths(folder: str | os.PathLike, per_class: int | None = None) -> list[Path]:
    """The image files of ``folder/<class>/`` (e.g. the Kaggle Testing folder), sorted; the first
    ``per_class`` of each class when given."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShortcutError(f"No folder {folder}; expected DIR/<class>/*.jpg, e.g. the Kaggle Testing folder.")
    suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
    paths: list[Path] = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in suffixes)
        paths += files[:per_class] if per_class is not None else files
    if not paths:
        raise ShortcutError(f"No images in {folder}/<class>/; expected DIR/<class>/*.jpg.")
    return paths


def _bin_edges_label(edges: Sequence[float]) -> list[str]:
    return [f"{a:.2f}-{b:.2f}" for a, b in zip(edges[:-1], edges[1:])]


def run_audit_shortcuts(predictor: Any, paths: Sequence[str | os.PathLike], *,
                        shortcuts: Sequence[Shortcut] = SHORTCUTS, negative: str = NEGATIVE,
                        batch_size: int = AUDIT_BATCH, progress: bool = True) -> dict[str, Any]:
    """Predict every slice as it is and after each of ``shortcuts``; summarise per true class.

    ``predictor``: an ``inference.Predictor`` (``probabilities(images)`` and ``class_names``). The true class
    of each path is its folder's name, which must be one of the model's classes. Per shortcut and true class
    the report counts: ``n``; ``changed`` (labels that differ from the slice's own original label);
    ``to_negative`` (labels that were not ``negative`` and became it) and ``from_negative`` (the reverse);
    ``correct_before``/``correct_after``; ``labels`` (counts of the labels after the transform); and
    ``mean_delta_true`` (the mean change in the true class's probability). Unreadable files are listed and
    left out. Per slice: the labels and true-class probabilities before and after, the head's share of the
    frame and the brain mask's share of the head.
    """
    from tqdm.auto import tqdm

    from hf_tumor.serving.image_io import InputError, read_image

    classes = list(predictor.class_names)
    if negative not in classes:
        raise ShortcutError(f"The model has no class '{negative}' (its classes: {', '.join(classes)}).")
    truths = [Path(p).parent.name for p in paths]
    unknown = sorted(set(truths) - set(classes))
    if unknown:
        raise ShortcutError(f"Folders {', '.join(unknown)} are not classes of the model ({', '.join(classes)}); "
                            "expected DIR/<class>/<image>.")
    if not paths:
        raise ShortcutError("No images to audit.")
    started = time.perf_counter()
    names = [s.name for s in shortcuts]
    slices: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    pending: list[tuple[dict[str, Any], list[PIL.Image.Image]]] = []

    def flush() -> None:
        images = [image for _, group in pending for image in group]
        probs = np.concatenate([predictor.probabilities(images[i : i + batch_size])
                                for i in range(0, len(images), batch_size)])
        for k, (record, group) in enumerate(pending):
            rows = probs[k * len(group) : (k + 1) * len(group)]
            t = classes.index(record["true"])
            record["label"], record["p_true"] = classes[int(rows[0].argmax())], float(rows[0, t])
            record["after"] = {name: [classes[int(r.argmax())], float(r[t])] for name, r in zip(names, rows[1:])}
            slices.append(record)
        pending.clear()

    for path, truth in tqdm(list(zip(paths, truths)), desc="shortcuts", disable=not progress):
        try:
            grey = as_grey(read_image(path))
        except (InputError, ShortcutError) as err:
            unreadable.append({"path": str(path), "error": str(err)})
            continue
        head = head_mask(grey)
        brain = brain_mask(grey, head=head)
        group = [PIL.Image.fromarray(grey, "L")]
        group += [PIL.Image.fromarray(s.apply(grey, head, brain), "L") for s in shortcuts]
        record = {"path": str(path), "true": truth, "head_fraction": float(head.mean()),
                  "brain_ratio": float((brain & head).sum() / max(head.sum(), 1))}
        pending.append((record, group))
        if sum(len(g) for _, g in pending) >= 4 * batch_size:
            flush()
    if pending:
        flush()
    if not slices:
        raise ShortcutError(f"None of the {len(paths)} files could be read.")
    return {
        "model": str(getattr(predictor, "source", "")),
        "backend": str(getattr(predictor, "backend", "")),
        "classes": classes,
        "negative": negative,
        "num_slices": len(slices),
        "unreadable": unreadable,
        "seconds": round(time.perf_counter() - started, 1),
        "shortcuts": {s.name: {"description": s.description, "group": s.group} for s in shortcuts},
        "baseline": _baseline(slices, classes),
        "summary": {name: _summarise(slices, classes, name, negative) for name in names},
        "level": {
            "head_fraction": _by_bins(slices, classes, "head_fraction", HEAD_FRACTION_BINS),
            "brain_ratio": _by_bins(slices, classes, "brain_ratio", BRAIN_RATIO_BINS),
        },
        "slices": slices,
    }


def _baseline(slices: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    out = {}
    for cls in classes + ["all"]:
        rows = [s for s in slices if cls in ("all", s["true"])]
        labels = {c: sum(s["label"] == c for s in rows) for c in classes}
        out[cls] = {"n": len(rows), "correct": sum(s["label"] == s["true"] for s in rows), "labels": labels,
                    "mean_p_true": float(np.mean([s["p_true"] for s in rows])) if rows else 0.0}
    return out


def _summarise(slices: list[dict[str, Any]], classes: list[str], name: str, negative: str) -> dict[str, Any]:
    out = {}
    for cls in classes + ["all"]:
        rows = [s for s in slices if cls in ("all", s["true"])]
        after = [s["after"][name] for s in rows]
        out[cls] = {
            "n": len(rows),
            "changed": sum(a[0] != s["label"] for s, a in zip(rows, after)),
            "to_negative": sum(a[0] == negative and s["label"] != negative for s, a in zip(rows, after)),
            "from_negative": sum(a[0] != negative and s["label"] == negative for s, a in zip(rows, after)),
            "correct_before": sum(s["label"] == s["true"] for s in rows),
            "correct_after": sum(a[0] == s["true"] for s, a in zip(rows, after)),
            "labels": {c: sum(a[0] == c for a in after) for c in classes},
            "mean_delta_true": float(np.mean([a[1] - s["p_true"] for s, a in zip(rows, after)])) if rows else 0.0,
        }
    return out


def _by_bins(slices: list[dict[str, Any]], classes: list[str], key: str, edges: Sequence[float]) -> dict[str, Any]:
    """Per true class and bin of ``key``: how many slices, and the counts of the original labels."""
    out: dict[str, Any] = {"edges": list(edges), "bins": _bin_edges_label(edges), "per_class": {}}
    for cls in classes:
        rows = [s for s in slices if s["true"] == cls]
        per_bin = []
        for low, high in zip(edges[:-1], edges[1:]):
            inside = [s for s in rows if low <= s[key] < high or (high == edges[-1] and s[key] == high)]
            per_bin.append({"n": len(inside), "labels": {c: sum(s["label"] == c for s in inside) for c in classes}})
        out["per_class"][cls] = per_bin
    return out


def format_table(report: dict[str, Any]) -> str:
    """The report as Markdown: the baseline, then per shortcut and true class "changed / became negative /
    mean change in the true class's probability", then the labels against the level proxies."""
    classes, negative = report["classes"], report["negative"]
    base = report["baseline"]
    lines = [
        f"{report['num_slices']} slices, model {report['model']} ({report['backend']}); "
        f"{len(report['unreadable'])} unreadable.",
        "",
        "| | " + " | ".join(f"{c} (n={base[c]['n']})" for c in classes) + f" | all (n={base['all']['n']}) |",
        "|---|" + "---|" * (len(classes) + 1),
        "| original: accuracy, mean p(true) | " + " | ".join(
            f"{base[c]['correct'] / max(base[c]['n'], 1):.0%}, {base[c]['mean_p_true']:.2f}" for c in classes + ["all"]
        ) + " |",
    ]
    for name, per in report["summary"].items():
        cells = []
        for c in classes + ["all"]:
            row, n = per[c], max(per[c]["n"], 1)
            moved = row["from_negative"] if c == negative else row["to_negative"]
            cells.append(f"{row['changed'] / n:.0%} / {moved / n:.0%} / {row['mean_delta_true']:+.2f} "
                         f"(acc {row['correct_after'] / n:.0%})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Cells: labels changed / labels that became '{negative}' (in the '{negative}' column: that left it) / "
        "mean change in the true class's probability (accuracy after).",
    ]
    proxies = (("head_fraction", "head's share of the frame"), ("brain_ratio", "brain mask's share of the head"))
    for key, title in proxies:
        level = report["level"][key]
        lines += ["", f"Original labels against the {title} (n: " + "/".join(c[:2] for c in classes) + " %):", "",
                  "| true class | " + " | ".join(level["bins"]) + " |", "|---|" + "---|" * len(level["bins"])]
        for c in classes:
            cells = []
            for b in level["per_class"][c]:
                n = b["n"]
                share = "/".join(f"{100 * b['labels'][k] / n:.0f}" for k in classes) if n else "-"
                cells.append(f"{n}: {share}")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
