"""The embedded in-distribution data: 4-class brain tissue on axial slices of the MNI ICBM152 2009a T1.

Everything comes from files that ship inside the ``nilearn`` wheel (``pip install monai-ood[data]``),
so the dataset builds offline (BENCHMARK.md, "In-distribution"):

* image: ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz`` (skull-stripped T1, 197x233x189, 1 mm);
* labels: argmax over ``[1 - brain_mask, clip(brain_mask - GM - WM, 0, 1), GM, WM]`` giving
  0 background, 1 CSF, 2 grey matter, 3 white matter, where GM/WM are the nilearn tissue probability
  maps scaled to [0, 1] and ``brain_mask`` is nilearn's own definition (T1 / max(T1) > 0.2, as in
  ``nilearn.datasets.load_mni152_brain_mask``: nilearn 0.14 ships no mask file, so the mask is derived
  the same way nilearn derives it);
* slices: :func:`monai_ood.preprocessing.volume_to_slices` with ``SlicePreprocessing()`` (axial,
  2 mm in-plane, 112x96, anterior up, percentiles (1, 99)); the label volume is built at 1 mm with
  the T1's geometry and resampled by nearest neighbour in the same call;
* kept slices: at least :data:`MIN_BRAIN_FRACTION` (5%) non-background label pixels, about 540 of
  the 10752 pixels (21.5 cm^2 at 2 mm): this drops the caps above the vertex and below the
  cerebellum, which hold a few scattered pixels and no tissue pattern;
* splits: each kept slice falls into a :data:`SLAB_MM` (10 mm) slab by its world position along the
  slicing axis (``floor(position_mm / 10)``, so slab borders sit at multiples of 10 mm in MNI space),
  and the slabs are dealt out bottom to top in the pattern :data:`SLAB_PATTERN`
  (train, train, train, validation, test, ...) for 6:2:2 with every split spanning the whole brain.

The result is cached as a compressed ``.npz`` (plus a readable ``.json`` with the preprocessing and the
source files' sizes and SHA-256) in ``cache_dir`` > ``$MONAI_OOD_CACHE`` > ``$XDG_CACHE_HOME/monai-ood``
(default ``~/.cache/monai-ood``), keyed by the preprocessing parameters.

Example:
    >>> data = load_brain_dataset()  # doctest: +SKIP
    >>> {k: len(v) for k, v in data.items()}  # doctest: +SKIP
    {'train': 82, 'validation': 27, 'test': 28}
    >>> test = data["test"] + brain_test_variants(data["test"], seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from monai_ood.files import atomic_write, atomic_write_text
from monai_ood.preprocessing import SlicePreprocessing, slice_positions, volume_to_slices
from monai_ood.transforms.augmentation import affine_augmentation

__all__ = [
    "BRAIN_MASK_THRESHOLD",
    "CACHE_ENV",
    "CLASS_NAMES",
    "MIN_BRAIN_FRACTION",
    "NUM_CLASSES",
    "SLAB_MM",
    "SLAB_PATTERN",
    "SPLITS",
    "brain_cache_path",
    "brain_slices",
    "brain_test_variants",
    "default_cache_dir",
    "load_brain_dataset",
    "load_mni152_labels",
    "load_mni152_t1",
    "mni152_2009a_paths",
    "slab_indices",
    "slab_split",
    "tissue_labels",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "MONAI_OOD_CACHE"
CLASS_NAMES = ("background", "csf", "grey_matter", "white_matter")
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ("train", "validation", "test")
SLAB_PATTERN = ("train", "train", "train", "validation", "test")
SLAB_MM = 10.0
MIN_BRAIN_FRACTION = 0.05
BRAIN_MASK_THRESHOLD = 0.2  # nilearn.datasets.load_mni152_brain_mask's default threshold
# The paper's training augmentation (rotation <= 15 degrees, translation <= 10 px); the InD test
# variants use the very same single warp, so that a detector cannot key on interpolation.

# Bumped whenever the content of the cache changes for the same preprocessing (label rule, split rule).
_CACHE_FORMAT = 1
_NILEARN_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# Brain mask files some nilearn versions or installs may carry; 0.14 has none (the mask is derived).
_MASK_CANDIDATES = (
    "mni_icbm152_t1_tal_nlin_sym_09a_mask.nii.gz",
    "mni_icbm152_brain_mask_tal_nlin_sym_09a_converted.nii.gz",
)
_EXTRA_HINT = "install the data extra: pip install monai-ood[data] (or pip install nilearn)"


def _nilearn_data_dir() -> Path:
    # find_spec locates the package without importing it (importing nilearn pulls in scikit-learn).
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded brain data needs nilearn, which is not installed; {_EXTRA_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def mni152_2009a_paths() -> dict[str, Path]:
    """Locate the MNI ICBM152 2009a files inside the installed nilearn package.

    Returns:
        ``{"t1": ..., "gm": ..., "wm": ...}`` paths, plus ``"brain_mask"`` if the install carries a
        mask file (nilearn 0.14 does not: the mask is then derived from the T1 as nilearn does).

    Raises:
        ModuleNotFoundError: if nilearn is not installed (names the ``data`` extra).
        FileNotFoundError: if a file is missing from the nilearn install.
    """
    data_dir = _nilearn_data_dir()
    paths = {key: data_dir / name for key, name in _NILEARN_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"nilearn is installed but lacks the MNI152 2009a files {missing!r}; {_EXTRA_HINT}"
        )
    for name in _MASK_CANDIDATES:
        if (data_dir / name).is_file():
            paths["brain_mask"] = data_dir / name
            break
    return paths


def load_mni152_t1() -> sitk.Image:
    """The MNI ICBM152 2009a T1 (skull-stripped, 1 mm, uint8) as a SimpleITK image with its geometry."""
    return sitk.ReadImage(str(mni152_2009a_paths()["t1"]))


def tissue_labels(
    t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, brain_mask: np.ndarray | None = None
) -> np.ndarray:
    """The 4-class tissue labels from the T1 and the tissue probability maps (any array layout).

    Args:
        t1: T1 intensities (used for the brain mask when ``brain_mask`` is ``None``).
        gm: grey-matter probability map (any scale; divided by its maximum).
        wm: white-matter probability map (any scale; divided by its maximum).
        brain_mask: optional brain mask in [0, 1]; default ``t1 / max(t1) > 0.2`` (nilearn's rule).

    Returns:
        uint8 array of the same shape: argmax over ``[1 - mask, clip(mask - GM - WM, 0, 1), GM, WM]``
        (ties go to the lower class).
    """
    if not (t1.shape == gm.shape == wm.shape):
        raise ValueError(f"t1, gm, wm must have one shape, got {t1.shape!r}, {gm.shape!r}, {wm.shape!r}")
    gm = gm.astype(np.float32) / max(float(gm.max()), 1e-12)
    wm = wm.astype(np.float32) / max(float(wm.max()), 1e-12)
    if brain_mask is None:
        mask = (t1.astype(np.float32) / max(float(t1.max()), 1e-12) > BRAIN_MASK_THRESHOLD).astype(np.float32)
    else:
        mask = np.clip(brain_mask.astype(np.float32) / max(float(brain_mask.max()), 1e-12), 0.0, 1.0)
    stacked = np.stack([1.0 - mask, np.clip(mask - gm - wm, 0.0, 1.0), gm, wm])
    return np.argmax(stacked, axis=0).astype(np.uint8)


def load_mni152_labels(reference: sitk.Image | None = None) -> sitk.Image:
    """The 4-class tissue label volume (uint8, 0 bg, 1 CSF, 2 GM, 3 WM) with the 2009a T1's geometry.

    Args:
        reference: optional image in MNI space (e.g. the 2009c T1); the labels are then carried onto
            its grid by world coordinates (nearest neighbour, 0 outside the 2009a field of view).

    Returns:
        A uint8 SimpleITK label image.
    """
    paths = mni152_2009a_paths()
    t1 = sitk.ReadImage(str(paths["t1"]))
    arrays = {}
    for key in ("gm", "wm", "brain_mask"):
        if key not in paths:
            continue
        image = sitk.ReadImage(str(paths[key]))
        if image.GetSize() != t1.GetSize() or not np.allclose(
            np.array(image.GetOrigin() + image.GetDirection() + image.GetSpacing()),
            np.array(t1.GetOrigin() + t1.GetDirection() + t1.GetSpacing()),
            atol=1e-4,
        ):
            raise ValueError(f"{paths[key]} does not share the T1's grid; got size {image.GetSize()!r}")
        arrays[key] = sitk.GetArrayFromImage(image)
    labels = tissue_labels(sitk.GetArrayFromImage(t1), arrays["gm"], arrays["wm"], arrays.get("brain_mask"))
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(t1)
    if reference is not None:
        label_image = sitk.Resample(
            label_image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label_image.GetPixelID()
        )
    return label_image


def default_cache_dir() -> Path:
    """``$MONAI_OOD_CACHE`` if set, else ``$XDG_CACHE_HOME/monai-ood`` (default ``~/.cache/monai-ood``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "monai-ood"


def _settings(preprocessing: SlicePreprocessing) -> dict[str, Any]:
    # Everything the cached content depends on; a JSON round trip turns tuples into lists once, here.
    settings = {
        "format": _CACHE_FORMAT,
        "preprocessing": preprocessing.to_dict(),
        "brain_mask_threshold": BRAIN_MASK_THRESHOLD,
        "min_brain_fraction": MIN_BRAIN_FRACTION,
        "slab_mm": SLAB_MM,
        "slab_pattern": list(SLAB_PATTERN),
        "slab_rule": "equal slabs, multiple of the period, test centred",
    }
    return json.loads(json.dumps(settings, sort_keys=True))


def brain_cache_path(
    cache_dir: str | os.PathLike | None = None, preprocessing: SlicePreprocessing | None = None
) -> Path:
    """Where :func:`load_brain_dataset` keeps the dataset for this preprocessing.

    Args:
        cache_dir: cache folder; ``None`` uses :func:`default_cache_dir`.
        preprocessing: the slice preprocessing; default ``SlicePreprocessing()``.

    Returns:
        The ``.npz`` path (the ``.json`` sidecar has the same stem).
    """
    preprocessing = preprocessing or SlicePreprocessing()
    key = hashlib.sha256(json.dumps(_settings(preprocessing), sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / f"mni152_2009a_{preprocessing.axis}_{key}.npz"


def _source_info(paths: dict[str, Path], checksum: bool) -> dict[str, dict[str, Any]]:
    info = {}
    for key, path in sorted(paths.items()):
        entry: dict[str, Any] = {"file": path.name, "size": path.stat().st_size}
        if checksum:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        info[key] = entry
    return info


def slab_indices(positions: np.ndarray, slice_spacing: float, slab_mm: float = SLAB_MM) -> np.ndarray:
    """Slab index (0 at the bottom) of each slice, for slabs of about ``slab_mm``.

    The slices' extent (lowest to highest slice, plus one slice spacing) is cut into a multiple of
    ``len(SLAB_PATTERN)`` equal slabs, the number nearest to ``extent / slab_mm``: so the pattern deals
    whole periods and the split ratio is exactly 6:2:2 in slabs (137 mm of brain at the default
    preprocessing gives 15 slabs of 9.13 mm).

    Args:
        positions: world positions (mm) of the slices along the slicing axis.
        slice_spacing: distance between neighbouring slices (mm).
        slab_mm: the target slab thickness (mm).

    Returns:
        int array of slab indices, same length as ``positions``.
    """
    positions = np.asarray(positions, dtype=np.float64)
    if slab_mm <= 0 or slice_spacing <= 0:
        raise ValueError(f"slab_mm and slice_spacing must be positive, got {slab_mm!r} and {slice_spacing!r}")
    period = len(SLAB_PATTERN)
    extent = float(positions.max() - positions.min()) + slice_spacing
    num_slabs = period * max(1, round(extent / (period * slab_mm)))
    width = extent / num_slabs
    return np.minimum(np.floor((positions - positions.min()) / width + 1e-9).astype(int), num_slabs - 1)


def slab_split(slab: int) -> str:
    """The split of slab number ``slab`` (0 at the bottom) when the slab count is a multiple of the period.

    The pattern train, train, train, validation, test is dealt cyclically with its phase chosen so
    that the test slabs sit symmetrically about the middle (slabs 2, 7, 12 of 15): every split then
    reaches within three slabs of both the bottom and the top (train, the whole range).
    """
    period = len(SLAB_PATTERN)
    # Test is pattern entry period - 1; it lands on slab (period - 1) // 2 when the phase is this.
    phase = (period - 1) - (period - 1) // 2
    return SLAB_PATTERN[(slab + phase) % period]


def brain_slices(image: sitk.Image, preprocessing: SlicePreprocessing, labels: sitk.Image, step: int = 1):
    """Cut a volume into slices and keep those with at least :data:`MIN_BRAIN_FRACTION` brain.

    Args:
        image: the volume to slice.
        preprocessing: the slice preprocessing.
        labels: a label volume in the same world space (any grid: resampled by nearest neighbour);
            non-zero means brain.
        step: keep every ``step``-th of the brain slices.

    Returns:
        ``(images, labels, kept, positions, grid)``: the kept ``(N, 1, H, W)`` slices and labels,
        their indices in the slicing ``grid`` and their world positions (mm) along the slicing axis.
    """
    if step < 1:
        raise ValueError(f"step must be a positive int, got {step!r}")
    images, slice_labels, grid = volume_to_slices(image, preprocessing, labels)
    kept = np.flatnonzero((slice_labels > 0).mean(axis=(1, 2, 3)) >= MIN_BRAIN_FRACTION)[::step]
    return images[kept], slice_labels[kept], kept, slice_positions(grid)[kept], grid


def _build(preprocessing: SlicePreprocessing) -> dict[str, np.ndarray]:
    """Slice, filter and split the 2009a volume (no caching)."""
    images, labels, kept, positions, grid = brain_slices(
        load_mni152_t1(), preprocessing, load_mni152_labels()
    )
    if kept.size == 0:
        raise ValueError(
            f"no slice has {MIN_BRAIN_FRACTION:.0%} brain pixels with preprocessing {preprocessing!r}"
        )
    slab = slab_indices(positions, grid.GetSpacing()[2])
    split = np.array([SPLITS.index(slab_split(s)) for s in slab], dtype=np.int8)
    return {
        "image": images.astype(np.float32),
        "label": labels.astype(np.uint8),  # uint8 on disk; int64 in the returned items
        "slice": kept.astype(np.int64),
        "position_mm": positions.astype(np.float64),
        "split": split,
    }


def _write_cache(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_text = json.dumps(meta, indent=2, sort_keys=True)
    # Temp file in the same folder + os.replace: readers never see a half-written file, and two
    # processes building at once both end with a complete cache.
    atomic_write(
        path, lambda tmp: np.savez_compressed(tmp, meta=np.array(meta_text), **arrays), overwrite=True
    )
    atomic_write_text(path.with_suffix(".json"), meta_text, overwrite=True)


def _read_cache(path: Path, settings: dict[str, Any], sources: dict[str, dict[str, Any]]):
    """The cached arrays, or ``None`` if stale (other settings or source files); raises if corrupt."""
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        if meta.get("settings") != settings:
            return None
        cached_sources = {
            k: {"file": v["file"], "size": v["size"]} for k, v in meta.get("sources", {}).items()
        }
        if cached_sources != sources:
            return None
        arrays = {key: npz[key] for key in ("image", "label", "slice", "position_mm", "split")}
    n = len(arrays["image"])
    if any(len(a) != n for a in arrays.values()):
        raise ValueError(f"inconsistent array lengths in {path}")
    return arrays


def load_brain_dataset(
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    preprocessing: SlicePreprocessing | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The embedded brain tissue dataset, split by interleaved 10 mm slabs (6:2:2).

    Built offline from the nilearn files on first use (about a second) and cached.

    Args:
        cache_dir: cache folder; ``None`` uses ``$MONAI_OOD_CACHE`` or ``~/.cache/monai-ood``.
        rebuild: build again even if a valid cache exists.
        preprocessing: the slice preprocessing; default ``SlicePreprocessing()`` (axial, 2 mm, 112x96).

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}``, each a list of dicts with
        ``"image"`` float32 ``(1, H, W)`` in [0, 1], ``"label"`` int64 ``(1, H, W)`` in {0, 1, 2, 3},
        ``"slice"`` (index in the slicing grid) and ``"position_mm"`` (world position along the
        slicing axis; MNI z for axial), ordered bottom to top.

    Raises:
        ModuleNotFoundError: if nilearn is not installed.
    """
    preprocessing = preprocessing or SlicePreprocessing()
    if not isinstance(preprocessing, SlicePreprocessing):
        raise ValueError(f"preprocessing must be a SlicePreprocessing, got {preprocessing!r}")
    path = brain_cache_path(cache_dir, preprocessing)
    settings = _settings(preprocessing)
    paths = mni152_2009a_paths()
    arrays = None
    if path.is_file() and not rebuild:
        try:
            arrays = _read_cache(path, settings, _source_info(paths, checksum=False))
            if arrays is None:
                logger.info(
                    "brain dataset cache %s is stale (settings or nilearn files changed); rebuilding", path
                )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            warnings.warn(
                f"brain dataset cache {str(path)!r} is corrupted ({err!r}); rebuilding it", stacklevel=2
            )
    if arrays is None:
        arrays = _build(preprocessing)
        meta = {"settings": settings, "sources": _source_info(paths, checksum=True)}
        _write_cache(path, arrays, meta)
        logger.info("built the brain dataset (%d slices) into %s", len(arrays["image"]), path)
    return _to_items(arrays)


def _to_items(arrays: dict[str, np.ndarray]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for index in range(len(arrays["image"])):
        out[SPLITS[int(arrays["split"][index])]].append(
            {
                "image": np.ascontiguousarray(arrays["image"][index], dtype=np.float32),
                "label": arrays["label"][index].astype(np.int64),
                "slice": int(arrays["slice"][index]),
                "position_mm": float(arrays["position_mm"][index]),
            }
        )
    return out


def brain_test_variants(test_items: Sequence[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Each InD test slice under a fixed-seed mild warp (one resampling), so it is never a training image.

    Args:
        test_items: items as returned by :func:`load_brain_dataset` (``"image"``, optional ``"label"``).
        seed: seed of the warps; the same seed and items give the same variants.

    Returns:
        New items with the warped ``"image"`` (float32, in [0, 1]) and ``"label"`` (int64), the other
        keys copied, plus ``"variant": "affine"``.
    """
    from monai.utils import convert_to_numpy

    warp = affine_augmentation(("image", "label"), prob=1.0)
    warp.set_random_state(seed)
    out = []
    for item in test_items:
        has_label = item.get("label") is not None
        data = {"image": np.asarray(item["image"], dtype=np.float32)}
        # The label rides along even when absent so that every item consumes the same random numbers.
        data["label"] = (
            np.asarray(item["label"], dtype=np.float32) if has_label else np.zeros_like(data["image"])
        )
        warped = warp(data)
        new = {k: v for k, v in item.items() if k not in ("image", "label")}
        new["image"] = np.clip(convert_to_numpy(warped["image"], dtype=np.float32), 0.0, 1.0)
        if has_label:
            new["label"] = np.rint(convert_to_numpy(warped["label"])).astype(np.int64)
        new["variant"] = "affine"
        out.append(new)
    return out
