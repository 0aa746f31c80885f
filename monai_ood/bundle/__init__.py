"""Bundle-side components: what the MONAI bundles under ``bundles/`` name in their configs.

A MONAI bundle (``python -m monai.bundle run --config_file configs/train.json``) instantiates everything
from JSON by dotted paths, so the pieces the prototype head needs beyond stock MONAI live here:

* data: :func:`load_slices` (training/validation 2D slices: the embedded brain data by default, or a
  user's MONAI datalist of NIfTI volumes) and :func:`inference_items` (the volumes to score);
* training: :class:`PrototypeOODTrainingStep`, the ``iteration_update`` of MONAI's
  :class:`~monai.engines.SupervisedTrainer` that adds the outlier pass and ``L_out``;
  :class:`TrainingForward`, the module to wrap in ``DistributedDataParallel``;
* inference: :class:`PrototypeOODInferer` (logits with ``A(x)`` appended as one more channel, so
  MONAI's sliding-window / slice inferers keep the image metadata), :class:`ScoreMapInferer` (the
  feature-resolution ``A(x)`` the Weibull calibration is fitted on);
* transforms: :class:`NormalizeSlicesd`, :class:`SplitOODOutputd`, :class:`CalibrateOODScored`;
* calibration: :class:`WeibullCalibrationHandler` (fits and writes ``models/calibration.json``),
  :func:`require_checkpoint` and :func:`require_calibration` (clear messages before a run starts).
"""

from ..engines.step import PrototypeOODTrainingStep, TrainingForward, fractional_epoch, training_losses
from .calibration import (
    WeibullCalibrationHandler,
    load_calibration,
    require_calibration,
    require_checkpoint,
)
from .data import find_datalist, flag, inference_items, load_slices, slice_axcodes
from .inferers import PrototypeOODInferer, ScoreMapInferer, unwrap_network
from .transforms import CalibrateOODScored, NormalizeSlicesd, SplitOODOutputd

__all__ = [
    "CalibrateOODScored",
    "NormalizeSlicesd",
    "PrototypeOODInferer",
    "PrototypeOODTrainingStep",
    "ScoreMapInferer",
    "SplitOODOutputd",
    "TrainingForward",
    "WeibullCalibrationHandler",
    "find_datalist",
    "flag",
    "fractional_epoch",
    "inference_items",
    "load_calibration",
    "load_slices",
    "require_calibration",
    "require_checkpoint",
    "slice_axcodes",
    "training_losses",
    "unwrap_network",
]
