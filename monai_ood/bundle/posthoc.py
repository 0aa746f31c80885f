"""The bundles' post-hoc step and the model files every later step checks before it starts.

``configs/calibrate.json`` (merged over ``train.json``) runs, on the trained ``models/model.pt``, what
``monai-ood fit`` and ``monai-ood calibrate`` run on a ``model.pt`` of the command line:

1. :func:`fit_detector`: the default detector, a :class:`~monai_ood.detectors.fused.FusedDetector` built
   in the config on the trained network, fitted on the bundle's training and validation slices and
   written with :func:`monai_ood.engines.checkpoint.save_detector` to ``models/detector.pt``;
2. :func:`calibrate_detector`: the Weibull fit of that detector's map on the validation slices
   (Cho et al. 2023, Eq. 9), written as the core's one calibration record
   (:class:`~monai_ood.calibration.Calibration`, ``front_end="bundle"``) to ``models/calibration.json``,
   bound by its fingerprint to these weights and this detector.

Inference reads the three files with :func:`load_weights`, :func:`require_detector` and
:func:`require_calibration`, which stop the run with one line saying what to run (a missing file, weights
that do not fit the config's network, a detector or calibration of other weights, an older calibration
format), raised as :class:`SystemExit` so that the command line shows the line alone: MONAI's config
parser wraps every ``Exception`` in ``RuntimeError: Failed to evaluate ...`` with a traceback.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration import Calibration, fingerprint
from ..detectors.base import module_device
from ..engines.calibration import fit_map_and_degree
from ..engines.checkpoint import load_detector, model_map, save_detector
from ..engines.step import TrainingForward

__all__ = [
    "calibrate_detector",
    "fit_detector",
    "load_weights",
    "require_calibration",
    "require_checkpoint",
    "require_detector",
    "unwrap_network",
]

logger = logging.getLogger(__name__)

CALIBRATE_COMMAND = (
    "python -m monai.bundle run --config_file \"['configs/train.json','configs/calibrate.json']\""
)
TRAIN_COMMAND = "python -m monai.bundle run --config_file configs/train.json"
_CALIBRATE_HINT = f"fit the detector and its calibration again, from the bundle's folder: {CALIBRATE_COMMAND}"


def _stop(message: str) -> SystemExit:
    """A :class:`SystemExit` with one line (the command line prints it alone, exit status 1)."""
    return SystemExit("error: " + " ".join(str(message).split()))


def unwrap_network(network: nn.Module) -> nn.Module:
    """The :class:`~monai_ood.networks.PrototypeOODNet` inside DDP / DataParallel / :class:`TrainingForward`.

    Raises:
        TypeError: if what is inside is not a ``PrototypeOODNet`` (it has no ``forward_with_ood``).
    """
    inner = network
    while True:
        if isinstance(inner, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = inner.module
        elif isinstance(inner, TrainingForward):
            inner = inner.network
        else:
            break
    if not hasattr(inner, "forward_with_ood"):
        raise TypeError(
            f"the network must be a monai_ood PrototypeOODNet (with forward_with_ood), got {type(inner).__name__}"
        )
    return inner


def require_checkpoint(path: str | os.PathLike) -> str:
    """``str(path)`` if the trained weights exist there; else stop the run, saying how to train.

    Raises:
        SystemExit: no file at ``path``.
    """
    if not Path(path).is_file():
        raise _stop(
            f"no trained model at {str(path)!r}: train the bundle first, from the bundle's folder: "
            f"{TRAIN_COMMAND} (or point --bundle_root / --ckpt_dir at the folder that holds model.pt)"
        )
    return str(path)


def load_weights(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the trained weights of ``models/model.pt`` (written by ``train.json``'s ``CheckpointSaver``)
    into ``network`` (the config's ``network_def``, possibly moved to a device or wrapped), strictly.

    Returns:
        ``network``, so that a config can write ``load_weights(@network_def, ...).to(@device)``.

    Raises:
        SystemExit: no file, an unreadable file, or weights of another network (one line saying that
            the network settings must be given to every step alike).
    """
    require_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file fails in many ways
        raise _stop(
            f"{str(path)!r} is not a readable state dict ({type(error).__name__}: {error})"
        ) from error
    if isinstance(state, Mapping) and set(state) == {"model"}:  # CheckpointSaver of several objects
        state = state["model"]
    try:
        unwrap_network(network).load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()
        raise _stop(
            f"the weights in {str(path)!r} do not fit this config's network "
            f"({first[0] if first else type(error).__name__}); give every step the same --num_classes, "
            "--backbone#... and --network_def#... as training"
        ) from error
    return network


