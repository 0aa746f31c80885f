"""The prototype OOD head in nnU-Net v2 (``pip install "monai-ood[nnunet]"``, ``nnunetv2>=2.8``).

* :class:`nnUNetTrainerPrototypeOOD` (and :class:`PrototypeOODTrainerMixin` for other trainer variants):
  ``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerPrototypeOOD`` once ``nnUNet_extTrainer`` points
  at :func:`trainer_folder` (``python -m monai_ood.integrations.nnunet env`` prints the line).
* The project's default detector (:class:`~monai_ood.detectors.FusedDetector`) on nnU-Net's encoder
  stages, fitted at the end of training on patches of the fold's cases and stored as
  ``fold_<f>/ood_detector.pt`` (:mod:`~monai_ood.integrations.nnunet.detector`), and the calibration of
  its map on the validation fold, the project's :class:`~monai_ood.calibration.Calibration` record,
  stored as ``fold_<f>/ood_calibration.json`` (:mod:`~monai_ood.integrations.nnunet.calibration`).
* :class:`nnUNetPrototypeOODPredictor`: nnU-Net's predictor writing the detector's ``A`` and ``A_xi``
  into the ``ood/`` subfolder of the prediction folder, so that nnU-Net's own tools see only the
  segmentations (``python -m monai_ood.integrations.nnunet predict ...``).
* :func:`load_pretrained_weights`: ``-pretrained_weights`` from a plain nnU-Net checkpoint onto the
  wrapper's ``backbone.*`` (:mod:`~monai_ood.integrations.nnunet.pretrained`).

Names are imported on first use, so ``env`` works without loading nnU-Net.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "nnUNetTrainerPrototypeOOD": "trainer",
    "PrototypeOODTrainerMixin": "trainer",
    "OutlierChannels": "trainer",
    "nnUNetPrototypeOODPredictor": "predictor",
    "find_trainer_class": "predictor",
    "nnUNetPrototypeOODNet": "network",
    "bottleneck_layer": "network",
    "calibration_path": "calibration",
    "fit_calibration": "calibration",
    "load_calibration": "calibration",
    "model_fingerprint": "calibration",
    "detector_path": "detector",
    "fit_detector": "detector",
    "sample_patches": "detector",
    "CaseScores": "sliding_window",
    "score_case": "sliding_window",
    "map_values": "sliding_window",
    "map_to_original_array": "geometry",
    "map_to_input_image": "geometry",
    "load_pretrained_weights": "pretrained",
    "PretrainedWeights": "pretrained",
    "export_line": "cli",
    "trainer_folder": "cli",
}

__all__ = sorted(_EXPORTS)

_NNUNET_MODULES = (
    "nnunetv2",
    "dynamic_network_architectures",
    "batchgenerators",
    "batchgeneratorsv2",
    "acvl_utils",
)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = import_module(f".{_EXPORTS[name]}", __name__)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] in _NNUNET_MODULES:
            raise ImportError(
                f"monai_ood.integrations.nnunet needs nnU-Net v2 ({error.name} is missing): "
                'pip install "monai-ood[nnunet]"'
            ) from error
        raise
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
