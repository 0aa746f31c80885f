"""Weibull calibration of a trained model's score maps on validation data (Cho et al. 2023, Eq. 9).

:func:`calibrate` runs the encoder-only OOD pass of a saved model on the validation images, fits a
:class:`~monai_ood.calibration.WeibullCalibrator` to every value of the feature-resolution score maps
``A(x) = min_k D_M`` (the maps the paper calibrates, before any upsampling, so each feature pixel counts
once) and stores it in the checkpoint, where ``monai-ood score`` finds it. A checkpoint with a fitted
default detector (:class:`~monai_ood.detectors.FusedDetector`) is calibrated on the detector's fused map
instead, the map ``score`` writes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..calibration import DegreeCalibrator, WeibullCalibrator
from .checkpoint import load_model, resolve_device, set_calibration, set_weights
from .training import check_items

__all__ = [
    "calibrate",
    "fit_degree",
    "fit_map_and_degree",
    "map_and_score_batches",
    "refit",
]


def _batches(items: Sequence[Mapping[str, Any]], batch_size: int, key: str = "image") -> Iterator[np.ndarray]:
    """Stacks of up to ``batch_size`` consecutive arrays ``item[key]`` of one shape (3D volumes may
    differ in size)."""
    batch: list[np.ndarray] = []
    for item in items:
        array = np.asarray(item[key], dtype=np.float32)
        if batch and (len(batch) == batch_size or array.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(array)
    if batch:
        yield np.stack(batch)


def map_and_score_batches(
    net: torch.nn.Module, detector: Any, items: Sequence[Mapping[str, Any]], batch_size: int, device: Any
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """One pass per batch: the map that is calibrated and the image scores, as ``monai-ood score`` makes
    them: the fitted default detector's fused map on its own grid (else the head's feature-resolution
    ``A(x) = min_k D_M``) ``(B, 1, *map_spatial)`` float32 on the CPU, and ``(B,)`` float64 scores."""
    net.eval()
    with torch.inference_mode():
        for images in _batches(items, batch_size):
            x = torch.from_numpy(images).to(device)
            if detector is not None:
                _, out, low = detector.segment_and_score(x)
                if low is None:
                    raise ValueError("the model's detector has no map term: there is no map to calibrate")
                yield low.float().cpu(), out.image_score.double().cpu().numpy()
            else:
                ood = net.forward_with_ood(x)[1]
                yield ood.score_map.float().cpu(), ood.image_score.double().cpu().numpy()


def fit_degree(scores: Sequence[float] | np.ndarray) -> DegreeCalibrator | None:
    """The OOD degree (:class:`~monai_ood.calibration.DegreeCalibrator`) of the validation images' own
    image scores; ``None``, with a warning, when there are too few of them."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    needed = DegreeCalibrator().min_samples
    if scores.size < needed:
        warnings.warn(
            f"{scores.size} validation images are too few for the OOD degree (at least {needed}); "
            "ood_degree stays empty",
            stacklevel=3,
        )
        return None
    return DegreeCalibrator().fit(scores)


def fit_map_and_degree(
    net: torch.nn.Module, detector: Any, items: Sequence[Mapping[str, Any]], batch_size: int, device: Any
) -> tuple[WeibullCalibrator, DegreeCalibrator | None]:
    """From one pass over the validation items: the Weibull of the map and the OOD degree of the scores."""
    maps, scores = [], []
    for low, score in map_and_score_batches(net, detector, items, batch_size, device):
        maps.append(low)
        scores.append(score)
    return WeibullCalibrator().fit(maps), fit_degree(np.concatenate(scores) if scores else [])


def calibrate(
    checkpoint_path: str | os.PathLike,
    val_items: Sequence[Mapping[str, Any]],
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> WeibullCalibrator:
    """Fit the Weibull calibration of a model on validation images and store it in its checkpoint.

    Args:
        checkpoint_path: a ``model.pt`` written by :func:`~monai_ood.engines.checkpoint.save_model`;
            rewritten (atomically) with the calibration added.
        val_items: ``[{"image": (C, H, W[, D]), ...}, ...]`` prepared like the training items; labels
            are not needed (``A(x)`` uses none).
        batch_size: images per encoder pass.
        device: ``None`` = ``cuda`` if available, else ``cpu``.

    Returns:
        The fitted :class:`~monai_ood.calibration.WeibullCalibrator` (also in ``load_model(...).calibrator``).

    Raises:
        FileNotFoundError, ValueError: for a missing or invalid checkpoint, invalid items (NaN/Inf,
            wrong shape, channels that do not match the model), or score maps the Weibull fit rejects.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    summary = check_items(val_items, "val_items", need_label=False)
    device = resolve_device(device)
    loaded = load_model(checkpoint_path, device=device)
    config = loaded.model_config
    if (summary.in_channels, summary.spatial_dims) != (config["in_channels"], config["spatial_dims"]):
        raise ValueError(
            f"val_items are {summary.spatial_dims}D with {summary.in_channels} channel(s), the model in "
            f"{str(checkpoint_path)!r} takes {config['spatial_dims']}D with {config['in_channels']}"
        )
    if getattr(loaded.net, "term_weibull", None) is not None:
        # several image-score terms: their Weibull hazards are fitted on the same validation images
        loaded.net.fit_score_combination(
            torch.from_numpy(images).to(device) for images in _batches(val_items, batch_size)
        )
        set_weights(checkpoint_path, loaded.net)
    # the map score writes (the detector's, else the head's) and the OOD degree of the validation images'
    # own image scores, read by every later score
    calibrator, degree = fit_map_and_degree(loaded.net, loaded.detector, val_items, batch_size, device)
    set_calibration(checkpoint_path, calibrator, degree=degree)
    return calibrator


def refit(
    checkpoint_path: str | os.PathLike,
    train_items: Sequence[Mapping[str, Any]],
    prototypes: bool = True,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> None:
    """Post-hoc fitting on the training images, stored in the checkpoint: the Gaussian term (if the
    network has one) and, with ``prototypes``, class-conditional means and variances of every prototype
    (:meth:`~monai_ood.networks.PrototypeOODNet.refit`).

    Raises:
        FileNotFoundError, ValueError: for a missing or invalid checkpoint or invalid items.
    """
    check_items(train_items, "train_items", need_label=True)
    device = resolve_device(device)
    loaded = load_model(checkpoint_path, device=device)

    pairs = zip(_batches(train_items, batch_size), _batches(train_items, batch_size, "label"), strict=True)
    loaded.net.refit(((torch.from_numpy(x), torch.from_numpy(y)) for x, y in pairs), prototypes=prototypes)
    # the marker a resumed run reads: a refit that crashed is run again, a finished one is not
    set_weights(checkpoint_path, loaded.net, metrics={"refitted": True})
