"""Labels on a feature grid, in one place: the class-area fractions of every cell of a coarser grid, and
the majority vote that the head's training (``L_out``) and refit use.

The paper only says ``y'`` is "a downsampled version of y". Nearest-neighbour sampling would keep one
pixel out of every 16 x 16 cell at a bottleneck; instead every cell gets the share of its area each class
covers (adaptive average pooling of the one-hot labels, :func:`area_fractions`), and the majority vote
is their argmax (:func:`labels_to_feature_grid`; ties go to the lower class index). The default
detector's class prototypes use the fractions themselves, so that a class that never holds a cell's
majority still counts (BENCHMARK.md, "Class abandonment").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["area_fractions", "labels_to_feature_grid"]

_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _class_indices(labels: torch.Tensor, num_classes: int, spatial_dims: int | None) -> torch.Tensor:
    """``(B, *spatial)`` long class indices from ``(B, 1, *spatial)`` or ``(B, *spatial)`` labels, checked."""
    dims = labels.dim() - 2 if spatial_dims is None else spatial_dims
    if labels.dim() == dims + 2:
        if labels.shape[1] != 1:
            raise ValueError(
                f"labels must be class indices (B, 1, *spatial), got shape {tuple(labels.shape)}"
            )
        labels = labels[:, 0]
    if dims < 1 or labels.dim() != dims + 1:
        raise ValueError(
            f"labels must be (B, 1, *spatial) or (B, *spatial) with {dims} spatial dims, "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        if not torch.isfinite(labels).all() or (labels != labels.round()).any():
            raise ValueError("labels must hold integer class indices; found non-integer, NaN or Inf values")
    labels = labels.long()
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], found values in [{low}, {high}]")
    return labels


def area_fractions(
    labels: torch.Tensor, num_classes: int, size: Sequence[int], dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Class-area fractions of every cell of a coarser grid: ``labels`` ``(B, 1, *spatial)`` class
    indices to ``(B, K, *size)`` weights that sum to 1 per cell (adaptive average pooling of the one-hot
    labels).

    Raises:
        ValueError: on non-integer or out-of-range labels, NaN, or a shape that does not fit.
    """
    if labels.dim() < 3 or labels.shape[1] != 1:
        raise ValueError(f"labels must be (B, 1, *spatial) class indices, got {tuple(labels.shape)}")
    index = _class_indices(labels, num_classes, None)
    one_hot = F.one_hot(index, num_classes).movedim(-1, 1).to(dtype)
    return _POOL[one_hot.dim() - 2](one_hot, tuple(int(s) for s in size))


def labels_to_feature_grid(labels: torch.Tensor, num_classes: int, size: tuple[int, ...]) -> torch.Tensor:
    """Bring an index label map to the feature grid by a majority vote inside each feature cell (the
    argmax of :func:`area_fractions`, in float32; ties go to the lower class index).

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
    index = _class_indices(labels, num_classes, len(size))
    if tuple(index.shape[1:]) == tuple(size):
        return index
    return area_fractions(index[:, None], num_classes, size, dtype=torch.float32).argmax(dim=1)
