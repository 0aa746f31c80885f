"""Outlier-exposure loss of the prototypical classifier (paper eq. 8) and the total training loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from .inclusion import log_prob_exclusion, log_prob_inclusion

__all__ = ["OutlierExposureLoss", "SegOODLoss", "labels_to_feature_grid"]


def labels_to_feature_grid(labels: torch.Tensor, num_classes: int, size: tuple[int, ...]) -> torch.Tensor:
    """Bring an index label map to the feature grid by a majority vote inside each feature cell.

    The paper only says ``y'`` is "a downsampled version of y". Nearest-neighbour sampling would keep one
    pixel out of every 16x16 cell at a bottleneck; instead each cell takes the class that covers most of
    it (area-average of the one-hot map, then argmax; ties go to the lower class index).

    Args:
        labels: ``(B, 1, *spatial)`` or ``(B, *spatial)`` class indices in ``[0, num_classes)``; a float
            tensor (as MONAI loads labels) is accepted if its values are integers.
        num_classes: K.
        size: the feature grid's spatial size.

    Returns:
        ``(B, *size)`` long tensor.

    Raises:
        ValueError: on non-integer or out-of-range labels, NaN, or a shape that does not fit.
    """
    spatial_dims = len(size)
    if labels.dim() == spatial_dims + 2:
        if labels.shape[1] != 1:
            raise ValueError(
                f"labels must be class indices (B, 1, *spatial), got shape {tuple(labels.shape)}"
            )
        labels = labels[:, 0]
    if labels.dim() != spatial_dims + 1:
        raise ValueError(
            f"labels must be (B, 1, *spatial) or (B, *spatial) with {spatial_dims} spatial dims, "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        if not torch.isfinite(labels).all() or (labels != labels.round()).any():
            raise ValueError("labels must hold integer class indices; found non-integer, NaN or Inf values")
    labels = labels.long()
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], found values in [{low}, {high}]")
    if tuple(labels.shape[1:]) == tuple(size):
        return labels
    one_hot = F.one_hot(labels, num_classes).movedim(-1, 1).float()
    return F.interpolate(one_hot, size=tuple(size), mode="area").argmax(dim=1)


def _log_mean_exp(log_values: torch.Tensor) -> torch.Tensor:
    """``log(mean(exp(v)))`` over all but the batch dimension, without leaving log space."""
    flat = log_values.flatten(1)
    return torch.logsumexp(flat, dim=1) - math.log(flat.shape[1])


class OutlierExposureLoss(nn.Module):
    """``L_out`` of Cho et al. (2023), equation (8), computed in log space.

    ::

        L_out = -1/n_a sum_t log( mean_ij P_I(A(x_t, y_t)[ij]) )
                -1/n_b sum_s log( 1 - mean_ij P_I(A(x_s^b)[ij]) )

    with ``A(x, y)[ij] = D_M(r(x)[ij], y'[ij])`` (distance to the ground-truth class on the feature grid,
    labels brought there by :func:`labels_to_feature_grid`) and ``A(x^b) = min_k D_M`` for outliers.
    ``log mean P_I`` is a log-sum-exp of :func:`log_prob_inclusion`; ``1 - mean P_I = mean (1 - P_I)``, so
    the outlier term is a log-sum-exp of :func:`log_prob_exclusion` (the chi-square log CDF). Both stay
    finite for any distance, where the naive form gives ``log 0``.

    Args:
        num_dims: the chi-square degrees of freedom ``N`` = embedding size ``c_g``.

    Example:
        >>> loss = OutlierExposureLoss(num_dims=16)
        >>> d_ind, d_out = torch.rand(2, 4, 8, 8) * 32, torch.rand(2, 4, 8, 8) * 32
        >>> loss(d_ind, torch.randint(0, 4, (2, 1, 32, 32)), d_out).shape
        torch.Size([])
    """

    def __init__(self, num_dims: int) -> None:
        super().__init__()
        if not isinstance(num_dims, int) or num_dims < 1:
            raise ValueError(f"num_dims must be a positive int, got {num_dims!r}")
        self.num_dims = num_dims

    def inlier_term(self, distances: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``-1/n_a sum_t log mean_ij P_I(A(x_t, y_t))`` for distances ``(B, K, *S)``."""
        grid_labels = labels_to_feature_grid(
            labels.to(distances.device), distances.shape[1], distances.shape[2:]
        )
        own_class = distances.gather(1, grid_labels.unsqueeze(1))  # A(x, y): (B, 1, *S)
        return -_log_mean_exp(log_prob_inclusion(own_class, self.num_dims)).mean()

    def outlier_term(self, outlier_distances: torch.Tensor) -> torch.Tensor:
        """``-1/n_b sum_s log(1 - mean_ij P_I(A(x_s^b)))`` for distances ``(B_o, K, *S)``."""
        score_map = outlier_distances.min(dim=1).values  # A(x^b)
        return -_log_mean_exp(log_prob_exclusion(score_map, self.num_dims)).mean()

    def forward(
        self, distances: torch.Tensor, labels: torch.Tensor, outlier_distances: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Args:
        distances: InD distances ``(B, K, *S)``.
        labels: InD labels ``(B, 1, *spatial)`` (any spatial size; brought to ``S``).
        outlier_distances: outlier distances ``(B_o, K, *S_o)``, or ``None`` for the InD term only.
        """
        for name, value in (("distances", distances), ("outlier_distances", outlier_distances)):
            if value is not None and value.dim() < 3:
                raise ValueError(f"{name} must be (B, K, *spatial), got shape {tuple(value.shape)}")
        loss = self.inlier_term(distances, labels)
        if outlier_distances is not None and outlier_distances.shape[0] > 0:
            loss = loss + self.outlier_term(outlier_distances)
        return loss


class SegOODLoss(nn.Module):
    """Total training loss ``L = L_seg + lambda * L_out`` (paper section 3, lambda = 0.1).

    ``L_seg`` is MONAI's :class:`~monai.losses.DiceCELoss` (softmax, one-hot labels) by default; the paper
    uses cross-entropy alone, Dice + CE is the MONAI default for segmentation. Pass ``seg_loss`` to change it.
    The outlier distances must come from an encoder-only pass (:meth:`PrototypeOODNet.forward_train`),
    so outliers never reach the decoder or ``L_seg``.

    Args:
        num_dims: embedding size ``c_g`` of the head (``net.num_dims``).
        lambda_out: weight of ``L_out``.
        seg_loss: segmentation loss ``(logits, labels) -> scalar``; default ``DiceCELoss(to_onehot_y=True, softmax=True)``.

    Example:
        >>> from monai_ood.networks import create_prototype_network
        >>> net = create_prototype_network("unet", 2, 1, 4, head_channels=32)
        >>> loss_fn = SegOODLoss(num_dims=net.num_dims)
        >>> out = net.forward_train(torch.rand(2, 1, 64, 64), outliers=torch.rand(2, 1, 64, 64))
        >>> loss = loss_fn(out.logits, torch.randint(0, 4, (2, 1, 64, 64)), out.distances, out.outlier_distances)
    """

    def __init__(self, num_dims: int, lambda_out: float = 0.1, seg_loss: nn.Module | None = None) -> None:
        super().__init__()
        if not (isinstance(lambda_out, (int, float)) and math.isfinite(lambda_out) and lambda_out >= 0):
            raise ValueError(f"lambda_out must be a finite number >= 0, got {lambda_out!r}")
        self.lambda_out = float(lambda_out)
        self.seg_loss = seg_loss if seg_loss is not None else DiceCELoss(to_onehot_y=True, softmax=True)
        self.ood_loss = OutlierExposureLoss(num_dims)

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        distances: torch.Tensor,
        outlier_distances: torch.Tensor | None = None,
        return_components: bool = False,
    ):
        """Returns the scalar loss, or ``(loss, {"seg": ..., "ood": ...})`` (detached parts) if asked."""
        seg = self.seg_loss(logits, labels)
        ood = self.ood_loss(distances, labels, outlier_distances)
        loss = seg + self.lambda_out * ood
        if return_components:
            return loss, {"seg": seg.detach(), "ood": ood.detach()}
        return loss
