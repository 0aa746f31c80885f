"""The default detector of an nnU-Net model: fitted on patches of the fold's preprocessed cases, stored
beside the checkpoint.

The detector is the project's :class:`~monai_ood.detectors.FusedDetector` (channel statistics of every
encoder stage, class prototypes on the two shallowest ones, an intensity histogram; standardised on
validation images; the fusion rule chosen on outliers synthesised from them), with its terms on
nnU-Net's encoder stages ``encoder.stages.<i>`` (the backbone registry's, or the layers given). It is
fitted on patches of nnU-Net's patch size, not on whole cases, because that is what nnU-Net's network
sees, in training and in its sliding-window prediction:

* **Patches** (:func:`sample_patches`): a bounded number per split, spread over the cases (patch ``i``
  from case ``i mod n`` of a seeded permutation, so every case counts before any counts twice), at
  uniformly random positions inside the case (along an axis where the case is smaller than the patch, the
  case lies at a random offset inside the zero-padded patch: nnU-Net's predictor centres it, the offsets
  give the validation statistics a spread even when the fold has a single small validation case), every
  third patch centred on a voxel of a random foreground class from the case's ``class_locations`` (as
  nnU-Net's data loader oversamples foreground), a 2D configuration on a 3D case on a random slice. Labels are nnU-Net's: ``-1``
  (outside the non-zero mask) is background, as in nnU-Net's training; voxels with the ignore label are
  marked unlabelled (``-1`` for the detector), so the class prototypes take the network's prediction
  there.
* **Fit** (:func:`fit_detector`): training patches for the terms, validation patches for the
  standardisation and the fusion choice, deep supervision off (the full-resolution output is the
  segmentation), no warped copies (the core's warp clips intensities to ``[0, 1]``, and nnU-Net's
  z-scored inputs are not in that range; its training and test cases go through the same resampling to
  the target spacing anyway).
* **File**: ``fold_<f>/ood_detector.pt`` beside ``checkpoint_final.pth`` (``ood_detector_<stem>.pt``
  for another checkpoint), written by :func:`monai_ood.engines.checkpoint.save_detector` and read by
  :func:`~monai_ood.engines.checkpoint.load_detector` on the network.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ...detectors.fused import SELECTION_OPS, FusedDetector

__all__ = [
    "DEFAULT_CHECKPOINT",
    "DETECTOR_FILE",
    "deep_supervision_off",
    "detector_path",
    "fit_detector",
    "sample_patches",
]

DETECTOR_FILE = "ood_detector.pt"
DEFAULT_CHECKPOINT = "checkpoint_final.pth"
#: every how-many-th patch is centred on a foreground voxel (nnU-Net oversamples a third)
FOREGROUND_EVERY = 3

#: ``load(case) -> (data (C, *spatial), seg (1, *spatial) or None, properties)``; arrays may be blosc2
CaseLoader = Callable[[str], tuple[Any, Any, dict]]


def detector_path(fold_folder: str | os.PathLike, checkpoint_name: str = DEFAULT_CHECKPOINT) -> Path:
    """Where the default detector of ``fold_folder/checkpoint_name`` is stored."""
    stem = Path(checkpoint_name).stem
    name = DETECTOR_FILE if stem == Path(DEFAULT_CHECKPOINT).stem else f"ood_detector_{stem}.pt"
    return Path(fold_folder) / name


def _bounds(shape: Sequence[int], patch: Sequence[int]) -> tuple[list[int], list[int]]:
    """The lowest and highest patch start per axis: the patch inside the case where the case is larger,
    the case anywhere inside the patch where it is smaller."""
    lower = [min(0, int(size) - int(p)) for size, p in zip(shape, patch, strict=True)]
    upper = [max(0, int(size) - int(p)) for size, p in zip(shape, patch, strict=True)]
    return lower, upper


def _crop(array, start: Sequence[int], patch: Sequence[int], fill: float) -> np.ndarray:
    """``array[:, start:start + patch]`` (``(C, *spatial)``, numpy or blosc2), padded with ``fill``."""
    shape = array.shape[1:]
    inside = tuple(slice(max(s, 0), min(s + p, n)) for s, p, n in zip(start, patch, shape, strict=True))
    target = tuple(slice(r.start - s, r.stop - s) for r, s in zip(inside, start, strict=True))
    out = np.full((array.shape[0], *patch), fill, dtype=np.float32)
    out[(slice(None), *target)] = np.asarray(array[(slice(None), *inside)], dtype=np.float32)
    return out


def _foreground_voxel(properties: dict, rng: np.random.Generator) -> np.ndarray | None:
    """A random voxel (spatial index) of a random foreground class of the case, or ``None``."""
    locations = properties.get("class_locations") or {}
    classes = [
        c
        for c, voxels in locations.items()
        if isinstance(c, (int, np.integer)) and int(c) > 0 and len(voxels) > 0
    ]
    if not classes:
        return None
    voxels = np.asarray(locations[classes[int(rng.integers(len(classes)))]])
    return voxels[int(rng.integers(len(voxels)))][1:]  # the first index is the channel


def _labels(seg: np.ndarray, ignore_label: int | None) -> np.ndarray:
    """nnU-Net's labels for the detector: ``-1`` (outside the non-zero mask) is background, the ignore
    label is unlabelled (``-1``)."""
    labels = np.rint(seg).astype(np.int64)
    background = labels < 0
    if ignore_label is not None:
        labels[labels == ignore_label] = -1
    labels[background] = 0
    return labels


def sample_patches(
    cases: Sequence[str],
    load: CaseLoader,
    patch_size: Sequence[int],
    count: int,
    seed: int = 0,
    ignore_label: int | None = None,
) -> list[dict[str, Any]]:
    """``count`` patches of the preprocessed ``cases`` (see the module docstring).

    Args:
        cases: case identifiers.
        load: reads a case (:data:`CaseLoader`); called once per case used.
        patch_size: nnU-Net's patch size (2D on 3D cases: a random slice per patch).
        count: how many patches (at most one pass over the cases per ``len(cases)`` patches).
        seed: seed of the case order, the crops and the slices.
        ignore_label: nnU-Net's ignore label, or ``None``.

    Returns:
        ``[{"image": (C, *patch) float32, "label": (1, *patch) int64 or None, "case": id}, ...]``.

    Raises:
        ValueError: without cases, or for a ``count`` < 1.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    if not cases:
        raise ValueError("there are no cases to take patches from")
    rng = np.random.default_rng(seed)
    order = [cases[i] for i in rng.permutation(len(cases))]
    per_case: dict[str, list[int]] = {}
    for i in range(count):
        per_case.setdefault(order[i % len(order)], []).append(i)
    patch = [int(p) for p in patch_size]
    patches: list[dict[str, Any] | None] = [None] * count
    for case, indices in per_case.items():
        data, seg, properties = load(case)
        sliced = len(patch) == data.ndim - 2
        for i in indices:
            voxel = (
                _foreground_voxel(properties, rng) if i % FOREGROUND_EVERY == FOREGROUND_EVERY - 1 else None
            )
            image_source, label_source = data, seg
            if sliced:  # a 2D configuration: one slice of the 3D case
                z = int(voxel[0]) if voxel is not None else int(rng.integers(data.shape[1]))
                image_source = data[:, z]
                label_source = None if seg is None else seg[:, z]
                voxel = None if voxel is None else voxel[1:]
            lower, upper = _bounds(image_source.shape[1:], patch)
            if voxel is None:
                start = [int(rng.integers(lo, up + 1)) for lo, up in zip(lower, upper, strict=True)]
            else:
                start = [
                    int(np.clip(int(v) - p // 2, lo, up))
                    for v, p, lo, up in zip(voxel, patch, lower, upper, strict=True)
                ]
            label = None
            if label_source is not None:
                label = _labels(_crop(label_source, start, patch, 0.0), ignore_label)
            patches[i] = {"image": _crop(image_source, start, patch, 0.0), "label": label, "case": case}
    return patches


@contextlib.contextmanager
def deep_supervision_off(network: nn.Module) -> Iterator[nn.Module]:
    """Switch a ``dynamic_network_architectures`` U-Net's (or the wrapper's) deep supervision off inside
    the block, so its forward returns the full-resolution logits alone (as nnU-Net's predictor has it)."""
    decoder = getattr(network, "decoder", None)
    if decoder is None or not hasattr(decoder, "deep_supervision"):
        yield network
        return
    enabled = decoder.deep_supervision
    decoder.deep_supervision = False
    try:
        yield network
    finally:
        decoder.deep_supervision = enabled


def fit_detector(
    network: nn.Module,
    train_patches: Sequence[dict],
    val_patches: Sequence[dict],
    num_classes: int,
    layers: Sequence[str] | None = None,
    fusion: str = "auto",
    batch_size: int = 2,
    seed: int = 0,
    selection_ops: Sequence[str] = SELECTION_OPS,
) -> FusedDetector:
    """Fit the default detector on nnU-Net patches (see the module docstring).

    Args:
        network: the trained network (the prototype wrapper or nnU-Net's U-Net itself).
        train_patches, val_patches: from :func:`sample_patches` (at least 2 of each).
        num_classes: K = nnU-Net's ``label_manager.num_segmentation_heads``.
        layers: the stages the terms read; ``None`` = the backbone registry's ``encoder.stages.<i>``.
        fusion: ``"auto"`` or a rule of :data:`monai_ood.detectors.fused.FUSIONS`.
        batch_size: patches per forward pass (nnU-Net's batch size fits in memory).
        seed: seed of the fusion choice's synthesised outliers.
        selection_ops: the outlier ops the ``"auto"`` fusion choice is made on (the core's default).

    Raises:
        ValueError: for a network the registry does not know and no ``layers``, too few patches, or a
            fit the detector rejects (one line each).
    """
    detector = FusedDetector(
        network,
        num_classes=num_classes,
        layers=layers,
        fusion=fusion,
        warped_copies=0,
        selection_ops=selection_ops,
        batch_size=batch_size,
        seed=seed,
    )
    with deep_supervision_off(network):
        return detector.fit(train_patches, val_patches)
