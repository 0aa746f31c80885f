"""The lesion set of BENCHMARK.md (v2): InD test slices with synthetic lesions and their masks.

A localisation test: each InD test slice gets one to three lesions, and the score map should light up
on them (pixel AUROC and AUPRO inside the brain, :func:`monai_ood.evaluation.localisation_metrics`).
A lesion is a smooth-edged ellipse that *replaces* the tissue with a textured value outside the slice's
tissue range:

* shape: an ellipse with full axis lengths (diameters) drawn uniformly in :data:`LESION_AXES_MM`
  (3-15 mm, in mm through the preprocessing's pixel spacing: 1.5-7.5 pixels at 2 mm), at a random
  angle, centred on a pixel centre;
* place: wholly inside the brain (label > 0): the ellipse and its rim, where the blend weight is
  above 0, stay at least one pixel from the background, and the lesions of one slice do not touch;
* intensity: hypointense (below the slice's CSF median, by :data:`MARGIN`) or hyperintense (above the
  99th percentile of its white matter, by :data:`MARGIN`), each with probability 1/2 where the [0, 1]
  range leaves room (:data:`MIN_BAND`). The InD window (percentiles (1, 99) of the whole slice,
  background included) puts the white matter's 99th percentile at 1.0 on every slice of the v2 pool,
  so at the default preprocessing every lesion is hypointense (a hyperintense one would need values
  above 1, which no InD or OOD image has). The fill is a band of width up to :data:`BAND_WIDTH` at a
  random level inside the allowed range, modulated by a smooth texture: white noise smoothed by a
  Gaussian of :data:`TEXTURE_MM`, mapped through the normal CDF;
* edge: the blend weight is 1 on the ellipse and falls to 0 over :data:`EDGE_MM` outside it
  (smootherstep of the distance beyond the boundary along the ray from the centre), so the image is
  unchanged farther than ``EDGE_MM`` from the ellipse;
* mask: the ellipse (blend weight 1), where the tissue is wholly replaced and every intensity lies
  outside the tissue range. The rim (weight between 0 and 1, at most ``EDGE_MM`` wide) blends fill
  and tissue and is left out of the mask;
* label: kept (the InD tissue labels; lesion pixels keep the tissue label they replace), so that the
  brain (label > 0) is where localisation is measured;
* randomness: one generator per slice seeded with ``(seed, item number)``: item ``i`` gets the same
  lesions for a given seed whatever the other items.

The image is not re-windowed after painting: fill values lie in [0, 1] already, and re-applying the
per-slice percentile window would shift every pixel by the lesions' share of the percentiles.

No training outlier operation makes these lesions (BENCHMARK.md: a training op and a lesion maker must
not share code): :mod:`monai_ood.transforms.outlier_synthesis`'s local operations change a random
*box* (tile shuffle, CutPaste, TorchIO noise or blur) or *add* a Gaussian bump (``blob``); none
replaces tissue inside an ellipse with a value outside the tissue range, and this module imports
nothing from it.

At the default preprocessing, the set holds one item per InD test slice (60 with the v2 pool, each
with one to three lesions; a slice without room for a lesion would be left out), made in
about 0.2 s.

Example:
    >>> from monai_ood.benchmark.pool import load_brain_dataset  # doctest: +SKIP
    >>> items = lesion_items(load_brain_dataset()["test"], seed=0)  # doctest: +SKIP
    >>> items[0].mask.shape, items[0].category  # doctest: +SKIP
    ((1, 112, 96), 'lesion')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage, special

from monai_ood.benchmark.ood_sets import OODItem
from monai_ood.preprocessing import SlicePreprocessing

__all__ = [
    "BAND_WIDTH",
    "EDGE_MM",
    "KINDS",
    "LESION_AXES_MM",
    "LESION_COUNT",
    "MARGIN",
    "MIN_BAND",
    "TEXTURE_MM",
    "Lesion",
    "add_lesions",
    "lesion_distance",
    "lesion_items",
    "lesion_weight",
    "paint_lesions",
    "sample_lesions",
    "tissue_range",
]

LESION_AXES_MM = (3.0, 15.0)  # full axis lengths (diameters), mm
LESION_COUNT = (1, 3)  # lesions per slice, inclusive
EDGE_MM = 3.0  # width of the smooth rim outside the ellipse
TEXTURE_MM = 3.0  # std of the Gaussian smoothing the texture's noise
MARGIN = 0.05  # distance of the fill from the tissue range, in [0, 1] intensity units
BAND_WIDTH = 0.15  # the widest range of fill values of one lesion
MIN_BAND = 0.05  # a kind is possible if at least this much room is left in [0, 1]
KINDS = ("hypo", "hyper")
_MIN_CLASS_PIXELS = 20  # below this many CSF (WM) pixels, the range comes from the whole brain
_ATTEMPTS = 50  # placements tried per lesion


@dataclass(frozen=True)
class Lesion:
    """One synthetic lesion on a slice (everything :func:`paint_lesions` needs to draw it again).

    Args:
        centre: ``(row, column)`` pixel of its centre.
        axes_mm: full lengths (diameters) of its two axes, mm.
        angle: angle of the first axis from the column direction (radians, towards increasing rows).
        kind: ``"hypo"`` or ``"hyper"``.
        band: ``(low, high)`` range of its fill values, in [0, 1] and outside the tissue range.
        texture_seed: seed of its texture's noise.
    """

    centre: tuple[int, int]
    axes_mm: tuple[float, float]
    angle: float
    kind: str
    band: tuple[float, float]
    texture_seed: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.axes_mm) != 2 or min(self.axes_mm) <= 0:
            raise ValueError(f"axes_mm must be two positive lengths, got {self.axes_mm!r}")
        if not 0.0 <= self.band[0] <= self.band[1] <= 1.0:
            raise ValueError(f"band must be (low, high) with 0 <= low <= high <= 1, got {self.band!r}")


def _check_slice(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label)
    if image.ndim != 3 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, H, W), got shape {image.shape!r}")
    if label.shape != image.shape:
        raise ValueError(f"label must have the image's shape {image.shape!r}, got {label.shape!r}")
    return image, label


def tissue_range(image: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """The slice's tissue range: ``(CSF median, 99th percentile of white matter)``.

    Args:
        image: ``(1, H, W)`` slice in [0, 1].
        label: ``(1, H, W)`` tissue labels (0 background, 1 CSF, 2 GM, 3 WM).

    Returns:
        ``(low, high)``; with fewer than 20 CSF (WM) pixels, the 5th (99th) percentile of the brain.

    Raises:
        ValueError: if the slice holds no brain.
    """
    image, label = _check_slice(image, label)
    brain = image[label > 0]
    if brain.size == 0:
        raise ValueError("the slice holds no brain (label > 0)")
    csf, wm = image[label == 1], image[label == 3]
    low = float(np.median(csf)) if csf.size >= _MIN_CLASS_PIXELS else float(np.percentile(brain, 5))
    high = float(np.percentile(wm, 99)) if wm.size >= _MIN_CLASS_PIXELS else float(np.percentile(brain, 99))
    return low, high


def _pixel_coordinates(shape: tuple[int, int], lesion: Lesion, spacing: tuple[float, float]):
    """Coordinates (mm) of every pixel centre along the lesion's two axes, ``(H, W)`` each."""
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    y = (rows - lesion.centre[0]) * spacing[0]
    x = (cols - lesion.centre[1]) * spacing[1]
    cos, sin = np.cos(lesion.angle), np.sin(lesion.angle)
    return cos * x + sin * y, -sin * x + cos * y


