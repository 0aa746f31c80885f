"""The calibration of an nnU-Net model's detector map on its validation fold, stored beside the checkpoint.

The paper fits a Weibull distribution to the score-map values of held-out validation data and maps
``A`` to ``A_xi = WeibullCDF(A)`` (Eq. 9). Here the map is the default detector's fused map
(:mod:`~monai_ood.integrations.nnunet.detector`), the held-out data the fold's validation split
(``splits_final.json``), the values those of the map on nnU-Net's sliding-window tiles
(:func:`~monai_ood.integrations.nnunet.sliding_window.map_values`), and the fit is the project's one
calibration artifact, :class:`monai_ood.calibration.Calibration` (map ``"fused"``, front end
``"nnunet"``, bound to the fingerprint of the checkpoint's weights and the detector), stored as
``fold_<f>/ood_calibration.json`` beside ``checkpoint_final.pth`` (``ood_calibration_<stem>.json`` for
another checkpoint, e.g. ``ood_calibration_checkpoint_best.json``). :func:`load_calibration` refuses, in
one line, a record of another format (the bare Weibull fits written before), another map or other
weights (a re-trained fold, another detector).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ...calibration import Calibration, fingerprint
from .detector import DEFAULT_CHECKPOINT
from .sliding_window import map_values

__all__ = [
    "CALIBRATION_FILE",
    "CALIBRATION_MAP",
    "calibration_path",
    "fit_calibration",
    "load_calibration",
    "model_fingerprint",
]

CALIBRATION_FILE = "ood_calibration.json"
#: the map the calibration is fitted to: the default detector's fused map
CALIBRATION_MAP = "fused"


def calibration_path(fold_folder: str | os.PathLike, checkpoint_name: str = DEFAULT_CHECKPOINT) -> Path:
    """Where the calibration of ``fold_folder/checkpoint_name`` is stored."""
    stem = Path(checkpoint_name).stem
    name = CALIBRATION_FILE if stem == Path(DEFAULT_CHECKPOINT).stem else f"ood_calibration_{stem}.json"
    return Path(fold_folder) / name


def model_fingerprint(weights, detector) -> str:
    """:func:`monai_ood.calibration.fingerprint` of the network (module or state dict, e.g. a
    checkpoint's ``network_weights``) and the fitted detector: what a calibration of its map is bound to."""
    return fingerprint(weights, detector.to_state())


def fit_calibration(
    detector,
    weights,
    cases: Iterable,
    patch_size,
    tile_step_size: float = 0.5,
    metadata: Mapping[str, Any] | None = None,
) -> Calibration:
    """Fit the Weibull to the detector's map on the tiles of ``cases`` and record it.

    Args:
        detector: the fitted :class:`~monai_ood.detectors.FusedDetector` on the trained network.
        weights: the network (or its state dict) whose weights the map comes from.
        cases: preprocessed cases ``(C, *spatial)`` (tensors, arrays or blosc2 arrays), e.g. a generator.
        patch_size, tile_step_size: the tiling of nnU-Net's predictor.
        metadata: recorded as is (fold, checkpoint, cases, ...).
    """

    def values():
        for data in cases:
            yield from map_values(detector, data, patch_size, tile_step_size)

    return Calibration.fit(
        values(),
        map=CALIBRATION_MAP,
        fingerprint=model_fingerprint(weights, detector),
        front_end="nnunet",
        metadata=metadata,
    )


def load_calibration(
    path: str | os.PathLike, weights, detector, remedy: str | None = None
) -> Calibration | None:
    """The calibration stored at ``path`` if it calibrates this detector's map with these weights;
    ``None`` if there is no such file.

    Args:
        path: the ``ood_calibration*.json``.
        weights: the network (or its state dict) the map comes from.
        detector: the fitted detector.
        remedy: appended to the error, e.g. the command that calibrates again.

    Raises:
        ValueError: one line, for a record of another format or version (a bare Weibull fit of an older
            monai-ood), another map or other weights.
    """
    if not Path(path).is_file():
        return None
    try:
        return Calibration.load(path, map=CALIBRATION_MAP, fingerprint=model_fingerprint(weights, detector))
    except ValueError as error:
        message = " ".join(str(error).split())  # one line
        raise ValueError(f"{message} ({remedy})" if remedy else message) from error
