"""Tests for :mod:`monai_ood.data.brain` (the embedded InD brain tissue dataset)."""

from __future__ import annotations

import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from monai_ood.data import brain
from monai_ood.data.brain import (
    CACHE_ENV,
    MIN_BRAIN_FRACTION,
    SPLITS,
    brain_cache_path,
    brain_test_variants,
    load_brain_dataset,
    load_mni152_labels,
    load_mni152_t1,
    mni152_2009a_paths,
    slab_indices,
    slab_split,
    tissue_labels,
)
from monai_ood.preprocessing import SlicePreprocessing, slicing_grid

H, W = SlicePreprocessing().size


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    # The session's base temp folder, so that every test module shares one build of the cache.
    return tmp_path_factory.getbasetemp() / "monai-ood-cache"


@pytest.fixture(scope="session")
def dataset(cache_dir):
    return load_brain_dataset(cache_dir=cache_dir)


def _raw_labels_ras():
    """Labels computed here from the raw nilearn arrays with nibabel (RAS voxel order), and the affine."""
    paths = mni152_2009a_paths()
    t1, gm, wm = (nib.load(paths[k]) for k in ("t1", "gm", "wm"))
    t1_data = np.asarray(t1.dataobj, dtype=np.float64)
    gm_data = np.asarray(gm.dataobj, dtype=np.float64) / 255.0
    wm_data = np.asarray(wm.dataobj, dtype=np.float64) / 255.0
    mask = (t1_data / t1_data.max() > 0.2).astype(np.float64)
    stack = np.stack([1 - mask, np.clip(mask - gm_data - wm_data, 0, 1), gm_data, wm_data])
    return np.argmax(stack, axis=0), t1.affine


def _grid_points_ras(grid: sitk.Image, index: int) -> np.ndarray:
    """RAS world coordinates (rows, cols, 3) of the pixel centres of slice ``index`` of a slicing grid."""
    cols, rows = grid.GetSize()[:2]
    c, r = np.meshgrid(np.arange(cols), np.arange(rows))
    ijk = np.stack([c, r, np.full_like(c, index)], -1).reshape(-1, 3) * np.array(grid.GetSpacing())
    lps = np.array(grid.GetOrigin()) + ijk @ np.array(grid.GetDirection()).reshape(3, 3).T
    return (lps * np.array([-1, -1, 1])).reshape(rows, cols, 3)


def test_paths_point_to_the_nilearn_files():
    paths = mni152_2009a_paths()
    assert {"t1", "gm", "wm"} <= set(paths)
    for key in ("t1", "gm", "wm"):
        assert paths[key].is_file() and "09a" in paths[key].name
    assert load_mni152_t1().GetSize() == (197, 233, 189)


def test_missing_nilearn_names_the_data_extra(monkeypatch):
    real_find_spec = brain.importlib.util.find_spec
    monkeypatch.setattr(
        brain.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "nilearn" else real_find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match=r"monai-ood\[data\]"):
        mni152_2009a_paths()


def test_tissue_labels_rule():
    t1 = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 0.1])
    gm = np.array([0.0, 0.1, 0.7, 0.2, 0.0, 0.0])
    wm = np.array([0.0, 0.1, 0.2, 0.7, 0.0, 0.0])
    # bg (no brain), CSF (1 - 0.2 = 0.8 beats GM/WM), GM, WM, CSF (brain, no tissue), bg (t1 below 0.2 max)
    np.testing.assert_array_equal(tissue_labels(t1, gm, wm), [0, 1, 2, 3, 1, 0])
    with pytest.raises(ValueError, match="one shape"):
        tissue_labels(t1, gm[:3], wm)


def test_label_volume_has_t1_geometry_and_four_classes():
    t1, labels = load_mni152_t1(), load_mni152_labels()
    assert labels.GetSize() == t1.GetSize()
    assert labels.GetOrigin() == t1.GetOrigin() and labels.GetDirection() == t1.GetDirection()
    fractions = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=4) / np.prod(t1.GetSize())
    assert fractions.size == 4 and (fractions > 0.005).all()


