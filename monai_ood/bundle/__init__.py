"""Bundle-side components: what the MONAI bundles under ``bundles/`` name in their configs.

A MONAI bundle (``python -m monai.bundle run --config_file configs/train.json``) instantiates everything
from JSON by dotted paths; the bundles are a door onto the same core as ``monai-ood train / fit /
calibrate / score``, and the pieces that door needs beyond stock MONAI live here:

* data: :func:`load_slices` (training/validation 2D slices: the embedded brain data by default, or a
  user's MONAI datalist of NIfTI volumes, cut by :class:`~monai_ood.preprocessing.SlicePreprocessing`)
  and :func:`inference_items` (the volumes to score);
* training: :class:`PrototypeOODTrainingStep`, the ``iteration_update`` of MONAI's
  :class:`~monai.engines.SupervisedTrainer` that adds the outlier pass and ``L_out``;
  :class:`TrainingForward`, the module to wrap in ``DistributedDataParallel``;
* post-hoc step (``configs/calibrate.json``): :func:`fit_detector` (the default detector,
  :class:`~monai_ood.detectors.fused.FusedDetector`, -> ``models/detector.pt``) and
  :func:`calibrate_detector` (its Weibull calibration, the core's
  :class:`~monai_ood.calibration.Calibration` record -> ``models/calibration.json``);
* model files: :func:`load_weights`, :func:`require_checkpoint`, :func:`require_detector` and
  :func:`require_calibration` (one-line refusals before a run starts: missing, mismatched or stale);
* records: :func:`tensorboard_available` (``train.json``'s TensorBoard handlers are off without the
  ``tensorboard`` package) and :func:`save_metrics` (``evaluate.json``'s ``eval/evaluate_results.json``);
* inference: :class:`DetectorInferer` (:func:`monai_ood.inference.score_image` with the detector) and
  :class:`ScoreImageStep` (the evaluator's iteration: maps at each input's geometry and the score table
  of ``monai-ood score``).
"""

from ..engines.step import PrototypeOODTrainingStep, TrainingForward, fractional_epoch, training_losses
from .data import find_datalist, inference_items, load_slices
from .posthoc import (
    calibrate_detector,
    fit_detector,
    load_weights,
    require_calibration,
    require_checkpoint,
    require_detector,
    unwrap_network,
)
from .scoring import DetectorInferer, ScoreImageStep
from .tracking import save_metrics, tensorboard_available

__all__ = [
    "DetectorInferer",
    "PrototypeOODTrainingStep",
    "ScoreImageStep",
    "TrainingForward",
    "calibrate_detector",
    "find_datalist",
    "fit_detector",
    "fractional_epoch",
    "inference_items",
    "load_slices",
    "load_weights",
    "require_calibration",
    "require_checkpoint",
    "require_detector",
    "save_metrics",
    "tensorboard_available",
    "training_losses",
    "unwrap_network",
]