def lesion_distance(shape: tuple[int, int], lesion: Lesion, spacing: tuple[float, float]) -> np.ndarray:
    """Signed distance (mm) of each pixel centre beyond the ellipse, along the ray from its centre.

    ``d = |p| - rho(phi)``, where ``rho(phi)`` is the distance from the centre to the boundary in the
    direction of ``p``: negative inside, 0 on the boundary. Never less than the Euclidean distance to
    the ellipse, so ``d >= t`` holds at least ``t`` mm from it.

    Args:
        shape: ``(H, W)``.
        lesion: the lesion.
        spacing: pixel spacing ``(row, column)`` in mm.

    Returns:
        float64 ``(H, W)``.
    """
    u, v = _pixel_coordinates(shape, lesion, spacing)
    a, b = lesion.axes_mm[0] / 2.0, lesion.axes_mm[1] / 2.0
    radius = np.hypot(u, v)
    phi = np.arctan2(v, u)
    rho = 1.0 / np.sqrt((np.cos(phi) / a) ** 2 + (np.sin(phi) / b) ** 2)
    return radius - rho


def lesion_weight(
    shape: tuple[int, int], lesion: Lesion, spacing: tuple[float, float], edge_mm: float = EDGE_MM
) -> np.ndarray:
    """Blend weight of a lesion: 1 on the ellipse, a smootherstep down to 0 over ``edge_mm`` outside.

    Args:
        shape: ``(H, W)``.
        lesion: the lesion.
        spacing: pixel spacing ``(row, column)`` in mm.
        edge_mm: width of the rim (mm); 0 gives a hard edge.

    Returns:
        float64 ``(H, W)`` in [0, 1].
    """
    if edge_mm < 0:
        raise ValueError(f"edge_mm must be >= 0, got {edge_mm!r}")
    distance = lesion_distance(shape, lesion, spacing)
    if edge_mm == 0:
        return (distance <= 0).astype(np.float64)
    t = np.clip(distance / edge_mm, 0.0, 1.0)
    return 1.0 - t * t * t * (t * (6.0 * t - 15.0) + 10.0)