def fit_detector(
    detector: Any,
    train_items: Sequence[Mapping[str, Any]],
    val_items: Sequence[Mapping[str, Any]],
    output_file: str | os.PathLike,
) -> Any:
    """Fit the default detector on the training and validation slices and write it to ``output_file``.

    Args:
        detector: an unfitted :class:`~monai_ood.detectors.fused.FusedDetector` on the trained network
            (``calibrate.json``'s ``calibrate#detector``: its settings are those of ``monai-ood fit``).
        train_items, val_items: ``[{"image": (1, H, W), "label": (1, H, W)}]`` slices (labels optional),
            as :func:`monai_ood.bundle.load_slices` makes them; at least 2 of each.
        output_file: ``models/detector.pt`` (written atomically, folders created).

    Returns:
        The fitted detector.

    Raises:
        SystemExit: the fit is refused (e.g. too few slices, a term without spread), in one line.
    """
    try:
        detector.fit(list(train_items), list(val_items))
        save_detector(output_file, detector)
    except ValueError as error:
        raise _stop(f"the default detector could not be fitted: {error}") from error
    selection = detector.selection_ or {}
    logger.info(
        "default detector fitted on %d training and %d validation slices (fusion %s, terms %s) -> %s",
        len(train_items),
        len(val_items),
        selection.get("chosen", detector.fusion_),
        ", ".join(detector.term_names),
        output_file,
    )
    return detector


def calibrate_detector(
    network: nn.Module,
    detector: Any,
    val_items: Sequence[Mapping[str, Any]],
    output_file: str | os.PathLike,
    batch_size: int = 16,
) -> Calibration:
    """Fit the Weibull calibration of the detector's map on the validation slices and write the record.

    The values are the detector's fused map on its own grid, as ``monai-ood calibrate`` fits them
    (:func:`monai_ood.engines.calibration.fit_map_and_degree`, one pass that also gives the OOD degree); the record calibrates the map
    ``"fused"`` of the weights of ``network`` with this detector (its fingerprint).

    Args:
        network: the trained network the detector was fitted on (the whole ``PrototypeOODNet``: its
            weights are part of the fingerprint).
        detector: the fitted detector.
        val_items: the validation slices.
        output_file: ``models/calibration.json`` (written atomically).
        batch_size: slices per forward pass.

    Returns:
        The :class:`~monai_ood.calibration.Calibration` written.

    Raises:
        SystemExit: the fit is refused (e.g. too few map values), in one line.
    """
    network = unwrap_network(network)
    try:
        device = module_device(network, torch.device("cpu"))
        weibull, degree = fit_map_and_degree(network, detector, val_items, batch_size, device)
        calibration = Calibration(
            weibull,
            model_map(detector),
            fingerprint(network, detector.to_state()),
            "bundle",
            {"validation_images": len(val_items)},
            degree,
        )
        calibration.save(output_file)
    except ValueError as error:
        raise _stop(f"the calibration could not be fitted: {error}") from error
    logger.info("calibration of the %r map: %r -> %s", calibration.map, calibration.weibull, output_file)
    return calibration


def require_detector(path: str | os.PathLike, network: nn.Module) -> Any:
    """The default detector written by the post-hoc step, rebuilt on ``network`` (with its weights loaded).

    Raises:
        SystemExit: no file (the message says what to run), or a file that does not fit the network.
    """
    if not Path(path).is_file():
        raise _stop(
            f"no default detector at {str(path)!r}: fit it and its calibration on the validation data "
            f"first, from the bundle's folder: {CALIBRATE_COMMAND}"
        )
    try:
        return load_detector(path, unwrap_network(network))
    except ValueError as error:
        raise _stop(f"{error}; {_CALIBRATE_HINT}") from error


def require_calibration(path: str | os.PathLike, network: nn.Module, detector: Any) -> Calibration:
    """The calibration record of the detector's map, if it was fitted for these weights and this detector.

    Args:
        path: ``models/calibration.json``.
        network: the network with its trained weights loaded.
        detector: the detector read by :func:`require_detector`.

    Raises:
        SystemExit: no file, or a calibration of another format version, another map, other weights or
            another detector (in one line, saying what to run): A_xi on a stale scale is never written.
    """
    if not Path(path).is_file():
        raise _stop(
            f"no calibration at {str(path)!r}, so A_xi (the calibrated OOD map) cannot be written: fit the "
            f"detector and its calibration on the validation data first, from the bundle's folder: "
            f"{CALIBRATE_COMMAND}"
        )
    expected = fingerprint(unwrap_network(network), detector.to_state())
    try:
        return Calibration.load(path, map=model_map(detector), fingerprint=expected)
    except ValueError as error:
        message = re.sub(r"[:;,]?\s*calibrate again( on the validation data)?$", "", str(error))
        raise _stop(f"{message}; {_CALIBRATE_HINT}") from error
