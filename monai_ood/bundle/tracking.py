"""What a bundle run records: TensorBoard logs when the package is there, and the evaluation's metrics file.

* :func:`tensorboard_available` is the default of ``train.json``'s ``use_tensorboard``: the
  ``TensorBoardStatsHandler`` of training and validation are ``_disabled_`` without the ``tensorboard``
  package (one warning line says how to get it), so a bundle trains on a bare MONAI install and logs to
  ``eval/`` as the Model Zoo's bundles do wherever ``tensorboard`` is installed.
* :func:`save_metrics` ends ``evaluate.json``: the evaluator's metrics, the Dice of each class, the
  number of images and the command that ran, as ``eval/evaluate_results.json`` (the file a bundle's
  ``docs/evaluate_results.json`` and its ``metadata.json`` ``eval_metrics`` are copied from).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_metrics", "tensorboard_available"]

logger = logging.getLogger(__name__)


def tensorboard_available() -> bool:
    """Whether MONAI's ``TensorBoardStatsHandler`` can write (the ``tensorboard`` package is installed).

    Logs one warning when it cannot; ``--use_tensorboard False`` turns the handlers off in any case.
    """
    if importlib.util.find_spec("tensorboard") is not None:
        return True
    logger.warning(
        "TensorBoard logging is off: the tensorboard package is not installed (pip install tensorboard)"
    )
    return False


def _command() -> str | None:
    """The command line of this process as typed, when it is MONAI's bundle command line."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is None or script.parts[-2:] != ("bundle", "__main__.py"):
        return None
    return "python -m monai.bundle " + " ".join(_quote(arg) for arg in sys.argv[1:])


def _quote(arg: str) -> str:
    """``arg`` as a POSIX shell reads it back: bare when safe, in double quotes when that is enough
    (``"['configs/train.json','configs/evaluate.json']"``, as the bundles' docs write it)."""
    quoted = shlex.quote(arg)
    if quoted == arg or any(c in arg for c in '"$`\\!'):
        return quoted
    return f'"{arg}"'


def _per_class(engine: Any, metric: str, class_names: Sequence[str] | None) -> dict[str, float]:
    """The mean of ``metric``'s per-image, per-class details over the images (classes absent from an
    image's label are left out of its class mean, as MONAI's ``DiceMetric`` leaves them NaN)."""
    details = getattr(engine.state, "metric_details", None) or {}
    values = details.get(metric)
    if values is None:
        return {}
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.dim() != 2:
        return {}
    names = list(class_names) if class_names is not None else []
    if len(names) != values.shape[1]:
        names = [f"class_{i + 1}" for i in range(values.shape[1])]
    means = values.nanmean(dim=0)
    prefix = metric.removesuffix("mean_dice") if metric.endswith("mean_dice") else f"{metric}_"
    return {f"{prefix}dice_{name}": round(float(v), 4) for name, v in zip(names, means, strict=True)}


def save_metrics(
    engine: Any,
    output_file: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    split: str | None = None,
) -> dict[str, Any] | None:
    """Write the metrics of a finished evaluation run as JSON (atomically; on rank 0 only).

    Args:
        engine: the evaluator after ``run()`` (``engine.state.metrics``, and the per-image, per-class
            values MONAI's ``MeanDice`` keeps in ``engine.state.metric_details``).
        output_file: where to write (folders created).
        class_names: names of the classes the Dice is computed on (without the background when the
            metric leaves it out); ``class_1, ...`` when the count does not match.
        split: the data split evaluated, recorded as given.

    Returns:
        The record written (``None`` on ranks other than 0).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_rank() != 0:
            return None
    metrics: dict[str, float] = {}
    for name, value in engine.state.metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)):
            metrics[name] = round(float(value), 4)
            metrics.update(_per_class(engine, name, class_names))
    record = {
        "metrics": metrics,
        "split": split,
        "num_images": len(engine.data_loader.dataset) if hasattr(engine.data_loader, "dataset") else None,
        "command": _command(),
        "versions": _versions(),
    }
    path = Path(output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(record, indent=4) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    logger.info("evaluation metrics %s -> %s", metrics, path)
    return record


def _versions() -> dict[str, str]:
    import monai
    import numpy

    from .. import __version__

    return {
        "monai-ood": __version__,
        "monai": monai.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
