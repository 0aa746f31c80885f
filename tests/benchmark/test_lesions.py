"""Tests for :mod:`monai_ood.benchmark.lesions` (the lesion set, BENCHMARK.md v2)."""

from __future__ import annotations

import ast
import inspect
import math

import numpy as np
import pytest
from scipy import ndimage

from monai_ood.benchmark import lesions
from monai_ood.benchmark.lesions import (
    EDGE_MM,
    LESION_AXES_MM,
    Lesion,
    add_lesions,
    lesion_items,
    lesion_weight,
    paint_lesions,
    sample_lesions,
    tissue_range,
)
from monai_ood.benchmark.ood_sets import OODItem
from monai_ood.benchmark.pool import brain_slices, load_mni152_labels, load_mni152_t1
from monai_ood.preprocessing import SlicePreprocessing

SMALL = SlicePreprocessing(spacing=(4, 4), size=(48, 40))
PREPS = {"small": SMALL, "default": SlicePreprocessing()}


@pytest.fixture(scope="module", params=sorted(PREPS))
def case(request):
    """(preprocessing, a few labelled axial slices of the 2009a T1 as InD test items)."""
    preprocessing = PREPS[request.param]
    images, labels, kept, positions, _ = brain_slices(
        load_mni152_t1(), preprocessing, load_mni152_labels(), step=12
    )
    items = [
        {"image": i, "label": lab, "slice": int(k), "position_mm": float(p)}
        for i, lab, k, p in zip(images, labels, kept, positions, strict=True)
    ]
    return preprocessing, items


def ellipse_pixel_bounds(lesion: Lesion, spacing) -> tuple[float, float]:
    """Bounds on the number of pixel centres inside the ellipse, from its area pi a b (Steiner's formula:
    the pixels' union lies between the ellipse eroded and dilated by half a pixel diagonal h)."""
    a, b = lesion.axes_mm[0] / 2, lesion.axes_mm[1] / 2
    area, pixel = math.pi * a * b, spacing[0] * spacing[1]
    h = math.hypot(*spacing) / 2
    perimeter = math.pi * math.sqrt(2 * (a * a + b * b))  # an upper bound of the ellipse's perimeter
    return max(area - perimeter * h, 0.0) / pixel, (area + perimeter * h + math.pi * h * h) / pixel


def test_lesion_items_are_lesion_set_items(case):
    preprocessing, items = case
    out = lesion_items(items, preprocessing, seed=0)
    assert len(out) == len(items)
    for item, clean in zip(out, items, strict=True):
        assert isinstance(item, OODItem)
        assert (item.name, item.category) == ("lesion", "lesion")
        assert item.image.shape == clean["image"].shape and item.image.dtype == np.float32
        assert 0.0 <= item.image.min() and item.image.max() <= 1.0
        assert item.mask.shape == item.image.shape and item.mask.dtype == bool and item.mask.any()
        np.testing.assert_array_equal(item.label, clean["label"])  # labels kept
        assert f"slice {clean['slice']}" in item.source and "lesion" in item.source


def test_lesions_are_ellipses_of_the_stated_size_inside_the_brain(case):
    preprocessing, items = case
    spacing = preprocessing.spacing
    counts = []
    for number, item in enumerate(items):
        image, label = item["image"], item["label"]
        painted, mask, drawn = add_lesions(image, label, (0, number), preprocessing)
        counts.append(len(drawn))
        assert 1 <= len(drawn) <= 3
        brain = label[0] > 0
        assert not (mask[0] & ~brain).any()  # the mask lies inside the brain
        changed = painted[0] != image[0]
        assert not (changed & ~brain).any()  # so does every changed pixel (the rim too)
        low, high = tissue_range(image, label)
        # Independent reference for the tissue range: the CSF median and the WM 99th percentile.
        assert low == pytest.approx(np.median(image[label == 1]))
        assert high == pytest.approx(np.percentile(image[label == 3], 99))
        values = painted[mask]
        assert ((values < low) | (values > high)).all()  # outside the slice's tissue range
        total = 0
        for lesion in drawn:
            assert all(LESION_AXES_MM[0] <= a <= LESION_AXES_MM[1] for a in lesion.axes_mm)
            own = lesion_weight(image.shape[1:], lesion, spacing) >= 1.0
            lower, upper = ellipse_pixel_bounds(lesion, spacing)
            assert max(lower, 1) <= own.sum() <= upper, (lesion, own.sum(), lower, upper)
            assert mask[0][lesion.centre]
            total += own.sum()
        assert total == mask.sum()  # the lesions do not overlap
        # Unchanged outside the mask dilated by the largest reach of a lesion beyond its ellipse mask.
        reach = math.ceil((LESION_AXES_MM[1] / 2 + EDGE_MM) / min(spacing)) + 1
        near = ndimage.binary_dilation(mask[0], iterations=reach)
        np.testing.assert_array_equal(painted[0][~near], image[0][~near])
        # A smooth edge: some pixels outside the mask change, to values between tissue and fill.
        assert (changed & ~mask[0]).any()
    assert len(set(counts)) > 1  # not always the same number of lesions


