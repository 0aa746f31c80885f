"""The one training step of every front-end: one InD batch + its outliers, ``L_seg + lambda * L_out``.

MONAI's :class:`~monai.engines.SupervisedTrainer` takes an ``iteration_update`` callable;
:class:`PrototypeOODTrainingStep` is it for ``monai-ood train`` (:mod:`monai_ood.engines.training`) and
for the MONAI bundles (``configs/train.json``): the whole network on the InD batch, the encoder only on
the outliers, the loss of :class:`~monai_ood.losses.SegOODLoss`, reading everything else from the engine
(network, optimizer, loss function, AMP scaler), so it is configured in JSON like any trainer. The
nnU-Net trainer keeps nnU-Net's own ``train_step`` (its deep-supervision loss) and adds the same outlier
pass and ``L_out`` (:mod:`monai_ood.integrations.nnunet.trainer`). The learning-rate schedule of both
is :func:`fractional_epoch` (the paper's AdamWR, stepped every iteration).

Under ``DistributedDataParallel`` the training pass must go through DDP's own ``forward`` for the
gradients to be synchronised, and :class:`~monai_ood.networks.PrototypeOODNet`'s ``forward`` returns
plain logits. :class:`TrainingForward` is the module to wrap instead: its ``forward`` is the training
pass. ``multi_gpu_train.json`` sets ``network`` to ``DDP(TrainingForward(network_def))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.utils import CommonKeys
from torch import nn

__all__ = ["PrototypeOODTrainingStep", "TrainingForward", "fractional_epoch", "training_losses"]


class TrainingForward(nn.Module):
    """``forward(images, outliers)`` = ``network.forward_train(images, outliers)``: the module to put
    under ``DistributedDataParallel`` (its ``forward`` is the one DDP synchronises).

    Args:
        network: the :class:`~monai_ood.networks.PrototypeOODNet` (its state dict keys appear under
            ``network.``; save ``network`` itself, as the bundles' ``CheckpointSaver`` does).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        if not hasattr(network, "forward_train"):
            raise TypeError(
                f"network must have forward_train (a PrototypeOODNet), got {type(network).__name__}"
            )
        self.network = network

    def forward(self, images: torch.Tensor, outliers: torch.Tensor | None = None):
        return self.network.forward_train(images, outliers)


def _train_outputs(network: nn.Module, images: torch.Tensor, outliers: torch.Tensor | None):
    """The training pass through whatever the engine holds: the network itself, a :class:`TrainingForward`,
    or either under DistributedDataParallel (which must wrap a TrainingForward, so that its forward runs)."""
    inner = (
        network.module
        if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel))
        else network
    )
    if isinstance(inner, TrainingForward):
        return network(images, outliers)
    if inner is not network:
        raise TypeError(
            f"{type(network).__name__} wraps {type(inner).__name__}, whose forward returns only logits: wrap "
            "monai_ood.bundle.TrainingForward(network) instead, so the training pass runs through its forward"
        )
    return network.forward_train(images, outliers)


def _loss(loss_function: Any, out: Any, labels: torch.Tensor):
    """``(loss, {"seg", "ood"})`` from a TrainOutput; the distances are taken in float32."""
    if hasattr(loss_function, "from_train_output"):
        return loss_function.from_train_output(out, labels, return_components=True)
    outlier_distances = None if out.outlier_distances is None else out.outlier_distances.float()
    return loss_function(
        out.logits.float(), labels, out.distances.float(), outlier_distances, return_components=True
    )


class PrototypeOODTrainingStep:
    """``iteration_update`` of a :class:`~monai.engines.SupervisedTrainer` for the prototype head.

    The batch holds ``image``, ``label`` and (from ``CopyItemsd`` + ``OutlierSynthesisd`` in the
    training transforms) ``outlier``; the engine's ``loss_function`` is a
    :class:`~monai_ood.losses.SegOODLoss`. The engine output holds ``image``, ``label``, ``pred``
    (logits, detached), ``loss``, ``seg_loss`` and ``ood_loss``; use the trainer with
    ``decollate=False``.

    Args:
        outliers_per_step: outliers per step ``n_b`` (the first ``n_b`` of the batch's); ``None`` = all of
            them (the paper's ``n_b = n_a``); 0 trains without outlier exposure (``L_out`` on InD only).
        outlier_key: the batch key of the outliers.

    Raises (at run time):
        FloatingPointError: on a non-finite loss (with the epoch, iteration and both loss terms).
    """

    def __init__(self, outliers_per_step: int | None = None, outlier_key: str = "outlier") -> None:
        if outliers_per_step is not None and (
            isinstance(outliers_per_step, bool)
            or not isinstance(outliers_per_step, int)
            or outliers_per_step < 0
        ):
            raise ValueError(f"outliers_per_step must be an int >= 0 or None, got {outliers_per_step!r}")
        self.outliers_per_step = outliers_per_step
        self.outlier_key = outlier_key

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        device = engine.state.device
        non_blocking = engine.non_blocking
        images = torch.as_tensor(batchdata[CommonKeys.IMAGE]).to(device, non_blocking=non_blocking)
        labels = torch.as_tensor(batchdata[CommonKeys.LABEL]).to(device, non_blocking=non_blocking)
        outliers = None
        if self.outliers_per_step != 0:
            if self.outlier_key not in batchdata:
                raise KeyError(
                    f"the batch has no {self.outlier_key!r}: add CopyItemsd(keys='image', names='outlier') and "
                    "monai_ood.transforms.OutlierSynthesisd(keys='outlier') to the training transforms, or "
                    "set outliers_per_step to 0"
                )
            outliers = torch.as_tensor(batchdata[self.outlier_key])[: self.outliers_per_step]
            outliers = outliers.to(device, non_blocking=non_blocking)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=getattr(engine, "optim_set_to_none", True))
        amp = bool(engine.amp) and device.type == "cuda"
        with torch.autocast(device.type, enabled=amp, **(getattr(engine, "amp_kwargs", None) or {})):
            out = _train_outputs(engine.network, images, outliers)
        loss, parts = _loss(engine.loss_function, out, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss at epoch {engine.state.epoch}, iteration {engine.state.iteration}: "
                f"seg {float(parts['seg'])}, ood {float(parts['ood'])}; try a lower learning rate"
            )
        scaler = getattr(engine, "scaler", None)
        if amp and scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            loss.backward()
            engine.optimizer.step()
        return {
            CommonKeys.IMAGE: images,
            CommonKeys.LABEL: labels,
            CommonKeys.PRED: out.logits.detach(),
            CommonKeys.LOSS: loss.detach(),
            "seg_loss": parts["seg"],
            "ood_loss": parts["ood"],
        }


def fractional_epoch(engine: Any) -> tuple[float]:
    """``step_transform`` of ``LrScheduleHandler``: step ``CosineAnnealingWarmRestarts`` every iteration
    with the fractional epoch ``iteration / epoch_length`` (the paper's AdamWR)."""
    return (engine.state.iteration / engine.state.epoch_length,)


def training_losses(output: Mapping[str, Any]) -> dict[str, float]:
    """``output_transform`` of a ``StatsHandler``: the total loss and its two terms, as numbers."""
    return {key: float(output[key]) for key in (CommonKeys.LOSS, "seg_loss", "ood_loss") if key in output}
