"""Training, calibration and checkpoints of prototype-OOD segmentation models."""

from .calibration import calibrate
from .checkpoint import (
    LoadedModel,
    build_network,
    load_model,
    load_training_state,
    resolve_device,
    save_model,
    set_calibration,
    set_detector,
)
from .training import TrainingConfig, TrainResult, train

__all__ = [
    "LoadedModel",
    "TrainResult",
    "TrainingConfig",
    "build_network",
    "calibrate",
    "load_model",
    "load_training_state",
    "resolve_device",
    "save_model",
    "set_calibration",
    "set_detector",
    "train",
]