def test_labels_match_an_independent_numpy_computation(dataset):
    """Each pixel's label equals the raw-array label at the full-resolution voxel nearest to its centre."""
    raw, affine = _raw_labels_ras()
    grid = slicing_grid(load_mni152_t1(), SlicePreprocessing())
    inverse = np.linalg.inv(affine)
    for item in (dataset["test"][len(dataset["test"]) // 2], dataset["train"][5], dataset["validation"][-3]):
        ras = _grid_points_ras(grid, item["slice"])
        voxel = ras.reshape(-1, 3) @ inverse[:3, :3].T + inverse[:3, 3]
        index = np.rint(voxel).astype(int)
        inside = ((index >= 0) & (index < raw.shape)).all(1)
        expected = np.zeros(len(index), dtype=int)
        expected[inside] = raw[tuple(index[inside].T)]
        agreement = (expected == item["label"].ravel()).mean()
        # Only ties at exact half-voxel positions may round the other way.
        assert agreement > 0.97, (item["slice"], agreement)
        assert abs(ras[0, 0, 2] - item["position_mm"]) < 1e-6  # position_mm is MNI z for axial slices


def test_axial_slices_are_anterior_up(dataset):
    grid = slicing_grid(load_mni152_t1(), SlicePreprocessing())
    item = min(dataset["train"], key=lambda i: abs(i["position_mm"] - 10.0))
    ras = _grid_points_ras(grid, item["slice"])
    row_y = ras[:, 0, 1]
    assert np.all(np.diff(row_y) < 0)  # row 0 is the most anterior (largest MNI y)
    # The top-most brain row must sit at the raw data's most anterior brain voxel at this height.
    raw, affine = _raw_labels_ras()
    k = int(round(np.linalg.solve(affine[:3, :3], np.array([0, 0, item["position_mm"]]) - affine[:3, 3])[2]))
    brain_y = [(affine @ [0, j, k, 1])[1] for j in np.flatnonzero((raw[:, :, k] > 0).any(0))]
    top_row = np.flatnonzero((item["label"][0] > 0).any(1))[0]
    assert abs(row_y[top_row] - max(brain_y)) <= 2.5
    bottom_row = np.flatnonzero((item["label"][0] > 0).any(1))[-1]
    assert abs(row_y[bottom_row] - min(brain_y)) <= 2.5


def test_items_have_the_documented_types(dataset):
    for split in SPLITS:
        for item in dataset[split]:
            assert item["image"].shape == (1, H, W) and item["image"].dtype == np.float32
            assert item["label"].shape == (1, H, W) and item["label"].dtype == np.int64
            assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
            assert set(np.unique(item["label"])) <= {0, 1, 2, 3}
            assert isinstance(item["slice"], int) and isinstance(item["position_mm"], float)


def test_splits_disjoint_ratio_coverage_and_brain_content(dataset):
    slices = {split: [i["slice"] for i in dataset[split]] for split in SPLITS}
    assert not set(slices["train"]) & set(slices["validation"])
    assert not set(slices["train"]) & set(slices["test"])
    assert not set(slices["validation"]) & set(slices["test"])
    counts = np.array([len(slices[s]) for s in SPLITS])
    np.testing.assert_allclose(counts / counts.sum(), [0.6, 0.2, 0.2], atol=0.03)
    positions = {s: np.array([i["position_mm"] for i in dataset[s]]) for s in SPLITS}
    low = min(p.min() for p in positions.values())
    high = max(p.max() for p in positions.values())
    thirds = np.linspace(low, high, 4)
    for split, p in positions.items():
        # Every split spans the brain: each reaches within 3 slabs (about 30 mm) of both ends and has
        # slices in the lower, middle and upper third.
        assert p.min() - low <= 30 and high - p.max() <= 30, (split, p.min(), p.max())
        assert all(((p >= a) & (p <= b)).any() for a, b in zip(thirds[:-1], thirds[1:], strict=True)), split
    every = sorted((i["position_mm"], s) for s in SPLITS for i in dataset[s])
    changes = sum(a[1] != b[1] for a, b in zip(every[:-1], every[1:], strict=True))
    assert changes <= 15  # only at slab borders: neighbouring slices rarely straddle splits
    for split in SPLITS:
        for item in dataset[split]:
            assert (item["label"] > 0).mean() >= MIN_BRAIN_FRACTION


def test_slab_rule():
    positions = np.arange(-60.0, 77.0)  # 137 slices 1 mm apart
    slabs = slab_indices(positions, 1.0)
    assert slabs.min() == 0 and slabs.max() == 14  # 15 slabs of 9.13 mm: whole periods of the pattern
    assert np.all(np.diff(slabs) >= 0)
    assert [slab_split(s) for s in range(5)] == ["train", "validation", "test", "train", "train"]
    with pytest.raises(ValueError, match="positive"):
        slab_indices(positions, 0.0)


def test_cache_is_reused(cache_dir, dataset, monkeypatch):
    path = brain_cache_path(cache_dir)
    assert path.is_file() and path.with_suffix(".json").is_file()

    def no_build(preprocessing):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(brain, "_build", no_build)
    again = load_brain_dataset(cache_dir=cache_dir)
    for split in SPLITS:
        assert [i["slice"] for i in again[split]] == [i["slice"] for i in dataset[split]]
        np.testing.assert_array_equal(again[split][0]["image"], dataset[split][0]["image"])


def test_cache_key_depends_on_preprocessing(cache_dir):
    assert brain_cache_path(cache_dir) != brain_cache_path(cache_dir, SlicePreprocessing(spacing=(1.5, 1.5)))
    assert brain_cache_path(cache_dir) == brain_cache_path(cache_dir, SlicePreprocessing())


def test_corrupted_cache_is_rebuilt_with_a_warning(cache_dir, dataset, tmp_path, monkeypatch):
    own = tmp_path / "cache"
    own.mkdir()
    shutil.copy(brain_cache_path(cache_dir), brain_cache_path(own))
    brain_cache_path(own).write_bytes(b"not a zip file")
    built = []
    original = brain._build
    monkeypatch.setattr(brain, "_build", lambda p: built.append(p) or original(p))
    with pytest.warns(UserWarning, match="corrupted"):
        rebuilt = load_brain_dataset(cache_dir=own)
    assert len(built) == 1
    assert [i["slice"] for i in rebuilt["test"]] == [i["slice"] for i in dataset["test"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_brain_dataset(cache_dir=own)  # the rewritten cache is valid
    assert len(built) == 1
    assert not [p for p in own.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


def test_env_var_overrides_the_default_cache_dir(cache_dir, dataset, tmp_path, monkeypatch):
    own = tmp_path / "env-cache"
    monkeypatch.setenv(CACHE_ENV, str(own))
    assert brain_cache_path().parent == own
    own.mkdir()
    shutil.copy(brain_cache_path(cache_dir), brain_cache_path())
    monkeypatch.setattr(brain, "_build", lambda p: pytest.fail("the env var's cache should be used"))
    assert len(load_brain_dataset()["test"]) == len(dataset["test"])


def test_test_variants(dataset):
    test = dataset["test"]
    variants = brain_test_variants(test, seed=0)
    assert len(variants) == len(test)
    for clean, variant in zip(test, variants, strict=True):
        assert variant["image"].shape == (1, H, W) and variant["image"].dtype == np.float32
        assert variant["label"].shape == (1, H, W) and variant["label"].dtype == np.int64
        assert 0.0 <= variant["image"].min() and variant["image"].max() <= 1.0
        assert set(np.unique(variant["label"])) <= {0, 1, 2, 3}
        assert not np.allclose(variant["image"], clean["image"])
        assert variant["slice"] == clean["slice"] and variant["variant"] == "affine"
        # Image and label moved together: the warped brain is where the warped label says.
        image_brain, label_brain = variant["image"][0] > 0.05, variant["label"][0] > 0
        dice = 2 * (image_brain & label_brain).sum() / (image_brain.sum() + label_brain.sum())
        assert dice > 0.9
    again = brain_test_variants(test, seed=0)
    np.testing.assert_array_equal(again[3]["image"], variants[3]["image"])
    other = brain_test_variants(test, seed=1)
    assert not np.allclose(other[3]["image"], variants[3]["image"])
    assert test[0]["image"] is not variants[0]["image"]  # the originals are untouched
