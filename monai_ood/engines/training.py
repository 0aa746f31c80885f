"""Training of a segmentation network with the auxiliary prototypical OOD head (Cho et al. 2023, Sec. 4.1).

One run trains ``L = L_seg + lambda * L_out`` (:class:`~monai_ood.losses.SegOODLoss`) with AdamW and
cosine annealing with warm restarts (the paper's AdamWR), on MONAI's engines:

* :class:`monai.engines.SupervisedTrainer` with the one training step of every front-end
  (:class:`~monai_ood.engines.step.PrototypeOODTrainingStep`): ``net.forward_train(images,
  outliers)`` runs the whole network on the InD batch and only the encoder on the outliers; the
  engine output holds ``loss``, ``seg_loss`` and ``ood_loss``.
* :class:`monai.engines.SupervisedEvaluator` every ``val_interval`` epochs (``ValidationHandler``),
  scoring ``MeanDice(include_background=False)`` of argmax predictions; the best model by validation
  Dice is written to ``model.pt`` (the paper selects its checkpoints this way), see
  :mod:`monai_ood.engines.checkpoint` for the format.
* ``LrScheduleHandler`` steps :class:`~torch.optim.lr_scheduler.CosineAnnealingWarmRestarts` after
  every iteration with the fractional epoch ``iteration / epoch_length``.
* ``StatsHandler`` logs one line per epoch for training and for validation (logger
  ``monai_ood.training``; configure logging to see it), and a tqdm progress bar shows the iterations
  when stderr is a terminal (nothing is written to non-terminal logs).
* ``last.pt`` is written after every epoch, after validation, for ``resume=True``.

Data: every training item is augmented by ONE ``RandAffined`` (rotation <= ``rotate_degrees``,
translation <= ``translate_pixels``; bilinear for the image, nearest for the label, zero padding), and
its auxiliary outlier is made from the augmented image (``CopyItemsd`` + ``OutlierSynthesisd``), so
outliers are synthesised in the DataLoader workers, one per InD image (the paper's ``n_b = n_a``).

Reproducibility and resume: ``set_determinism(seed)`` and ``Compose.set_random_state(seed)`` seed a
run; MONAI's DataLoader seeds each worker's transforms from the torch RNG of the main process at every
epoch (workers are not persistent, so they restart each epoch). Everything that draws random numbers
between two epochs is therefore either in the main process's python/numpy/torch/CUDA RNGs or in the
main-process transforms' ``R`` (``num_workers=0``); ``last.pt`` stores all of them, taken at the end of
an epoch after validation, with the model, optimizer, scheduler and grad-scaler states. A run
interrupted after epoch ``e`` and resumed gives the same weights as an uninterrupted run (tested
bit-for-bit on the CPU with ``num_workers=0``; with workers the same holds as long as
``num_workers`` is unchanged, because the worker seeds come from the restored torch RNG). The unit of
resumption is the epoch: an interrupted epoch is run again from its start.

With ``num_workers=0`` MONAI's DataLoader re-seeds the transforms itself (from the torch RNG, which it
then resets to its initial seed), superseding ``Compose.set_random_state``; both are deterministic, so
this changes nothing above. Validation uses no worker processes: its items are in memory and its
transforms are not random, so workers would only add their start-up time to every validation.

MONAI's engines were kept (rather than a plain loop) because the custom step is one ``iteration_update``
function and every piece of state lives in objects built identically on every start, so restoring it
is a handful of ``load_state_dict`` calls plus ``engine.state.epoch``/``iteration``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Average
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, MeanDice, StatsHandler, ValidationHandler, from_engine
from monai.inferers import SimpleInferer
from monai.transforms import AsDiscreted, Compose, CopyItemsd, EnsureTyped
from monai.utils import look_up_option, set_determinism
from torch import nn

from ..files import atomic_write_text
from ..losses import SegOODLoss
from ..networks.presets import PRESETS
from ..preprocessing import SlicePreprocessing, VolumePreprocessing
from ..transforms import OutlierSynthesisd, affine_augmentation
from ..transforms.outlier_synthesis import LOCAL_OPS, PAPER_OPS
from .checkpoint import (
    build_network,
    capture_rng_state,
    cpu_state_dict,
    load_model,
    load_training_state,
    make_model_config,
    resolve_device,
    restore_rng_state,
    save_model,
    save_training_state,
)
from .step import PrototypeOODTrainingStep, fractional_epoch

__all__ = [
    "LOGGER_NAME",
    "TrainResult",
    "TrainingConfig",
    "train",
    "training_transforms",
    "validation_transforms",
]

LOGGER_NAME = "monai_ood.training"
BEST_CHECKPOINT = "model.pt"
LAST_CHECKPOINT = "last.pt"
HISTORY_FILE = "history.json"
KEY_METRIC = "val_mean_dice"

# Fields a resumed run may change: they do not alter what the next epoch computes from the saved state
# (num_workers changes how worker seeds are drawn, so a resumed run with other workers is valid but not
# bit-identical to an uninterrupted one).
_RESUMABLE_CHANGES = frozenset({"max_epochs", "num_workers", "device", "val_interval", "amp"})

logger = logging.getLogger(LOGGER_NAME)


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _number(value: Any, name: str, low: float = 0.0, high: float = math.inf, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must lie in {bound}, got {value!r}")
    return float(value)


# PrototypeOODNet options set elsewhere: by the model (backbone, classes, channels) or by their own field
_HEAD_FIELDS = frozenset(
    {
        "backbone",
        "num_classes",
        "feature_channels",
        "spatial_dims",
        "head_channels",
        "extra_layers",
        "global_head",
        "gaussian_term",
        "aggregation",
    }
)


def _check_head_kwargs(value: Any) -> dict[str, Any]:
    """``head_kwargs``: a dict of PrototypeOODNet options that have no field of their own."""
    import inspect

    from ..networks.prototype_net import PrototypeOODNet

    if not isinstance(value, Mapping):
        raise ValueError(f"head_kwargs must be a dict, got {value!r}")
    options = set(inspect.signature(PrototypeOODNet.__init__).parameters) - {"self"} - _HEAD_FIELDS
    unknown = sorted(set(value) - options)
    if unknown:
        own = sorted(set(unknown) & _HEAD_FIELDS)
        hint = f" ({own} have their own settings)" if own else ""
        raise ValueError(f"head_kwargs: unknown option(s) {unknown}{hint}; the options are {sorted(options)}")
    return dict(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


#: Head configurations: ``paper`` is Cho et al. (2023) exactly as published; ``default`` is this project's
#: improved head (chosen on the validation split and training outliers only, see the README).
HEAD_CONFIGS: dict[str, dict[str, Any]] = {
    "paper": {
        "extra_layers": 0,
        "global_head": False,
        "gaussian_term": False,
        "aggregation": "mean",
        "class_balanced": False,
        "refit": False,
        "select_by": "dice",
        "outlier_ops": PAPER_OPS,
    },
    # chosen by the highest validation AUROC against outliers synthesised from validation slices, with
    # the validation Dice kept (benchmarks/results/v1/heads): the paper's training, then the prototypes
    # re-estimated from the training features and the post-hoc Gaussian term added
    "default": {
        "extra_layers": 0,
        "global_head": False,
        "gaussian_term": True,
        "aggregation": "mean",
        "class_balanced": False,
        "refit": True,
        "select_by": "dice",
        "outlier_ops": PAPER_OPS,
    },
    # every trained lever at once (the "default (all)" row of the ablation): lower Dice, kept to reproduce it
    "all": {
        "extra_layers": 2,
        "global_head": True,
        "gaussian_term": True,
        "aggregation": "mean",
        "class_balanced": True,
        "refit": False,
        "select_by": "last",
        "outlier_ops": PAPER_OPS + LOCAL_OPS,
    },
}
SELECT_BY = ("dice", "last")


@dataclass
class TrainingConfig:
    """Settings of one training run (defaults follow the paper where it gives a value).

    Args:
        preset: network preset (``unet``, ``basic_unet``, ``dynunet``, ``segresnet``, ``deeplabv3``).
        network_kwargs: overrides of the network's constructor arguments.
        head_channels: embedding size ``c_g`` of the projection head (paper: 256).
        lambda_out: weight of ``L_out`` (paper: 0.1).
        batch_size: InD images per step ``n_a`` (paper: 8).
        outlier_batch_size: outliers per step ``n_b``, at most ``batch_size`` (each outlier is made from
            one InD image of the batch); ``None`` = ``batch_size`` (paper: ``n_b = n_a``); 0 trains without
            outlier exposure.
        max_epochs: training epochs (paper: 150).
        learning_rate: AdamW learning rate at the start of each cosine cycle.
        weight_decay: AdamW (decoupled) weight decay.
        warm_restart_epochs: ``T_0`` of ``CosineAnnealingWarmRestarts``, the length of the first cycle.
        warm_restart_mult: ``T_mult``, the growth of each next cycle. With the defaults (10, 2) the
            cycles end at epochs 10, 30, 70, 150, so the paper's 150 epochs end at a cycle's low point.
        rotate_degrees: maximum rotation of the augmentation (paper: 15).
        translate_pixels: maximum translation in pixels (paper: 10).
        head_config: ``"default"`` (this project's head), ``"paper"`` (as published) or ``"all"`` (every
            trained lever); fills every option below that is left at ``None`` (see :data:`HEAD_CONFIGS`).
        extra_layers: multi-scale heads: number of extra (finer) encoder stages, or their names.
        global_head: add the image-level prototype on pooled bottleneck features.
        gaussian_term: add the post-hoc Gaussian on pooled bottleneck features (fitted after training).
        aggregation: image score of the local maps: ``"mean"`` (paper), ``"quantile"``, ``"foreground"``.
        class_balanced: class-balanced inlier term of ``L_out``.
        refit: re-estimate the prototypes from the training features after training.
        select_by: which weights become ``model.pt``: best validation Dice (``"dice"``) or the
            ``"last"`` epoch's (the head keeps learning after the best Dice epoch).
        head_kwargs: any further option of :class:`~monai_ood.networks.PrototypeOODNet` (``layer``,
            ``head_act``, ``outlier_norm``, ``global_grid``, ``quantile``); the options above have their
            own fields.
        outlier_ops: operations of :class:`~monai_ood.transforms.OutlierSynthesis`.
        outlier_op_weights: their sampling probabilities; ``None`` = uniform.
        num_classes: output classes K including background; ``None`` = ``len(class_names)`` if given,
            else the largest training/validation label + 1.
        num_workers: DataLoader worker processes (outliers are synthesised there).
        seed: seed of every random generator of the run.
        val_interval: validate every this many epochs.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` = ``cuda`` if available, else ``cpu``.
        amp: mixed precision (CUDA only; ignored with a warning on the CPU).
    """

    preset: str = "unet"
    network_kwargs: dict[str, Any] = field(default_factory=dict)
    head_channels: int = 256
    lambda_out: float = 0.1
    batch_size: int = 8
    outlier_batch_size: int | None = None
    max_epochs: int = 150
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warm_restart_epochs: int = 10
    warm_restart_mult: int = 2
    rotate_degrees: float = 15.0
    translate_pixels: float = 10.0
    head_config: str = "default"
    extra_layers: int | tuple[str, ...] | None = None
    global_head: bool | None = None
    gaussian_term: bool | None = None
    aggregation: str | None = None
    class_balanced: bool | None = None
    refit: bool | None = None
    select_by: str | None = None
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    outlier_ops: tuple[str, ...] | None = None
    outlier_op_weights: tuple[float, ...] | None = None
    num_classes: int | None = None
    num_workers: int = 2
    seed: int = 0
    val_interval: int = 1
    device: str | None = None
    amp: bool = False

    def __post_init__(self) -> None:
        self.preset = look_up_option(self.preset, tuple(PRESETS))
        self.head_config = look_up_option(self.head_config, tuple(HEAD_CONFIGS))
        for name, value in HEAD_CONFIGS[self.head_config].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if isinstance(self.extra_layers, bool) or not isinstance(self.extra_layers, (int, Sequence)):
            raise ValueError(f"extra_layers must be a count or layer names, got {self.extra_layers!r}")
        if isinstance(self.extra_layers, str):
            self.extra_layers = (self.extra_layers,)
        elif not isinstance(self.extra_layers, int):
            self.extra_layers = tuple(str(n) for n in self.extra_layers)
        elif self.extra_layers < 0:
            raise ValueError(f"extra_layers must be >= 0, got {self.extra_layers!r}")
        for name in ("global_head", "gaussian_term", "class_balanced", "refit"):
            setattr(self, name, bool(getattr(self, name)))
        from ..networks.prototype_net import AGGREGATIONS

        self.aggregation = look_up_option(self.aggregation, AGGREGATIONS)
        self.select_by = look_up_option(self.select_by, SELECT_BY)
        self.head_kwargs = _check_head_kwargs(self.head_kwargs)
        if self.outlier_op_weights is not None:
            self.outlier_op_weights = tuple(float(w) for w in self.outlier_op_weights)
        if not isinstance(self.network_kwargs, Mapping):
            raise ValueError(f"network_kwargs must be a dict, got {self.network_kwargs!r}")
        self.network_kwargs = dict(self.network_kwargs)
        self.head_channels = _positive_int(self.head_channels, "head_channels")
        self.lambda_out = _number(self.lambda_out, "lambda_out")
        self.batch_size = _positive_int(self.batch_size, "batch_size")
        if self.outlier_batch_size is not None:
            self.outlier_batch_size = _positive_int(self.outlier_batch_size, "outlier_batch_size", minimum=0)
            if self.outlier_batch_size > self.batch_size:
                raise ValueError(
                    "outlier_batch_size must be <= batch_size (one outlier is made from each InD image), "
                    f"got {self.outlier_batch_size!r} > {self.batch_size!r}"
                )
        self.max_epochs = _positive_int(self.max_epochs, "max_epochs")
        self.learning_rate = _number(self.learning_rate, "learning_rate", low_open=True)
        self.weight_decay = _number(self.weight_decay, "weight_decay")
        self.warm_restart_epochs = _positive_int(self.warm_restart_epochs, "warm_restart_epochs")
        self.warm_restart_mult = _positive_int(self.warm_restart_mult, "warm_restart_mult")
        self.rotate_degrees = _number(self.rotate_degrees, "rotate_degrees", high=180.0)
        self.translate_pixels = _number(self.translate_pixels, "translate_pixels")
        if self.outlier_ops is not None:
            if isinstance(self.outlier_ops, str) or not isinstance(self.outlier_ops, Sequence):
                raise ValueError(
                    f"outlier_ops must be a sequence of op names or None, got {self.outlier_ops!r}"
                )
            self.outlier_ops = tuple(str(op) for op in self.outlier_ops)
        if self.num_classes is not None:
            self.num_classes = _positive_int(self.num_classes, "num_classes", minimum=2)
        self.num_workers = _positive_int(self.num_workers, "num_workers", minimum=0)
        self.seed = _positive_int(self.seed, "seed", minimum=0)
        self.val_interval = _positive_int(self.val_interval, "val_interval")
        if self.device is not None and not isinstance(self.device, str):
            self.device = str(self.device)
        self.amp = bool(self.amp)

    @property
    def wrapper_kwargs(self) -> dict[str, Any]:
        """The :class:`~monai_ood.networks.PrototypeOODNet` options of this configuration."""
        return {
            "extra_layers": self.extra_layers,
            "global_head": self.global_head,
            "gaussian_term": self.gaussian_term,
            "aggregation": self.aggregation,
            **self.head_kwargs,
        }

    @property
    def outliers_per_step(self) -> int:
        """``n_b``: the outlier batch size actually used."""
        return self.batch_size if self.outlier_batch_size is None else self.outlier_batch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (tuples become lists)."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainingConfig:
        """Rebuild from :meth:`to_dict`.

        Raises:
            ValueError: on unknown keys (with the known ones) or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainingConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


@dataclass
class TrainResult:
    """What :func:`train` wrote.

    Attributes:
        best_checkpoint: ``model.pt``, the model with the best validation mean Dice.
        last_checkpoint: ``last.pt``, the resumable state after the last epoch.
        history: one dict per epoch (losses, learning rate, validation Dice when validated, seconds).
    """

    best_checkpoint: Path
    last_checkpoint: Path
    history: list[dict[str, Any]]


# ---------------------------------------------------------------- data


def training_transforms(config: TrainingConfig, spatial_dims: int) -> Compose:
    """Augmentation and outlier synthesis of the training items (dicts with ``image`` and ``label``).

    ``EnsureTyped`` -> one ``RandAffined`` on image and label (a single resampling) -> ``CopyItemsd`` of
    the augmented image to ``outlier`` -> ``OutlierSynthesisd`` on ``outlier``. Labels stay float (as
    MONAI loads them); the losses and metrics take float class indices.
    """
    keys = ("image", "label")
    transforms: list = [EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False)]
    if config.rotate_degrees > 0 or config.translate_pixels > 0:
        transforms.append(
            affine_augmentation(keys, spatial_dims, config.rotate_degrees, config.translate_pixels)
        )
    out_keys: tuple[str, ...] = keys
    if config.outliers_per_step > 0:
        transforms += [
            CopyItemsd(keys="image", names="outlier"),
            OutlierSynthesisd(keys="outlier", ops=config.outlier_ops, op_weights=config.outlier_op_weights),
        ]
        out_keys = (*keys, "outlier")
    # Plain tensors: the batches need no metadata, and collating MetaTensors costs time in every step.
    transforms.append(EnsureTyped(keys=out_keys, track_meta=False))
    return Compose(transforms)


def validation_transforms() -> Compose:
    """Validation items go to the network as they are (float32 tensors)."""
    return Compose([EnsureTyped(keys=("image", "label"), dtype=torch.float32, track_meta=False)])


@dataclass
class _ItemsSummary:
    in_channels: int
    spatial_dims: int
    spatial_shapes: list[tuple[int, ...]]  # distinct shapes, in order of appearance
    label_ranges: list[tuple[int, int]]  # per item


def check_items(items: Any, name: str, need_label: bool = True) -> _ItemsSummary:
    """Check a list of ``{"image": (C, *spatial), "label": (1, *spatial)}`` items once, up front.

    Raises:
        ValueError: naming the item, for a missing key, a wrong shape, a non-finite image or a label that
            is not an integer class index.
    """
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise ValueError(
            f"{name} must be a list of dicts with 'image' and 'label', got {type(items).__name__}"
        )
    if len(items) == 0:
        raise ValueError(f"{name} is empty")
    in_channels = spatial_dims = None
    shapes: list[tuple[int, ...]] = []
    ranges: list[tuple[int, int]] = []
    required = ("image", "label") if need_label else ("image",)
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or any(key not in item for key in required):
            got = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise ValueError(f"{name}[{i}] must be a dict with keys {list(required)}, got {got!r}")
        image = np.asarray(item["image"])
        if image.ndim not in (3, 4) or not np.issubdtype(image.dtype, np.number):
            raise ValueError(
                f"{name}[{i}]['image'] must be a numeric (C, H, W) or (C, H, W, D) array, "
                f"got shape {image.shape} and dtype {image.dtype}"
            )
        if not np.isfinite(image).all():
            raise ValueError(
                f"{name}[{i}]['image'] contains {int((~np.isfinite(image)).sum())} NaN/Inf value(s)"
            )
        if in_channels is None:
            in_channels, spatial_dims = image.shape[0], image.ndim - 1
        elif (image.shape[0], image.ndim - 1) != (in_channels, spatial_dims):
            raise ValueError(
                f"{name}[{i}]['image'] has shape {image.shape}, but the first item has {in_channels} "
                f"channel(s) and {spatial_dims} spatial dims"
            )
        if image.shape[1:] not in shapes:
            shapes.append(tuple(image.shape[1:]))
        if need_label:
            label = np.asarray(item["label"])
            if label.shape != (1, *image.shape[1:]):
                raise ValueError(
                    f"{name}[{i}]['label'] must have shape (1, *image spatial) = {(1, *image.shape[1:])}, "
                    f"got {label.shape}"
                )
            if not (np.issubdtype(label.dtype, np.integer) or np.issubdtype(label.dtype, np.floating)):
                raise ValueError(f"{name}[{i}]['label'] must hold class indices, got dtype {label.dtype}")
            if np.issubdtype(label.dtype, np.floating) and not (
                np.isfinite(label).all() and (label == np.round(label)).all()
            ):
                raise ValueError(
                    f"{name}[{i}]['label'] must hold integer class indices; found NaN/Inf or fractions"
                )
            ranges.append((int(label.min()), int(label.max())))
    return _ItemsSummary(int(in_channels), int(spatial_dims), shapes, ranges)


def _resolve_num_classes(
    config: TrainingConfig, class_names: Sequence[str] | None, summaries: dict[str, _ItemsSummary]
) -> int:
    num_classes = config.num_classes
    if class_names is not None:
        if isinstance(class_names, str) or len(class_names) < 2:
            raise ValueError(
                f"class_names must name at least 2 classes (background first), got {class_names!r}"
            )
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(
                f"config.num_classes ({num_classes}) and class_names ({len(class_names)}: {list(class_names)!r}) "
                "disagree"
            )
        num_classes = len(class_names)
    if num_classes is None:
        largest = max(high for summary in summaries.values() for _, high in summary.label_ranges)
        num_classes = max(2, largest + 1)
        logger.info("num_classes not given: %d, from the largest label value", num_classes)
    for name, summary in summaries.items():
        for i, (low, high) in enumerate(summary.label_ranges):
            if low < 0 or high >= num_classes:
                raise ValueError(
                    f"{name}[{i}]['label'] must lie in [0, {num_classes - 1}] for {num_classes} classes, "
                    f"got values in [{low}, {high}]"
                )
    return num_classes


def _check_inputs(
    train_items: Any,
    val_items: Any,
    config: TrainingConfig,
    class_names: Sequence[str] | None,
    preprocessing: SlicePreprocessing | VolumePreprocessing,
) -> tuple[_ItemsSummary, _ItemsSummary, int]:
    """Validate the items once, before anything is built or written; returns their summaries and K."""
    summaries = {
        "train_items": check_items(train_items, "train_items"),
        "val_items": check_items(val_items, "val_items"),
    }
    train_summary, val_summary = summaries["train_items"], summaries["val_items"]
    train_kind = (train_summary.in_channels, train_summary.spatial_dims)
    if (val_summary.in_channels, val_summary.spatial_dims) != train_kind:
        raise ValueError(
            f"val_items have {val_summary.in_channels} channel(s) and {val_summary.spatial_dims} spatial dims, "
            f"train_items {train_summary.in_channels} and {train_summary.spatial_dims}"
        )
    if len(train_summary.spatial_shapes) > 1:
        raise ValueError(
            f"train_items must share one spatial shape to be batched, got {train_summary.spatial_shapes[:5]}"
        )
    if preprocessing.spatial_dims != train_summary.spatial_dims:
        raise ValueError(
            f"preprocessing is for {preprocessing.spatial_dims}D inputs, the items are {train_summary.spatial_dims}D"
        )
    return train_summary, val_summary, _resolve_num_classes(config, class_names, summaries)


def _check_network_fits(
    net: nn.Module, in_channels: int, shapes: Sequence[tuple[int, ...]], device, preset
) -> None:
    """One eval-mode forward per distinct input shape, so a size the network cannot take fails now."""
    net.eval()
    try:
        with torch.no_grad():
            for shape in shapes:
                try:
                    net(torch.zeros(1, in_channels, *shape, device=device))
                except RuntimeError as err:
                    raise ValueError(
                        f"the {preset!r} network cannot process images of spatial shape {shape}: "
                        f"{str(err).splitlines()[0]} (the size usually must be divisible by the network's total "
                        "downsampling, 16 for the default presets)"
                    ) from err
    finally:
        net.train()


# ---------------------------------------------------------------- engines


def _greater_ignoring_nan(current: float, best: float) -> bool:
    # A NaN Dice (no foreground anywhere) is never an improvement, and any number beats a NaN best.
    return not math.isnan(current) and (math.isnan(best) or current > best)


class _RunRecorder:
    """Epoch bookkeeping on the engines: history, best model (``model.pt``) and resume state (``last.pt``)."""

    def __init__(
        self,
        output_dir: Path,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
        transforms: Compose,
        config: TrainingConfig,
        model_config: dict[str, Any],
        preprocessing: SlicePreprocessing | VolumePreprocessing,
        class_names: list[str] | None,
    ) -> None:
        self.output_dir = output_dir
        self.net, self.optimizer, self.scheduler, self.scaler = net, optimizer, scheduler, scaler
        self.transforms = transforms
        self.config, self.model_config = config, model_config
        self.preprocessing, self.class_names = preprocessing, class_names
        self.history: list[dict[str, Any]] = []
        self._validation: dict[str, Any] = {}
        self._epoch_start = 0.0

    def attach(self, trainer: SupervisedTrainer, evaluator: SupervisedEvaluator) -> None:
        self.trainer, self.evaluator = trainer, evaluator
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._validated)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_start = time.perf_counter()

    def _validated(self, evaluator: SupervisedEvaluator) -> None:
        epoch = self.trainer.state.epoch
        dice = float(evaluator.state.metrics[KEY_METRIC])
        # metric_details holds per-image, per-class Dice (NaN where a class is absent from both maps).
        details = evaluator.state.metric_details[KEY_METRIC].float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_class = np.nanmean(details.cpu().numpy(), axis=0)
        self._validation = {
            "epoch": epoch,
            KEY_METRIC: dice,
            "val_dice_per_class": [float(v) for v in np.atleast_1d(per_class)],
        }
        if evaluator.state.best_metric_epoch == evaluator.state.epoch:
            save_model(
                self.output_dir / BEST_CHECKPOINT,
                self.net,
                self.model_config,
                self.preprocessing,
                class_names=self.class_names,
                metrics={**self._validation, "iteration": self.trainer.state.iteration},
            )

    def _epoch_completed(self, trainer: SupervisedTrainer) -> None:
        epoch = trainer.state.epoch
        record: dict[str, Any] = {
            "epoch": epoch,
            "iteration": trainer.state.iteration,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            **{name: float(value) for name, value in trainer.state.metrics.items()},
        }
        if self._validation.get("epoch") == epoch:
            record.update({k: v for k, v in self._validation.items() if k != "epoch"})
        validated = self.evaluator.state.best_metric_epoch >= 1
        record["best_" + KEY_METRIC] = float(self.evaluator.state.best_metric) if validated else None
        record["best_epoch"] = int(self.evaluator.state.best_metric_epoch) if validated else None
        record["seconds"] = time.perf_counter() - self._epoch_start
        self.history.append(record)
        atomic_write_text(self.output_dir / HISTORY_FILE, json.dumps(self.history, indent=2), overwrite=True)
        # Last of the epoch's handlers (after validation), so the RNG states are those the next epoch starts from.
        save_training_state(
            self.output_dir / LAST_CHECKPOINT,
            {
                "model": cpu_state_dict(self.net),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": epoch,
                "iteration": trainer.state.iteration,
                "epoch_length": trainer.state.epoch_length,
                "best_metric": float(self.evaluator.state.best_metric),
                "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
                "history": self.history,
                "config": self.config.to_dict(),
                "model_config": self.model_config,
                "rng": capture_rng_state(self.transforms),
            },
        )

    def restore(self, state: dict[str, Any]) -> None:
        """Load a ``last.pt`` into the run (after every object was built exactly as in a fresh run)."""
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():  # a disabled scaler (CPU, amp=False) saves {}
            self.scaler.load_state_dict(state["scaler"])
        self.trainer.state.epoch = int(state["epoch"])
        self.trainer.state.iteration = int(state["iteration"])
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
        self.history = [dict(record) for record in state["history"]]
        # Last: building the run consumed random numbers that the saved states supersede.
        restore_rng_state(state["rng"], self.transforms)


def _prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Create ``output_dir``; return whether to resume. Refuses to overwrite a previous run unasked."""
    output_dir.mkdir(parents=True, exist_ok=True)
    ours = [output_dir / name for name in (BEST_CHECKPOINT, LAST_CHECKPOINT, HISTORY_FILE)]
    existing = [path.name for path in ours if path.exists()]
    has_last = (output_dir / LAST_CHECKPOINT).exists()
    if resume:
        if has_last:
            return True
        if (output_dir / BEST_CHECKPOINT).exists():
            raise FileExistsError(
                f"{str(output_dir)!r} holds a model.pt but no last.pt to resume from; use --overwrite "
                "(overwrite=True) to start afresh there, or another output folder"
            )
        logger.warning("resume requested but %s has no last.pt: starting a new run", output_dir)
        return False
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"{str(output_dir)!r} already holds a training run ({', '.join(existing)}); pass --resume "
                "(resume=True) to continue it or --overwrite (overwrite=True) to start afresh"
            )
        for path in ours:
            path.unlink(missing_ok=True)
    return False


def _check_resumable(
    state: dict[str, Any], config: TrainingConfig, model_config: dict, epoch_length: int, path
):
    saved = state.get("config", {})
    changed = sorted(
        k for k, v in config.to_dict().items() if k not in _RESUMABLE_CHANGES and saved.get(k) != v
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.to_dict()[k]!r}" for k in changed)
        raise ValueError(
            f"cannot resume {str(path)!r} with a different configuration ({details}); only "
            f"{sorted(_RESUMABLE_CHANGES)} may change. Use --overwrite to start afresh."
        )
    if state.get("model_config") != model_config:
        raise ValueError(
            f"cannot resume {str(path)!r}: the data imply model {model_config!r}, the run was "
            f"{state.get('model_config')!r}"
        )
    if state.get("epoch_length") != epoch_length:
        raise ValueError(
            f"cannot resume {str(path)!r}: the training data give {epoch_length} batches per epoch, the run had "
            f"{state.get('epoch_length')!r} (the training items changed)"
        )
    if state["epoch"] > config.max_epochs:
        raise ValueError(
            f"cannot resume {str(path)!r} to max_epochs={config.max_epochs}: it already ran {state['epoch']} epochs"
        )


def _build_evaluator(
    net: nn.Module, val_loader: DataLoader, num_classes: int, device: torch.device, amp: bool
) -> SupervisedEvaluator:
    """Whole-image validation scored by the mean Dice of the foreground classes of argmax predictions."""
    return SupervisedEvaluator(
        device=device,
        val_data_loader=val_loader,
        network=net,
        inferer=SimpleInferer(),
        postprocessing=Compose(
            [
                AsDiscreted(keys="pred", argmax=True, to_onehot=num_classes),
                AsDiscreted(keys="label", to_onehot=num_classes),
            ]
        ),
        key_val_metric={
            KEY_METRIC: MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))
        },
        metric_cmp_fn=_greater_ignoring_nan,
        amp=amp,
    )


def _attach_handlers(
    trainer: SupervisedTrainer,
    evaluator: SupervisedEvaluator,
    scheduler: Any,
    val_interval: int,
    progress: bool,
) -> None:
    """Epoch metrics, logs, validation, per-iteration LR schedule and the progress bar.

    Attached in the order they must run at the end of an epoch (metrics, training log, validation);
    :class:`_RunRecorder` is attached after them, so ``last.pt`` is written last.
    """
    for name in ("loss", "seg_loss", "ood_loss"):
        Average(output_transform=lambda output, key=name: float(output[key])).attach(trainer, f"train_{name}")
    StatsHandler(name=LOGGER_NAME, iteration_log=False, output_transform=lambda output: None).attach(trainer)
    ValidationHandler(interval=val_interval, validator=evaluator, epoch_level=True).attach(trainer)
    LrScheduleHandler(
        scheduler,
        print_lr=False,
        epoch_level=False,
        step_transform=fractional_epoch,
    ).attach(trainer)
    StatsHandler(
        name=LOGGER_NAME,
        iteration_log=False,
        output_transform=lambda output: None,
        global_epoch_transform=lambda epoch: trainer.state.epoch,
    ).attach(evaluator)
    # MONAI's StatsHandler sets its logger to INFO and propagate=False, adding a stdout handler only to a
    # logger that does not exist yet (ours does): propagate again, so the application's logging
    # configuration decides where the epoch lines go, as for every other library logger.
    logger.propagate = True
    if progress and sys.stderr.isatty():  # tqdm's carriage returns would fill non-terminal logs
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False, desc="train").attach(
            trainer, output_transform=lambda output: {"loss": float(output["loss"])}
        )


def train(
    train_items: Sequence[Mapping[str, Any]],
    val_items: Sequence[Mapping[str, Any]],
    config: TrainingConfig,
    output_dir: str | os.PathLike,
    preprocessing: SlicePreprocessing | VolumePreprocessing,
    class_names: Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a preset network with the prototype OOD head; keep the best model by validation Dice.

    Args:
        train_items: ``[{"image": float32 (C, H, W[, D]), "label": int64 (1, H, W[, D])}, ...]`` in memory,
            all of one spatial shape (they are batched). They are never modified.
        val_items: the same for validation (one batch per distinct shape if the shapes differ).
        config: the run's settings.
        output_dir: folder of the run: ``model.pt`` (best by validation mean Dice), ``last.pt`` (resume
            state after the last epoch) and ``history.json``.
        preprocessing: how the items were made; stored in ``model.pt`` so that scoring prepares images
            the same way.
        class_names: one name per class, background first (stored in ``model.pt``).
        resume: continue from ``output_dir/last.pt`` up to ``config.max_epochs`` (starts afresh if
            there is no ``last.pt``).
        overwrite: start afresh even if ``output_dir`` holds a previous run (its ``model.pt``,
            ``last.pt`` and ``history.json`` are deleted; nothing else is touched).
        progress: show a progress bar when stderr is a terminal.

    Returns:
        :class:`TrainResult`.

    Raises:
        ValueError: on invalid items (shape, NaN/Inf image, label out of range), a network that cannot
            take the image size, or a ``last.pt`` from a different configuration.
        FileExistsError: if ``output_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set.

    Example:
        >>> result = train(train_items, val_items, TrainingConfig(max_epochs=20), "runs/brain",
        ...                SlicePreprocessing(), class_names=["background", "CSF", "grey matter", "white matter"])
        >>> result.best_checkpoint
        PosixPath('runs/brain/model.pt')
    """
    if not isinstance(config, TrainingConfig):
        raise ValueError(f"config must be a TrainingConfig, got {type(config).__name__}")
    if resume and overwrite:
        raise ValueError(
            "resume=True and overwrite=True exclude each other: continue the run or start afresh"
        )
    output_dir = Path(output_dir)
    train_summary, val_summary, num_classes = _check_inputs(
        train_items, val_items, config, class_names, preprocessing
    )
    class_names = None if class_names is None else [str(name) for name in class_names]

    device = resolve_device(config.device)
    amp = config.amp and device.type == "cuda"
    if config.amp and not amp:
        warnings.warn("amp=True needs CUDA; training in float32 on the CPU", stacklevel=2)
    model_config = make_model_config(
        config.preset,
        train_summary.spatial_dims,
        train_summary.in_channels,
        num_classes,
        config.head_channels,
        config.network_kwargs,
        config.wrapper_kwargs,
    )

    # Everything below is built identically for a fresh and a resumed run; a resumed run then loads its
    # states over it, RNG states last.
    set_determinism(seed=config.seed)
    net = build_network(model_config).to(device)
    _check_network_fits(
        net,
        train_summary.in_channels,
        train_summary.spatial_shapes
        + [s for s in val_summary.spatial_shapes if s not in train_summary.spatial_shapes],
        device,
        config.preset,
    )
    # Only now, with inputs and network checked, is the output folder created (or a previous run removed).
    resuming = _prepare_output_dir(output_dir, resume, overwrite)
    transforms = training_transforms(config, train_summary.spatial_dims)
    transforms.set_random_state(seed=config.seed)
    train_loader = DataLoader(
        Dataset(list(train_items), transform=transforms),
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,  # fresh workers each epoch, seeded from the (saved) main torch RNG
    )
    val_loader = DataLoader(
        Dataset(list(val_items), transform=validation_transforms()),
        batch_size=config.batch_size if len(val_summary.spatial_shapes) == 1 else 1,
        shuffle=False,
        num_workers=0,  # in-memory items and no random transforms: worker processes would only add start-up time
        pin_memory=device.type == "cuda",
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=config.warm_restart_epochs, T_mult=config.warm_restart_mult
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    loss_fn = SegOODLoss(net.num_dims, lambda_out=config.lambda_out, class_balanced=config.class_balanced)

    trainer = SupervisedTrainer(
        device=device,
        max_epochs=config.max_epochs,
        train_data_loader=train_loader,
        network=net,
        optimizer=optimizer,
        loss_function=loss_fn,
        iteration_update=PrototypeOODTrainingStep(config.outliers_per_step),
        amp=amp,
        decollate=False,  # the training output is only averaged, never post-processed per item
    )
    trainer.scaler = scaler  # the step reads the engine's scaler; this one is saved in last.pt
    evaluator = _build_evaluator(net, val_loader, num_classes, device, amp)
    _attach_handlers(trainer, evaluator, scheduler, config.val_interval, progress)
    recorder = _RunRecorder(
        output_dir,
        net,
        optimizer,
        scheduler,
        scaler,
        transforms,
        config,
        model_config,
        preprocessing,
        class_names,
    )
    recorder.attach(trainer, evaluator)

    last_path, best_path = output_dir / LAST_CHECKPOINT, output_dir / BEST_CHECKPOINT
    if resuming:
        state = load_training_state(last_path)
        _check_resumable(state, config, model_config, len(train_loader), last_path)
        recorder.restore(state)
        logger.info("resuming %s at epoch %d of %d", last_path, trainer.state.epoch, config.max_epochs)

    def save_final_weights(dice: float | None, **extra: Any) -> None:
        metrics = {KEY_METRIC: dice, "epoch": trainer.state.epoch, "iteration": trainer.state.iteration}
        save_model(
            best_path, net, model_config, preprocessing, class_names=class_names, metrics={**metrics, **extra}
        )

    trained = trainer.state.epoch < config.max_epochs
    if trained:
        trainer.run()
        if config.select_by == "last":
            last_validation = next((r for r in reversed(recorder.history) if KEY_METRIC in r), {})
            save_final_weights(last_validation.get(KEY_METRIC), selected_by="last")
    if not best_path.exists():
        # No validation ran (val_interval > max_epochs): the final weights are the only model there is.
        warnings.warn(f"no validation ran, so {best_path} holds the final weights", stacklevel=2)
        save_final_weights(None)
    if (config.refit or net.gaussian_term) and (
        trained or not load_model(best_path, device="cpu").metrics.get("refitted")
    ):
        # after model.pt exists in every case (also when no validation ran); a resumed finished run
        # whose refit did not complete (a crash, a kill) refits now
        from .calibration import refit

        refit(best_path, train_items, prototypes=config.refit, device=device)
    return TrainResult(best_checkpoint=best_path, last_checkpoint=last_path, history=recorder.history)
