"""The paper's training augmentation (monai_ood.transforms.augmentation): one random rotation of at most
15 degrees and translation of at most 10 pixels, measured on the centroid of a blob, the identity at
zero ranges, and ``warped_copies`` (seeded, item-major, labels by nearest neighbour, images clipped)."""

import math

import numpy as np
import pytest

from monai_ood.transforms.augmentation import affine_augmentation, warped_copies

SIZE = 65  # odd: the rotation centre is the pixel (32, 32)
CENTRE = (SIZE - 1) / 2


def _blob(cy: float, cx: float) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.0**2)).astype(np.float32)[None]


def _centroid(image) -> tuple[float, float]:
    image = np.asarray(image, dtype=np.float64)[0]
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return float((yy * image).sum() / image.sum()), float((xx * image).sum() / image.sum())


def test_rotation_and_translation_stay_within_the_papers_ranges():
    rotate = affine_augmentation(("image",), rotate_degrees=15, translate_pixels=0)
    rotate.set_random_state(0)
    angles = []
    for _ in range(20):  # a blob 20 pixels right of the centre turns about the centre, at radius 20
        cy, cx = _centroid(rotate({"image": _blob(CENTRE, CENTRE + 20)})["image"])
        assert math.hypot(cy - CENTRE, cx - CENTRE) == pytest.approx(20, abs=0.3)
        angles.append(math.degrees(math.atan2(cy - CENTRE, cx - CENTRE)))
    assert max(map(abs, angles)) <= 15.2 and max(map(abs, angles)) > 7.5 and min(angles) < 0 < max(angles)

    shift = affine_augmentation(("image",), rotate_degrees=0, translate_pixels=10)
    shift.set_random_state(1)
    shifts = (
        np.array([_centroid(shift({"image": _blob(CENTRE, CENTRE)})["image"]) for _ in range(20)]) - CENTRE
    )
    assert np.abs(shifts).max() <= 10.05 and np.abs(shifts).max(axis=0).min() > 5  # both axes move

    identity = affine_augmentation(rotate_degrees=0, translate_pixels=0)
    label = (_blob(CENTRE, CENTRE) > 0.5).astype(np.float32)
    out = identity({"image": _blob(CENTRE, 40), "label": label})
    np.testing.assert_allclose(np.asarray(out["image"]), _blob(CENTRE, 40), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["label"]), label)
    volume = affine_augmentation(("image",), spatial_dims=3)({"image": np.ones((1, 8, 8, 8), np.float32)})
    assert volume["image"].shape == (1, 8, 8, 8)
    with pytest.raises(ValueError, match="spatial_dims"):
        affine_augmentation(spatial_dims=4)
    with pytest.raises(ValueError, match="keys"):
        affine_augmentation(keys=())


def test_warped_copies_are_seeded_item_major_and_keep_labels_class_indices():
    rng = np.random.default_rng(0)
    items = []
    for k in range(2):
        label = np.zeros((1, 32, 32), np.int64)
        label[0, 8:24, 8 + k : 20 + k] = 1
        label[0, 12:18, 12:16] = 2
        image = (0.4 * label + 0.3 * rng.random((1, 32, 32))).astype(np.float32) * 1.5  # up to 1.65
        items.append({"image": image, "label": label, "name": f"case{k}"})
    copies = warped_copies(items, seed=3, copies=2)
    assert [c["name"] for c in copies] == [
        "case0",
        "case0",
        "case1",
        "case1",
    ]  # every copy of the first first
    for copy in copies:
        assert copy["image"].dtype == np.float32 and copy["image"].shape == (1, 32, 32)
        assert 0 <= copy["image"].min() and copy["image"].max() <= 1  # clipped to [0, 1]
        assert copy["label"].dtype == np.int64 and set(np.unique(copy["label"])) <= {0, 1, 2}
    assert not np.array_equal(copies[0]["image"], copies[1]["image"])  # two draws, not one twice
    assert not np.array_equal(copies[0]["label"], items[0]["label"])  # warped, labels with the images
    again = warped_copies(items, seed=3, copies=2)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(copies, again, strict=True))
    other = warped_copies(items, seed=4, copies=2)
    assert not np.array_equal(other[0]["image"], copies[0]["image"])
    # without labels the images take the same random draws
    unlabelled = warped_copies([{"image": item["image"]} for item in items], seed=3, copies=2)
    assert all("label" not in c for c in unlabelled)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(copies, unlabelled, strict=True))
    assert warped_copies(items, copies=0) == [] and warped_copies([], copies=3) == []
    with pytest.raises(ValueError, match="copies"):
        warped_copies(items, copies=-1)