def _texture(shape: tuple[int, int], lesion: Lesion, spacing: tuple[float, float]) -> np.ndarray:
    """The lesion's fill: its band modulated by smoothed noise mapped through the normal CDF."""
    noise = np.random.default_rng(lesion.texture_seed).standard_normal(shape)
    smooth = ndimage.gaussian_filter(noise, sigma=(TEXTURE_MM / spacing[0], TEXTURE_MM / spacing[1]))
    smooth /= max(float(smooth.std()), 1e-12)
    low, high = lesion.band
    return low + (high - low) * special.ndtr(smooth)


def paint_lesions(
    image: np.ndarray, lesions: Sequence[Lesion], spacing: tuple[float, float], edge_mm: float = EDGE_MM
) -> tuple[np.ndarray, np.ndarray]:
    """Draw lesions on a slice (deterministic: the same lesions give the same result).

    Args:
        image: ``(1, H, W)`` slice in [0, 1].
        lesions: from :func:`sample_lesions` (their rims must not overlap).
        spacing: pixel spacing ``(row, column)`` in mm.
        edge_mm: width of the smooth rim (mm).

    Returns:
        ``(image, mask)``: float32 ``(1, H, W)`` in [0, 1] (``(1 - w) * image + w * fill`` per lesion)
        and bool ``(1, H, W)``, the union of the ellipses (blend weight 1).
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, H, W), got shape {image.shape!r}")
    shape = image.shape[1:]
    out = image[0].astype(np.float64)
    mask = np.zeros(shape, dtype=bool)
    for lesion in lesions:
        weight = lesion_weight(shape, lesion, spacing, edge_mm)
        out = (1.0 - weight) * out + weight * _texture(shape, lesion, spacing)
        mask |= weight >= 1.0
    return np.clip(out, 0.0, 1.0).astype(np.float32)[None], mask[None]


def _bands(low: float, high: float) -> dict[str, tuple[float, float]]:
    """Per kind, the interval the fill may take: below ``low - MARGIN`` or above ``high + MARGIN``."""
    ranges = {"hypo": (0.0, low - MARGIN), "hyper": (high + MARGIN, 1.0)}
    return {kind: r for kind, r in ranges.items() if r[1] - r[0] >= MIN_BAND}


def sample_lesions(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    spacing: tuple[float, float],
    count: int | None = None,
    axes_mm: tuple[float, float] = LESION_AXES_MM,
    edge_mm: float = EDGE_MM,
) -> list[Lesion]:
    """Draw one to three lesions for a slice: sizes, angles, places inside the brain, kinds and fills.

    A lesion is placed where its rim (``edge_mm`` outside the ellipse) stays at least one pixel inside
    the brain (label > 0), and away from the slice's other lesions; after :data:`_ATTEMPTS` failed
    placements with new sizes, it is dropped.

    Args:
        image: ``(1, H, W)`` slice in [0, 1].
        label: ``(1, H, W)`` tissue labels.
        rng: the slice's generator.
        spacing: pixel spacing ``(row, column)`` in mm.
        count: how many lesions (default: uniform in :data:`LESION_COUNT`).
        axes_mm: range of the full axis lengths (mm).
        edge_mm: width of the smooth rim (mm).

    Returns:
        The lesions (possibly fewer than ``count``, or none where no kind fits in [0, 1] or the brain
        is too small).
    """
    image, label = _check_slice(image, label)
    if len(axes_mm) != 2 or not 0 < axes_mm[0] <= axes_mm[1]:
        raise ValueError(f"axes_mm must be (low, high) with 0 < low <= high, got {axes_mm!r}")
    if count is None:
        count = int(rng.integers(LESION_COUNT[0], LESION_COUNT[1] + 1))
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count!r}")
    bands = _bands(*tissue_range(image, label))
    if not bands:
        return []
    shape = image.shape[1:]
    spacing = (float(spacing[0]), float(spacing[1]))
    brain = np.pad(label[0] > 0, 1)  # the image border counts as background
    # Distance (mm) from each brain pixel centre to the nearest pixel one step outside the brain.
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)[1:-1, 1:-1]
    outside = ndimage.binary_dilation(~brain)[1:-1, 1:-1]  # background and its first ring of brain
    taken = np.zeros(shape, dtype=bool)
    lesions: list[Lesion] = []
    for _ in range(count):
        for _attempt in range(_ATTEMPTS):
            axes = tuple(float(a) for a in rng.uniform(axes_mm[0], axes_mm[1], size=2))
            angle = float(rng.uniform(0.0, np.pi))
            reach = max(axes) / 2.0 + edge_mm
            candidates = np.argwhere((depth > reach + max(spacing)) & ~taken)
            if len(candidates) == 0:
                continue
            centre = tuple(int(c) for c in candidates[rng.integers(len(candidates))])
            kind = str(rng.choice(sorted(bands)))
            low, high = bands[kind]
            width = min(BAND_WIDTH, high - low)
            start = float(rng.uniform(low, high - width))
            lesion = Lesion(centre, axes, angle, kind, (start, start + width), int(rng.integers(2**31 - 1)))
            support = lesion_distance(shape, lesion, spacing) < edge_mm
            if (support & (outside | taken)).any():
                continue
            lesions.append(lesion)
            # Keep the next lesion's rim one pixel away from this one's.
            taken |= ndimage.binary_dilation(support)
            break
    return lesions


def add_lesions(
    image: np.ndarray,
    label: np.ndarray,
    seed: int | Sequence[int] = 0,
    preprocessing: SlicePreprocessing | None = None,
    count: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """One to three lesions on one preprocessed slice (:func:`sample_lesions`, then :func:`paint_lesions`).

    Args:
        image: ``(1, H, W)`` slice in [0, 1].
        label: ``(1, H, W)`` tissue labels (the lesions go where label > 0).
        seed: seeds the slice's generator (an int or a sequence of ints); same seed, same lesions.
        preprocessing: gives the pixel spacing (mm); default ``SlicePreprocessing()``.
        count: how many lesions (default: uniform in 1-3).

    Returns:
        ``(image, mask, lesions)``: float32 ``(1, H, W)`` in [0, 1], bool ``(1, H, W)`` and the lesions
        drawn (empty, with the image unchanged, if none fits).
    """
    preprocessing = preprocessing or SlicePreprocessing()
    image, label = _check_slice(image, label)
    rng = np.random.default_rng(seed)
    lesions = sample_lesions(image, label, rng, preprocessing.spacing, count)
    painted, mask = paint_lesions(image, lesions, preprocessing.spacing)
    return painted, mask, lesions


def _describe(lesion: Lesion) -> str:
    return (
        f"{lesion.kind} {lesion.axes_mm[0]:.1f}x{lesion.axes_mm[1]:.1f} mm at {lesion.centre}, "
        f"fill {lesion.band[0]:.2f}-{lesion.band[1]:.2f}"
    )


def lesion_items(
    test_items: Sequence[dict[str, Any]], preprocessing: SlicePreprocessing | None = None, seed: int = 0
) -> list[OODItem]:
    """The lesion set: every labelled InD test slice with one to three lesions (set and category ``lesion``).

    Args:
        test_items: InD test items (``"image"``, ``"label"``, optional ``"slice"``, ``"position_mm"``,
            ``"volume"``); items without a label are skipped (the lesions need the brain).
        preprocessing: the InD preprocessing (the pixel spacing).
        seed: item ``i`` is seeded with ``(seed, i)``.

    Returns:
        One :class:`~monai_ood.benchmark.ood_sets.OODItem` per slice that holds a lesion, with ``mask``
        and the InD ``label`` kept.
    """
    preprocessing = preprocessing or SlicePreprocessing()
    items = []
    for number, item in enumerate(test_items):
        if item.get("label") is None:
            continue
        label = np.asarray(item["label"], dtype=np.int64)
        image, mask, lesions = add_lesions(item["image"], label, (seed, number), preprocessing)
        if not lesions:
            continue
        where = f"slice {item['slice']}" if "slice" in item else f"item {number}"
        if item.get("volume") is not None:
            where = f"{item['volume']} {where}"
        items.append(
            OODItem(
                "lesion",
                "lesion",
                image,
                f"InD test {where} + {len(lesions)} lesion(s): " + "; ".join(_describe(x) for x in lesions),
                label=label.copy(),
                mask=mask,
            )
        )
    return items
