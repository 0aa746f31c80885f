"""Outlier-exposure loss of the prototypical classifier (paper eq. 8) and the total training loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from ..networks.feature_grid import labels_to_feature_grid
from .inclusion import log_prob_exclusion, log_prob_inclusion

__all__ = ["OutlierExposureLoss", "SegOODLoss", "class_inclusion_fractions", "labels_to_feature_grid"]


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

    ``class_balanced=True`` (beyond the paper) averages ``P_I`` within each class present in an image
    before the log and then averages the logs over those classes, so a minority class (CSF at 1/16
    resolution) cannot be left outside its prototype while the majority classes keep the mean high.

    Args:
        num_dims: the chi-square degrees of freedom ``N`` = embedding size ``c_g``.
        class_balanced: per-class inlier term (see above); ``False`` is the paper's eq. 8.

    Example:
        >>> loss = OutlierExposureLoss(num_dims=16)
        >>> d_ind, d_out = torch.rand(2, 4, 8, 8) * 32, torch.rand(2, 4, 8, 8) * 32
        >>> loss(d_ind, torch.randint(0, 4, (2, 1, 32, 32)), d_out).shape
        torch.Size([])
    """

    def __init__(self, num_dims: int, class_balanced: bool = False) -> None:
        super().__init__()
        if not isinstance(num_dims, int) or num_dims < 1:
            raise ValueError(f"num_dims must be a positive int, got {num_dims!r}")
        self.num_dims = num_dims
        self.class_balanced = bool(class_balanced)

    def inlier_term(self, distances: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``-1/n_a sum_t log mean_ij P_I(A(x_t, y_t))`` for distances ``(B, K, *S)``."""
        grid_labels = labels_to_feature_grid(
            labels.to(distances.device), distances.shape[1], distances.shape[2:]
        )
        own_class = distances.gather(1, grid_labels.unsqueeze(1))  # A(x, y): (B, 1, *S)
        log_p = log_prob_inclusion(own_class, self.num_dims)
        if not self.class_balanced:
            return -_log_mean_exp(log_p).mean()
        # log of the mean P_I within each (image, class), then the mean over the classes present
        num_classes = distances.shape[1]
        flat_log_p, flat_labels = log_p.flatten(1), grid_labels.flatten(1)
        masks = F.one_hot(flat_labels, num_classes).movedim(-1, 1).bool()  # (B, K, S)
        masked = torch.where(
            masks, flat_log_p.unsqueeze(1), torch.full_like(flat_log_p.unsqueeze(1), -math.inf)
        )
        counts = masks.sum(dim=2)  # (B, K)
        per_class = torch.logsumexp(masked, dim=2) - counts.clamp_min(1).log()
        present = counts > 0
        per_image = torch.where(present, per_class, torch.zeros_like(per_class)).sum(1) / present.sum(1)
        return -per_image.mean()

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


def image_inclusion_term(distances: torch.Tensor, num_dims: int) -> torch.Tensor:
    """``-mean log P_I(d)`` of image-level distances ``(B, 1, 1)`` (the global term's inlier loss)."""
    return -log_prob_inclusion(distances.flatten(), num_dims).mean()


def image_exclusion_term(distances: torch.Tensor, num_dims: int) -> torch.Tensor:
    """``-mean log(1 - P_I(d))`` of image-level outlier distances (the global term's outlier loss)."""
    return -log_prob_exclusion(distances.flatten(), num_dims).mean()


@torch.no_grad()
def class_inclusion_fractions(
    distances: torch.Tensor, labels: torch.Tensor, num_dims: int, level: float = 0.95
) -> torch.Tensor:
    """Per class, the fraction of its feature-grid pixels whose distance to their own prototype lies
    inside the chi-square ``level`` bound (``D <= chi2.ppf(level, N)``); NaN for an absent class.

    A class near 0 has been abandoned by its prototype (the pilot's "class abandonment" pitfall).

    Args:
        distances: ``(B, K, *S)``; labels: ``(B, 1, *spatial)`` class indices (brought to ``S``).

    Returns:
        ``(K,)`` float64 tensor.
    """
    from scipy.stats import chi2

    bound = float(chi2.ppf(level, num_dims))
    grid = labels_to_feature_grid(labels.to(distances.device), distances.shape[1], distances.shape[2:])
    own = distances.gather(1, grid.unsqueeze(1))[:, 0]
    fractions = torch.full((distances.shape[1],), float("nan"), dtype=torch.float64)
    for k in range(distances.shape[1]):
        mask = grid == k
        if mask.any():
            fractions[k] = float((own[mask] <= bound).double().mean())
    return fractions


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
        class_balanced: class-balanced inlier term of :class:`OutlierExposureLoss`.

    Example:
        >>> from monai_ood.networks import create_prototype_network
        >>> net = create_prototype_network("unet", 2, 1, 4, head_channels=32)
        >>> loss_fn = SegOODLoss(num_dims=net.num_dims)
        >>> out = net.forward_train(torch.rand(2, 1, 64, 64), outliers=torch.rand(2, 1, 64, 64))
        >>> loss = loss_fn(out.logits, torch.randint(0, 4, (2, 1, 64, 64)), out.distances, out.outlier_distances)
    """

    def __init__(
        self,
        num_dims: int,
        lambda_out: float = 0.1,
        seg_loss: nn.Module | None = None,
        class_balanced: bool = False,
    ) -> None:
        super().__init__()
        if not (isinstance(lambda_out, (int, float)) and math.isfinite(lambda_out) and lambda_out >= 0):
            raise ValueError(f"lambda_out must be a finite number >= 0, got {lambda_out!r}")
        self.lambda_out = float(lambda_out)
        self.seg_loss = seg_loss if seg_loss is not None else DiceCELoss(to_onehot_y=True, softmax=True)
        self.ood_loss = OutlierExposureLoss(num_dims, class_balanced=class_balanced)

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

    def from_train_output(self, out, labels: torch.Tensor, return_components: bool = False):
        """The loss of a :class:`~monai_ood.networks.prototype_net.TrainOutput`: ``L_seg + lambda * L_out``,
        where ``L_out`` sums eq. 8 over every local scale and the image-level terms of the global head.
        Distances are taken in float32 (the chi-square terms need it even under autocast)."""

        def as_float(x):
            return None if x is None else x.float()

        seg = self.seg_loss(out.logits.float(), labels)
        ood = self.ood_loss(out.distances.float(), labels, as_float(out.outlier_distances))
        outlier_extra = out.outlier_extra_distances or [None] * len(out.extra_distances)
        for d, d_out in zip(out.extra_distances, outlier_extra, strict=True):
            ood = ood + self.ood_loss(d.float(), labels, as_float(d_out))
        if out.global_distances is not None:
            ood = ood + image_inclusion_term(out.global_distances.float(), self.ood_loss.num_dims)
            if out.outlier_global_distances is not None and out.outlier_global_distances.shape[0] > 0:
                ood = ood + image_exclusion_term(out.outlier_global_distances.float(), self.ood_loss.num_dims)
        loss = seg + self.lambda_out * ood
        if return_components:
            return loss, {"seg": seg.detach(), "ood": ood.detach()}
        return loss
