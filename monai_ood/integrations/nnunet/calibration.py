"""Weibull calibration of an nnU-Net model's score maps on its validation fold, stored beside the checkpoint.

The paper fits a Weibull distribution to the score-map values of held-out validation data and maps
``A`` to ``A_xi = WeibullCDF(A)`` (Eq. 9). Here the held-out data is the fold's validation split
(``splits_final.json``), the values are the feature-grid score maps of nnU-Net's sliding-window tiles
(:func:`~monai_ood.integrations.nnunet.sliding_window.feature_score_values`), and the fit is stored as
``fold_<f>/ood_calibration.json`` beside ``checkpoint_final.pth`` (``ood_calibration_<stem>.json`` for
another checkpoint, e.g. ``ood_calibration_checkpoint_best.json``). The file is the
:class:`~monai_ood.calibration.WeibullCalibrator` JSON plus an ``nnunet`` block (which checkpoint, fold,
cases, hooked layer), so ``WeibullCalibrator.load`` reads it as it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ...calibration import WeibullCalibrator
from ...files import atomic_write_text
from ...networks.prototype_net import PrototypeOODNet
from .sliding_window import feature_score_values

__all__ = ["CALIBRATION_FILE", "calibration_path", "fit_calibration", "load_calibration", "save_calibration"]

CALIBRATION_FILE = "ood_calibration.json"
DEFAULT_CHECKPOINT = "checkpoint_final.pth"


def calibration_path(fold_folder: str | os.PathLike, checkpoint_name: str = DEFAULT_CHECKPOINT) -> Path:
    """Where the calibration of ``fold_folder/checkpoint_name`` is stored."""
    stem = Path(checkpoint_name).stem
    name = CALIBRATION_FILE if stem == Path(DEFAULT_CHECKPOINT).stem else f"ood_calibration_{stem}.json"
    return Path(fold_folder) / name


def fit_calibration(
    net: PrototypeOODNet,
    cases: Iterable,
    patch_size,
    tile_step_size: float = 0.5,
    device: torch.device | str = "cpu",
) -> WeibullCalibrator:
    """Fit a :class:`~monai_ood.calibration.WeibullCalibrator` to the tiles' feature-grid score maps of ``cases``.

    Args:
        net: the trained prototype network.
        cases: preprocessed cases ``(C, *spatial)`` (tensors, arrays or blosc2 arrays), e.g. a generator.
        patch_size, tile_step_size: the tiling of nnU-Net's predictor.
        device: where the network runs.
    """

    def values():
        for data in cases:
            yield from feature_score_values(net, data, patch_size, tile_step_size, device)

    return WeibullCalibrator().fit(values())


def save_calibration(
    calibrator: WeibullCalibrator, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``calibrator`` (and ``metadata`` under the key ``nnunet``) atomically as JSON."""
    record = calibrator.to_dict()
    if metadata:
        record["nnunet"] = dict(metadata)
    return atomic_write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n", overwrite=True)


def load_calibration(path: str | os.PathLike) -> WeibullCalibrator | None:
    """The calibrator stored at ``path``, or ``None`` if there is no such file."""
    return WeibullCalibrator.load(path) if Path(path).is_file() else None
