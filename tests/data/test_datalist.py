"""Tests for :mod:`monai_ood.data.datalist` (user datasets from a MONAI datalist JSON)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from monai_ood.data.datalist import (
    check_label_values,
    check_same_extent,
    datalist_to_slices,
    load_datalist,
)
from monai_ood.preprocessing import SlicePreprocessing, slice_positions, slicing_grid

PREP = SlicePreprocessing(spacing=(2.0, 2.0), size=(32, 32))
SHAPE = (40, 44, 24)  # voxels (i, j, k)
SPACING = np.array([1.5, 1.5, 2.0])


def oblique_affine(shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A RAS affine rotated 20 degrees about z and 10 degrees about x, with anisotropic voxels."""
    a, b = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(SPACING)
    affine[:3, 3] = np.array([-30.0, -32.0, -24.0]) + np.array(shift)
    return affine


def phantom(seed: int):
    """Two nested ellipsoids (labels 1, 2) in a noisy background; intensity follows the label."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    radius = (i / 0.8) ** 2 + (j / 0.7) ** 2 + (k / 0.9) ** 2
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[radius < 1.0] = 1
    label[radius < 0.35] = 2
    image = np.choose(label, [10.0, 60.0, 120.0]) + rng.normal(0, 3, SHAPE)
    return image.astype(np.float32), label


@pytest.fixture
def dataset_dir(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    entries = []
    for case in range(2):
        image, label = phantom(case)
        affine = oblique_affine()
        nib.save(nib.Nifti1Image(image, affine), tmp_path / "images" / f"case{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), tmp_path / "labels" / f"case{case}.nii.gz")
        entries.append({"image": f"images/case{case}.nii.gz", "label": f"labels/case{case}.nii.gz"})
    datalist = {"training": entries, "test": ["images/case1.nii.gz"]}
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    return tmp_path


def test_round_trip(dataset_dir):
    items = load_datalist(dataset_dir / "dataset.json", split="training")
    assert len(items) == 2
    assert items[0]["image"] == str(dataset_dir / "images" / "case0.nii.gz")
    slices = datalist_to_slices(items, PREP, num_classes=3)
    first = [s for s in slices if s["source"] == items[0]["image"]]
    grid = slicing_grid(sitk.ReadImage(items[0]["image"]), PREP)
    assert len(first) == grid.GetSize()[2] and len(slices) == 2 * len(first)
    for entry in slices:
        assert entry["image"].shape == (1, 32, 32) and entry["image"].dtype == np.float32
        assert entry["label"].shape == (1, 32, 32) and entry["label"].dtype == np.int64
        assert 0.0 <= entry["image"].min() and entry["image"].max() <= 1.0
        assert set(np.unique(entry["label"])) <= {0, 1, 2}
    positions = [s["position_mm"] for s in first]
    assert np.all(np.diff(positions) > 0)
    np.testing.assert_allclose(positions, slice_positions(grid))
    # Image and labels stay registered through the oblique resampling: intensity follows the class.
    images = np.concatenate([s["image"] for s in slices]).ravel()
    labels = np.concatenate([s["label"] for s in slices]).ravel()
    means = [images[labels == c].mean() for c in range(3)]
    assert means[0] < means[1] < means[2]
    inner = labels == 2
    assert inner.sum() > 50 and images[inner].mean() > 0.8


def test_unlabelled_split_and_foreground_filter(dataset_dir):
    test = load_datalist(dataset_dir / "dataset.json", split="test")
    assert test == [{"image": str(dataset_dir / "images" / "case1.nii.gz")}]
    slices = datalist_to_slices(test, PREP)
    assert slices and all("label" not in s for s in slices)
    items = load_datalist(dataset_dir / "dataset.json")
    every = datalist_to_slices(items[:1], PREP)
    some = datalist_to_slices(items[:1], PREP, min_foreground_fraction=0.2)
    assert 0 < len(some) < len(every)
    assert all((s["label"] > 0).mean() >= 0.2 for s in some)


def test_base_dir(dataset_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("lists") / "list.json"
    elsewhere.write_text((dataset_dir / "dataset.json").read_text())
    items = load_datalist(elsewhere, base_dir=dataset_dir)
    assert items[1]["label"] == str(dataset_dir / "labels" / "case1.nii.gz")


def test_missing_files_and_splits(dataset_dir):
    with pytest.raises(FileNotFoundError, match="datalist JSON"):
        load_datalist(dataset_dir / "nope.json")
    with pytest.raises(ValueError, match="split 'validation'"):
        load_datalist(dataset_dir / "dataset.json", split="validation")
    (dataset_dir / "labels" / "case1.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="label file of entry 1"):
        load_datalist(dataset_dir / "dataset.json")
    with pytest.raises(FileNotFoundError, match="label file not found"):
        datalist_to_slices(
            [
                {
                    "image": str(dataset_dir / "images" / "case1.nii.gz"),
                    "label": str(dataset_dir / "gone.nii.gz"),
                }
            ],
            PREP,
        )


def test_label_values_outside_the_classes(dataset_dir):
    items = load_datalist(dataset_dir / "dataset.json")
    with pytest.raises(ValueError, match=r"in \[0, 2\), got \[2\]"):
        datalist_to_slices(items, PREP, num_classes=2)
    image, label = phantom(0)
    label = label.astype(np.int16)
    label[0, 0, 0] = -1
    nib.save(nib.Nifti1Image(label, oblique_affine()), dataset_dir / "labels" / "case0.nii.gz")
    with pytest.raises(ValueError, match=r">= 0, got \[-1\]"):
        datalist_to_slices(items[:1], PREP)
    fractional = sitk.GetImageFromArray(np.full((3, 3, 3), 0.5, dtype=np.float32))
    with pytest.raises(ValueError, match="integer class indices"):
        check_label_values(fractional)
    with pytest.raises(ValueError, match="num_classes must be"):
        check_label_values(fractional, num_classes=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd"])
def test_non_finite_image(dataset_dir, bad, extension):
    # NIfTI is checked as stored: SimpleITK's NIfTI reader would silently read NaN and Inf as 0.
    image, _ = phantom(0)
    image[3, 4, 5] = bad
    path = dataset_dir / "images" / f"bad{extension}"
    if extension == ".nrrd":
        sitk.WriteImage(sitk.GetImageFromArray(image), str(path))
    else:
        nib.save(nib.Nifti1Image(image, oblique_affine()), path)
    with pytest.raises(ValueError, match="NaN or Inf"):
        datalist_to_slices([{"image": str(path)}], PREP)


def test_geometry_mismatch(dataset_dir):
    items = load_datalist(dataset_dir / "dataset.json")
    _, label = phantom(0)
    path = dataset_dir / "labels" / "case0.nii.gz"
    # Cropped by 6 voxels: another field of view that resampling cannot explain.
    nib.save(nib.Nifti1Image(label[:-6], oblique_affine()), path)
    with pytest.raises(ValueError, match="same physical region"):
        datalist_to_slices(items[:1], PREP)
    # Written without the image's geometry (identity affine).
    nib.save(nib.Nifti1Image(label, np.eye(4)), path)
    with pytest.raises(ValueError, match="same physical region"):
        datalist_to_slices(items[:1], PREP)
    # Same field of view at half the resolution: fine (labels are resampled by nearest neighbour).
    affine = oblique_affine()
    half = affine.copy()
    half[:3, :3] = affine[:3, :3] * 2
    half[:3, 3] = affine[:3, :3] @ np.full(3, 0.5) + affine[:3, 3]  # outer voxel edges stay in place
    nib.save(nib.Nifti1Image(label[::2, ::2, ::2], half), path)
    slices = datalist_to_slices(items[:1], PREP, num_classes=3)
    assert any((s["label"] == 2).any() for s in slices)


def test_check_same_extent_tolerance():
    image = sitk.Image([10, 10, 10], sitk.sitkFloat32)
    label = sitk.Image([10, 10, 10], sitk.sitkUInt8)
    label.SetOrigin((0.5, 0.0, 0.0))  # half a voxel: within one voxel
    check_same_extent(image, label)
    label.SetOrigin((3.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="same physical region"):
        check_same_extent(image, label)
    with pytest.raises(ValueError, match="tolerance_voxels"):
        check_same_extent(image, label, tolerance_voxels=-1)
