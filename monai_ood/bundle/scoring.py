"""Inference of the bundles: what ``monai-ood score`` writes, through MONAI's evaluator.

``configs/inference.json`` runs a MONAI :class:`~monai.engines.SupervisedEvaluator` whose iteration is
:class:`ScoreImageStep`: for every input volume it reads the file with :func:`monai_ood.io.read_image`,
scores it with the evaluator's inferer, :class:`DetectorInferer` (:func:`monai_ood.inference.score_image`
with the fitted default detector and its calibration: the slicing of training and of the command line,
:class:`~monai_ood.preprocessing.SlicePreprocessing`, and the resampling of every output back onto the
input's own grid), writes the segmentation, the detector's map A and A_xi as one set of files, and
records the input in the folder's score table (:class:`monai_ood.io.tables.ScoreTable`:
``scores.csv`` / ``scores.json``, the columns of ``monai-ood score``). An input that cannot be scored
gets a ``failed`` row with its error and the run goes on; :meth:`ScoreImageStep.finish` then stops with
one line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from monai.data import decollate_batch
from monai.inferers import Inferer
from monai.utils import look_up_option
from torch import nn

from ..inference import ScoredImage, score_image
from ..io import output_stem, read_image
from ..io.tables import ScoreTable, volume_row
from ..preprocessing import SlicePreprocessing
from .posthoc import unwrap_network

__all__ = ["DetectorInferer", "ScoreImageStep"]

logger = logging.getLogger(__name__)

_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd"}  # the --format choices of monai-ood score
# what an input can do wrong (unreadable, no contrast, NaN outputs, maps that do not fit it, a full disk):
# its row says failed and the other inputs are scored; anything else is a bug and stops the run
_INPUT_ERRORS = (ValueError, OSError, RuntimeError, MemoryError)
#: the file name postfix of each output, as ``monai-ood score`` names them
_POSTFIXES = {"segmentation": "seg", "score_map": "score", "calibrated_map": "score_calibrated"}


class DetectorInferer(Inferer):
    """Segment and score one image with the fitted default detector: :func:`monai_ood.inference.score_image`.

    Args:
        preprocessing: the slicing of training (``train.json``'s ``slice_preprocessing``).
        detector: the fitted :class:`~monai_ood.detectors.fused.FusedDetector`
            (:func:`monai_ood.bundle.require_detector`).
        calibration: its :class:`~monai_ood.calibration.Calibration`
            (:func:`monai_ood.bundle.require_calibration`), or ``None`` for no A_xi.
        batch_size: slices per forward pass.

    Returns (of a call ``inferer(image, network)``, ``image`` a :class:`SimpleITK.Image` of any
    orientation and spacing): a :class:`~monai_ood.inference.ScoredImage`, every map on ``image``'s grid.
    """

    def __init__(
        self,
        preprocessing: SlicePreprocessing,
        detector: Any,
        calibration: Any = None,
        batch_size: int = 16,
    ) -> None:
        super().__init__()
        if not isinstance(preprocessing, SlicePreprocessing):
            raise ValueError(f"preprocessing must be a SlicePreprocessing, got {preprocessing!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.preprocessing = preprocessing
        self.detector = detector
        self.calibration = calibration
        self.batch_size = batch_size

    def __call__(self, inputs: sitk.Image, network: nn.Module, *args: Any, **kwargs: Any) -> ScoredImage:
        weibull = None if self.calibration is None else self.calibration.weibull
        degree = None if self.calibration is None else self.calibration.degree
        return score_image(
            unwrap_network(network),
            inputs,
            self.preprocessing,
            weibull,
            self.batch_size,
            self.detector,
            degree,
        )


class ScoreImageStep:
    """The ``iteration_update`` of the inference evaluator: read, score, write, record one input at a time.

    A batch is what a :class:`~monai.data.DataLoader` of datalist items ``{"image": path}`` gives (or
    one item, or a list of them). The input's maps are written
    as ``<stem>_seg``, ``<stem>_score`` and ``<stem>_score_calibrated`` (NIfTI affine copied from a
    NIfTI input) in ``output_dir``, all or none, before its row in ``scores.csv`` / ``scores.json`` says
    ``ok``; re-scoring an input replaces its maps and its row, rows of other inputs scored into the folder
    earlier are kept (their maps are still there).

    Args:
        output_dir: the output folder (created when needed).
        output_format: ``"nifti"`` (``.nii.gz``) or ``"nrrd"``.

    Returns (of a call): the volume rows of the batch's inputs.
    """

    def __init__(self, output_dir: str | os.PathLike, output_format: str = "nifti") -> None:
        self.output_dir = Path(output_dir)
        self.suffix = look_up_option(output_format, _FORMATS)
        self.table = ScoreTable(self.output_dir)
        self.table.read(strict=False)
        self.rows: list[dict] = []  # the rows of this run, in order

    def __call__(self, engine: Any, batch: Any) -> list[dict]:
        if isinstance(batch, Mapping) and isinstance(batch.get("image"), (str, os.PathLike)):
            items = [batch]
        else:
            items = decollate_batch(batch, detach=False) if isinstance(batch, Mapping) else list(batch)
        return [self.score(engine.inferer, engine.network, item) for item in items]

    def _paths(self, stem: str, calibrated: bool) -> dict[str, Path]:
        return {
            key: self.output_dir / f"{stem}_{postfix}{self.suffix}"
            for key, postfix in _POSTFIXES.items()
            if calibrated or key != "calibrated_map"
        }

    def score(self, inferer: Any, network: nn.Module, item: Mapping[str, Any]) -> dict:
        """Score one input (``item["image"]``), write its maps and record its row; returns the row."""
        path = Path(item["image"])
        stem = output_stem(path)
        calibrated = getattr(inferer, "calibration", None) is not None
        paths = self._paths(stem, calibrated)
        try:
            scored = inferer(read_image(path), network)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            scored.write(paths, path if path.is_file() else None)
        except _INPUT_ERRORS as error:
            return self._record(stem, volume_row(path, "failed", paths, " ".join(str(error).split())))
        row = volume_row(path, "ok", paths, scored=scored)
        degree = "n/a" if scored.calibrated_degree is None else f"{scored.calibrated_degree:.3f}"
        logger.info("%s: image score %.2f, calibrated degree %s", path, scored.image_score, degree)
        return self._record(stem, row, [{"input": str(path), **s} for s in scored.slices])

    def _record(self, stem: str, row: dict, slices=()) -> dict:
        if row["status"] != "ok":
            logger.error("failed: %s: %s", row["input"], row["error"])
        self.table.set(stem, row, slices)
        self.table.write()
        self.rows.append(row)
        return row

    def finish(self) -> list[dict]:
        """After the run: the rows of this run; stops with one line if any input failed.

        Raises:
            SystemExit: some inputs failed (their rows in ``scores.csv`` say why) or there was none.
        """
        failed = [row for row in self.rows if row["status"] != "ok"]
        if not self.rows:
            raise SystemExit("error: no input was scored (the datalist of inference is empty)")
        logger.info("maps and scores.csv/json of %d input(s) written to %s", len(self.rows), self.output_dir)
        if failed:
            raise SystemExit(
                f"error: {len(failed)} of {len(self.rows)} inputs failed (see the status and error columns "
                f"of {self.table.csv_path}); the first: {failed[0]['input']}: {failed[0]['error']}"
            )
        return self.rows
