"""Post-hoc fitting of the default detector (:class:`~monai_ood.detectors.FusedDetector`) on a trained
network, stored in its ``model.pt``: after ``monai-ood train``, or on a network nobody retrains
(``monai-ood fit``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .checkpoint import load_model, resolve_device, set_detector
from .training import check_items

__all__ = ["fit_detector"]


def fit_detector(
    checkpoint_path: str | os.PathLike,
    train_items: Sequence[Mapping[str, Any]],
    val_items: Sequence[Mapping[str, Any]],
    layers: Sequence[str] | None = None,
    fusion: str = "auto",
    warped_copies: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    device: str | torch.device | None = None,
):
    """Fit the default detector on the network of ``checkpoint_path`` and store it there (atomically; a
    stored calibration is dropped: calibrate again).

    Args:
        checkpoint_path: a ``model.pt``.
        train_items: InD training items ``{"image", "label"?}`` prepared like the model's inputs (labels
            are optional: without them the class prototypes use the network's own prediction).
        val_items: InD validation items (at least 2): the terms' standardisation and the fusion choice.
        layers: stage names to read (``None``: the backbone registry's encoder stages).
        fusion: ``"auto"`` (chosen on outliers synthesised from the validation items) or a rule.
        warped_copies, batch_size, seed: see :class:`~monai_ood.detectors.FusedDetector`.
        device: ``None`` = ``cuda`` if available, else ``cpu``.

    Returns:
        The fitted detector.

    Raises:
        FileNotFoundError, ValueError: for a missing or invalid checkpoint, invalid items, or items whose
            channels or dimensions do not match the model.
    """
    from ..detectors.fused import FusedDetector

    train = check_items(train_items, "train_items", need_label=False)
    val = check_items(val_items, "val_items", need_label=False)
    loaded = load_model(checkpoint_path, device=resolve_device(device))
    config = loaded.model_config
    for what, summary in (("train_items", train), ("val_items", val)):
        if (summary.in_channels, summary.spatial_dims) != (config["in_channels"], config["spatial_dims"]):
            raise ValueError(
                f"{what} are {summary.spatial_dims}D with {summary.in_channels} channel(s), the model in "
                f"{str(checkpoint_path)!r} takes {config['spatial_dims']}D with {config['in_channels']}"
            )
    detector = FusedDetector(
        loaded.net,
        num_classes=config["out_channels"],
        layers=layers,
        fusion=fusion,
        warped_copies=warped_copies,
        batch_size=batch_size,
        seed=seed,
    ).fit(list(train_items), list(val_items))
    set_detector(checkpoint_path, detector)
    return detector