@pytest.mark.parametrize(
    ("axes_mm", "angle", "spacing"),
    [((3.0, 3.0), 0.0, (0.25, 0.25)), ((15.0, 4.0), 0.7, (0.25, 0.25)), ((9.0, 12.0), 2.0, (0.2, 0.3))],
)
def test_mask_area_is_the_ellipse_area(axes_mm, angle, spacing):
    """On a fine grid the analytic bounds are tight: the mask is the ellipse of the stated axes."""
    shape = (int(20 / spacing[0]), int(20 / spacing[1]))
    lesion = Lesion((shape[0] // 2, shape[1] // 2), axes_mm, angle, "hypo", (0.1, 0.2), 0)
    count = (lesion_weight(shape, lesion, spacing) >= 1.0).sum()
    lower, upper = ellipse_pixel_bounds(lesion, spacing)
    assert lower <= count <= upper
    area = math.pi * axes_mm[0] * axes_mm[1] / 4
    assert count * spacing[0] * spacing[1] == pytest.approx(area, rel=0.15)


def test_the_rim_is_a_smooth_falloff():
    lesion = Lesion((30, 30), (12.0, 8.0), 0.3, "hypo", (0.1, 0.2), 0)
    weight = lesion_weight((60, 60), lesion, (1.0, 1.0))
    assert weight.max() == 1.0 and weight.min() == 0.0
    rim = (weight > 0) & (weight < 1)
    assert rim.sum() > 0.5 * (weight >= 1).sum()  # a 3 mm rim around a 12x8 mm ellipse
    # Monotonic along a ray from the centre (along the first axis, rows 30, columns 30 ->).
    ray = weight[30, 30:]
    assert (np.diff(ray) <= 1e-12).all()
    # Nothing changes farther than EDGE_MM from the ellipse: the support ends within 6 + 3 mm.
    assert weight[30, 30 + 10 :].max() == 0.0
    hard = lesion_weight((60, 60), lesion, (1.0, 1.0), edge_mm=0)
    np.testing.assert_array_equal(hard >= 1, weight >= 1)


def test_paint_is_deterministic_and_textured():
    image = np.full((1, 40, 40), 0.7, np.float32)
    lesion = Lesion((20, 20), (14.0, 14.0), 0.0, "hypo", (0.1, 0.25), 7)
    out1, mask1 = paint_lesions(image, [lesion], (1.0, 1.0))
    out2, mask2 = paint_lesions(image, [lesion], (1.0, 1.0))
    np.testing.assert_array_equal(out1, out2)
    inside = out1[mask1]
    assert inside.min() >= 0.1 and inside.max() <= 0.25
    assert inside.std() > 0.01  # a texture, not a flat fill
    # Smooth texture: neighbouring pixels differ less than the texture varies overall.
    assert inside.size > 100
    assert np.abs(np.diff(out1[0, 20, 15:26])).mean() < inside.std()


def test_seeded_replay_and_other_seeds(case):
    preprocessing, items = case
    first = lesion_items(items, preprocessing, seed=0)
    again = lesion_items(items, preprocessing, seed=0)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.source == b.source
    other = lesion_items(items, preprocessing, seed=1)
    assert any(not np.array_equal(a.mask, b.mask) for a, b in zip(first, other, strict=True))
    # Seeded per slice: item i gets the same lesions whatever the items after it.
    part = lesion_items(items[:2], preprocessing, seed=0)
    for a, b in zip(part, first[:2], strict=True):
        np.testing.assert_array_equal(a.image, b.image)


def test_one_to_three_lesions_and_both_kinds_where_there_is_room():
    rng = np.random.default_rng(0)
    label = np.zeros((1, 64, 64), np.int64)
    label[0, 4:60, 4:60] = 3
    label[0, 28:36, 28:36] = 1
    image = np.where(label > 0, 0.6, 0.0).astype(np.float32)
    image[label == 1] = 0.3
    counts, kinds = set(), set()
    for _ in range(40):
        drawn = sample_lesions(image, label, rng, (2.0, 2.0))
        counts.add(len(drawn))
        kinds |= {lesion.kind for lesion in drawn}
        for lesion in drawn:
            band = lesion.band
            assert band[1] < 0.3 if lesion.kind == "hypo" else band[0] > 0.6
    assert counts == {1, 2, 3} and kinds == {"hypo", "hyper"}
    # White matter at 1.0 (the InD window clips it): no room above, hypointense lesions only.
    image[label == 3] = 1.0
    assert {lesion.kind for _ in range(10) for lesion in sample_lesions(image, label, rng, (2.0, 2.0))} == {
        "hypo"
    }


def test_no_room_no_lesion():
    label = np.zeros((1, 20, 20), np.int64)
    label[0, 9:11, 9:11] = 3  # a brain too small for any lesion and its rim
    image = np.where(label > 0, 0.5, 0.0).astype(np.float32)
    assert sample_lesions(image, label, np.random.default_rng(0), (2.0, 2.0)) == []
    items = lesion_items([{"image": image, "label": label}, {"image": image}])  # second: no label
    assert items == []


def test_validation():
    image = np.zeros((1, 8, 8), np.float32)
    with pytest.raises(ValueError, match="label must have the image's shape"):
        add_lesions(image, np.zeros((8, 8), np.int64))
    with pytest.raises(ValueError, match="no brain"):
        tissue_range(image, np.zeros((1, 8, 8), np.int64))
    with pytest.raises(ValueError, match="kind"):
        Lesion((1, 1), (3.0, 3.0), 0.0, "iso", (0.1, 0.2), 0)
    with pytest.raises(ValueError, match="axes_mm"):
        sample_lesions(
            image, np.ones((1, 8, 8), np.int64), np.random.default_rng(0), (2.0, 2.0), axes_mm=(5, 3)
        )


def test_no_code_shared_with_the_training_outlier_ops():
    """BENCHMARK.md: a training op and a lesion maker must not share code."""
    tree = ast.parse(inspect.getsource(lesions))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
            imported |= {alias.name for alias in node.names}
    assert not any("outlier_synthesis" in name or "transforms" in name for name in imported), imported
    assert "outlier_synthesis" not in inspect.getsource(lesions).split('"""', 2)[2]  # code, not docstring
