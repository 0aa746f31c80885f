"""Dictionary transforms of the bundles' inference: per-slice intensities, splitting and calibrating A(x).

All keep MONAI's :class:`~monai.data.MetaTensor` metadata (affine, applied operations), so ``Invertd``
and ``SaveImaged`` later write every output at the input's geometry.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, convert_to_numpy, ensure_tuple_rep

from ..preprocessing import normalize_intensity
from .calibration import load_calibration

__all__ = ["CalibrateOODScored", "NormalizeSlicesd", "SplitOODOutputd"]


class NormalizeSlicesd(MapTransform):
    """Window every 2D slice of a volume to [0, 1] at its own robust percentiles, as the training slices are.

    The same rule as :func:`monai_ood.preprocessing.normalize_intensity` with ``per_slice=True`` (the
    embedded brain data and datalist slices are made with it): each slice along ``slice_dim`` is mapped
    from its ``percentiles`` to [0, 1] and clipped; a constant slice becomes zeros.

    Args:
        keys: keys of ``(C, *spatial)`` images.
        percentiles: ``(low, high)`` percentiles of the window.
        slice_dim: the spatial dimension the slices are stacked along (``-1``: the last, as after
            ``Orientationd(axcodes=monai_ood.bundle.slice_axcodes(...))``).
        allow_missing_keys: don't raise for a missing key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        percentiles: Sequence[float] = (1.0, 99.0),
        slice_dim: int = -1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        percentiles = tuple(float(p) for p in percentiles)
        if len(percentiles) != 2 or not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ValueError(
                f"percentiles must be (low, high) with 0 <= low < high <= 100, got {percentiles!r}"
            )
        self.percentiles = percentiles
        self.slice_dim = int(slice_dim)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            array = convert_to_numpy(image, dtype=np.float32)
            spatial = array.ndim - 1
            if not -spatial <= self.slice_dim < spatial:
                raise ValueError(f"slice_dim {self.slice_dim} is out of range for {spatial} spatial dims")
            axis = 1 + self.slice_dim % spatial
            out = np.empty_like(array)
            for channel in range(array.shape[0]):
                slices = np.moveaxis(array[channel], axis - 1, 0)
                normalized = normalize_intensity(slices, self.percentiles, per_slice=True)
                out[channel] = np.moveaxis(normalized, 0, axis - 1)
            d[key] = convert_to_dst_type(out, image, dtype=torch.float32)[0]
        return d


class SplitOODOutputd(MapTransform):
    """Split the output of :class:`~monai_ood.bundle.PrototypeOODInferer`: logits stay in ``keys``, the last
    channel, ``A(x)``, goes to ``score_key`` (same metadata).

    Args:
        keys: the inferer output key(s), usually ``"pred"``.
        score_key: key(s) of the score maps, one per key; default ``"ood_score"``.
        allow_missing_keys: don't raise for a missing key.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        score_key: KeysCollection = "ood_score",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.score_keys = ensure_tuple_rep(score_key, len(self.keys))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, score_key in self.key_iterator(d, self.score_keys):
            output = d[key]
            if output.shape[0] < 2:
                raise ValueError(
                    f"{key!r} must hold the logits and A(x) as the last channel (PrototypeOODInferer), got shape "
                    f"{tuple(output.shape)}"
                )
            d[score_key] = output[-1:]
            d[key] = output[:-1]
        return d


class CalibrateOODScored(MapTransform):
    """``A_xi = WeibullCDF(A)`` (Eq. 9): the score map scaled to [0, 1] by the calibration step's fit.

    The calibration file is read when the transform is built, so a missing calibration stops the run
    before any image is processed, with the command that makes it.

    Args:
        keys: score-map key(s), usually ``"ood_score"``.
        calibration_file: the JSON written by the calibration step (``models/calibration.json``).
        output_postfix: the calibrated map goes to ``f"{key}_{output_postfix}"``.
        allow_missing_keys: don't raise for a missing key.

    Raises:
        FileNotFoundError: if ``calibration_file`` does not exist (says how to make it).
    """

    def __init__(
        self,
        keys: KeysCollection = "ood_score",
        calibration_file: str | os.PathLike = "models/calibration.json",
        output_postfix: str = "calibrated",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.calibrator = load_calibration(calibration_file)
        self.output_postfix = output_postfix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_{self.output_postfix}"] = self.calibrator.transform(d[key])
        return d
