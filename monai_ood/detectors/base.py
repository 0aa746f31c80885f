"""One contract for every OOD detector (in the spirit of pytorch-ood's ``Detector``).

* ``fit(train_items, val_items=None)`` learns what the detector needs (statistics, an auxiliary model)
  and returns ``self``; detectors that need nothing set ``requires_fit = False``.
* ``predict(images)`` maps a batch ``(B, C, *spatial)`` to :class:`DetectorOutput`: an image-level score
  ``(B,)`` and, where the method has one, a score map ``(B, 1, *spatial)`` at input resolution.
* One convention, written once: **higher = more OOD**, and OOD is the positive class in every metric.

Items are dicts ``{"image": np.ndarray (C, *spatial) float32, "label": np.ndarray (1, *spatial) int}``
as produced by :mod:`monai_ood.data`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Detector", "DetectorOutput", "NotFittedError", "foreground_mean", "max_entropy", "batches"]


class NotFittedError(RuntimeError):
    """A detector that requires ``fit`` was used before it."""


@dataclass
class DetectorOutput:
    """Scores of one batch: ``image_score`` ``(B,)``, ``score_map`` ``(B, 1, *spatial)`` or ``None``."""

    image_score: torch.Tensor
    score_map: torch.Tensor | None = None


class Detector:
    """Base class: subclasses implement :meth:`_predict` and, if ``requires_fit``, :meth:`_fit`."""

    requires_fit: bool = False
    name: str = "detector"

    def __init__(self) -> None:
        self._fitted = not self.requires_fit

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def fit(self, train_items: Sequence[dict], val_items: Sequence[dict] | None = None) -> Detector:
        """Learn from InD training (and validation) items; returns ``self``."""
        if self.requires_fit:
            self._fit(train_items, val_items)
        self._fitted = True
        return self

    def _fit(self, train_items: Sequence[dict], val_items: Sequence[dict] | None) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> DetectorOutput:
        """Scores for a batch ``(B, C, *spatial)``; higher = more OOD."""
        if not self._fitted:
            raise NotFittedError(f"{type(self).__name__} must be fitted first: call .fit(train_items)")
        if not isinstance(images, torch.Tensor) or images.dim() < 3:
            raise ValueError(
                f"images must be a tensor (B, C, *spatial), got {getattr(images, 'shape', type(images))}"
            )
        return self._predict(images)

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        raise NotImplementedError

    __call__ = predict


def max_entropy(num_classes: int) -> float:
    """Entropy of the uniform distribution over ``num_classes`` (nats)."""
    return float(np.log(num_classes))


def foreground_mean(pixel_scores: torch.Tensor, foreground: torch.Tensor, empty_value: float) -> torch.Tensor:
    """Mean of ``pixel_scores`` ``(B, *spatial)`` over ``foreground`` pixels per image; ``empty_value``
    where an image has no foreground (the paper's rule for entropy scores: maximum entropy)."""
    flat, mask = pixel_scores.flatten(1), foreground.flatten(1).to(pixel_scores.dtype)
    count = mask.sum(1)
    mean = (flat * mask).sum(1) / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.full_like(mean, empty_value))


def batches(items: Sequence[dict], batch_size: int, key: str = "image"):
    """Stack ``items[key]`` into float tensors of at most ``batch_size``."""
    for start in range(0, len(items), batch_size):
        yield torch.from_numpy(
            np.stack([np.asarray(item[key]) for item in items[start : start + batch_size]])
        )
