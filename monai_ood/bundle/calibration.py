"""The calibration step of the bundles (Weibull fit, Cho et al. 2023 Eq. 9) and the checks before a run.

``configs/calibrate.json`` runs a MONAI :class:`~monai.engines.SupervisedEvaluator` over the validation
split with :class:`~monai_ood.bundle.ScoreMapInferer` (feature-resolution ``A(x)``, as
:func:`monai_ood.engines.calibrate` fits it) and a :class:`WeibullCalibrationHandler`, which collects
every map and, when the run completes, fits a :class:`~monai_ood.calibration.WeibullCalibrator` and
writes it (atomically) to ``models/calibration.json``. Inference reads that file to write ``A_xi``, and
refuses to start without it (:func:`require_calibration`) unless told to skip ``A_xi``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from ..calibration import WeibullCalibrator

__all__ = ["WeibullCalibrationHandler", "load_calibration", "require_calibration", "require_checkpoint"]

logger = logging.getLogger(__name__)

_CALIBRATE_COMMAND = (
    "python -m monai.bundle run --config_file \"['configs/train.json','configs/calibrate.json']\""
)
_TRAIN_COMMAND = "python -m monai.bundle run --config_file configs/train.json"


def _missing_checkpoint(path: str | os.PathLike) -> str:
    return (
        f"no trained model at {str(path)!r}: train the bundle first, from the bundle's folder:\n"
        f"    {_TRAIN_COMMAND}\n"
        "(or point --bundle_root / --ckpt_dir at the folder that holds model.pt)"
    )


def _missing_calibration(path: str | os.PathLike) -> str:
    return (
        f"no Weibull calibration at {str(path)!r}, so A_xi (the calibrated OOD map) cannot be written. "
        "Fit it on the validation data first, from the bundle's folder:\n"
        f"    {_CALIBRATE_COMMAND}\n"
        "or run inference with --save_calibrated false to write only the segmentation and A(x)."
    )


def require_checkpoint(path: str | os.PathLike) -> str:
    """``path`` if the trained weights exist there; else stop the run, saying how to train.

    Meant for the ``initialize`` step of a bundle config: it raises :class:`SystemExit` with the message
    (so the command line shows the message alone, not a traceback through MONAI's config parser, which
    wraps every ``Exception`` in ``RuntimeError: Failed to evaluate ...``).

    Returns:
        ``str(path)``, so a config can use the call where it needs the path.
    """
    if not Path(path).is_file():
        raise SystemExit(f"error: {_missing_checkpoint(path)}")
    return str(path)


def require_calibration(path: str | os.PathLike) -> str:
    """``path`` if a Weibull calibration exists there; else stop the run, saying what to run.

    Inference writes ``A_xi`` (the calibrated map in [0, 1]) only with a calibration fitted on
    validation data: there is no meaningful default scale to fall back on. Raises :class:`SystemExit`
    like :func:`require_checkpoint`.
    """
    if not Path(path).is_file():
        raise SystemExit(f"error: {_missing_calibration(path)}")
    return str(path)


def load_calibration(path: str | os.PathLike) -> WeibullCalibrator:
    """The fitted calibrator written by the calibration step.

    Raises:
        FileNotFoundError: if there is none (the message says how to make it).
        ValueError: for an invalid file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(_missing_calibration(path))
    return WeibullCalibrator.load(path)


def _default_output_transform(output: Any) -> Any:
    """``pred`` of the engine output: a batch dict (``decollate=False``) or a list of per-item dicts."""
    if isinstance(output, Mapping):
        return output["pred"]
    if isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
        return [item["pred"] for item in output]
    return output


class WeibullCalibrationHandler:
    """Fit the Weibull calibration on the score maps an evaluator produces, and save it as JSON.

    Collects ``output_transform(engine.state.output)`` (score maps ``A(x)``, tensors or lists of them)
    after every iteration; when the engine completes, fits a
    :class:`~monai_ood.calibration.WeibullCalibrator` to all values and writes it to ``output_file``
    (atomically, folders created). The fitted calibrator is also ``engine.state.calibrator``.

    Args:
        output_file: where to write the calibration (the bundles: ``models/calibration.json``).
        output_transform: picks the maps from the engine output; default: its ``pred``.
        max_samples, seed, min_samples: see :class:`~monai_ood.calibration.WeibullCalibrator`.
    """

    def __init__(
        self,
        output_file: str | os.PathLike,
        output_transform: Callable[[Any], Any] = _default_output_transform,
        max_samples: int | None = 1_000_000,
        seed: int = 0,
        min_samples: int = 10,
    ) -> None:
        self.output_file = Path(output_file)
        self.output_transform = output_transform
        self.calibrator_kwargs = {"max_samples": max_samples, "seed": seed, "min_samples": min_samples}
        self._maps: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._fit)

    def _reset(self, engine: Engine) -> None:
        self._maps = []

    def _collect(self, engine: Engine) -> None:
        maps = self.output_transform(engine.state.output)
        for chunk in maps if isinstance(maps, (list, tuple)) else [maps]:
            self._maps.append(torch.as_tensor(chunk).detach().float().cpu().reshape(-1))

    def _fit(self, engine: Engine) -> None:
        if not self._maps:
            raise ValueError("the calibration run produced no score map: is the validation data empty?")
        calibrator = WeibullCalibrator(**self.calibrator_kwargs).fit(self._maps)
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        calibrator.save(self.output_file)
        engine.state.calibrator = calibrator
        count = sum(int(m.numel()) for m in self._maps)
        logger.info(
            "Weibull calibration fitted on %d score-map values: %r -> %s", count, calibrator, self.output_file
        )
        self._maps = []
