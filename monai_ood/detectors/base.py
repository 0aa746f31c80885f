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

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..calibration.weibull import NotFittedError

__all__ = [
    "Detector",
    "DetectorOutput",
    "NotFittedError",
    "batches",
    "eval_mode",
    "foreground_mean",
    "max_entropy",
    "module_device",
    "segmentation_logits",
    "to_input_size",
]


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


_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


def module_device(module: nn.Module, fallback: torch.device) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); ``fallback`` for a module with neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return fallback


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode and restore every submodule's own ``training`` flag afterwards,
    even on error, so that a detector never changes the state of the network it was given."""
    saved = [(sub, sub.training) for module in modules for sub in module.modules()]
    try:
        for sub, training in saved:  # only flags that change are set: an eval-mode network costs nothing
            if training:
                sub.training = False
        yield
    finally:
        for sub, training in saved:
            if sub.training != training:
                sub.training = training


def segmentation_logits(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run ``network`` on ``images`` (moved to the network's device) and return float32 logits
    ``(B, K, *spatial)``; a tuple/list output (e.g. deep supervision) contributes its first tensor.

    Raises:
        ValueError: if the output is not ``(B, K, *spatial)`` with ``K >= 2`` softmax channels.
    """
    images = images.to(module_device(network, images.device))
    output = network(images)
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.dim() != images.dim() or output.shape[0] != len(images):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
        raise ValueError(
            f"the network must return logits (B, K, *spatial) for input {tuple(images.shape)}, got {shape}"
        )
    if output.shape[1] < 2:
        raise ValueError(
            f"softmax scores need K >= 2 output channels (background + foreground), got {output.shape[1]}; "
            "a single sigmoid channel is not supported"
        )
    return output.float()


def to_input_size(score_map: torch.Tensor, spatial_size) -> torch.Tensor:
    """``score_map`` ``(B, 1, *S)`` linearly interpolated to ``spatial_size`` (a no-op when equal)."""
    spatial_size = tuple(int(s) for s in spatial_size)
    if tuple(score_map.shape[2:]) == spatial_size:
        return score_map
    mode = _INTERPOLATION[len(spatial_size)]
    return F.interpolate(score_map, size=spatial_size, mode=mode, align_corners=False)


def max_entropy(num_classes: int) -> float:
    """Entropy of the uniform distribution over ``num_classes`` (nats)."""
    return float(np.log(num_classes))


def foreground_mean(pixel_scores: torch.Tensor, foreground: torch.Tensor, empty_value) -> torch.Tensor:
    """Mean of ``pixel_scores`` ``(B, *spatial)`` over ``foreground`` pixels per image; ``empty_value``
    (a number, or a ``(B,)`` tensor) where an image has no foreground (the paper's rule for entropy
    scores: the maximum entropy)."""
    flat, mask = pixel_scores.flatten(1), foreground.flatten(1).to(pixel_scores.dtype)
    count = mask.sum(1)
    mean = (flat * mask).sum(1) / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.as_tensor(empty_value, dtype=mean.dtype, device=mean.device))


def batches(items: Sequence[dict], batch_size: int, key: str = "image"):
    """Stack ``items[key]`` into float tensors of at most ``batch_size``."""
    for start in range(0, len(items), batch_size):
        yield torch.from_numpy(
            np.stack([np.asarray(item[key]) for item in items[start : start + batch_size]])
        )
