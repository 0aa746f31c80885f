"""Predictive entropy of the softmax, aggregated over the predicted foreground (Mehrtash et al. 2020), the
score the paper uses for its MC-dropout and ensemble baselines (Cho et al. 2023, section 4.1)."""

from __future__ import annotations

import torch
from torch import nn

from .base import (
    Detector,
    DetectorOutput,
    eval_mode,
    foreground_mean,
    max_entropy,
    segmentation_logits,
    to_input_size,
)

__all__ = ["EntropyDetector", "entropy_output", "predictive_entropy"]


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats ``-sum_k p_k log p_k`` over dim 1 of ``probs`` ``(B, K, *spatial)``, with
    ``0 log 0 = 0``; returns ``(B, *spatial)``."""
    return -torch.special.xlogy(probs, probs).sum(dim=1)


def entropy_output(probs: torch.Tensor, spatial_size) -> DetectorOutput:
    """The paper's entropy score from (mean) class probabilities ``(B, K, *spatial)``.

    Image score: mean pixel entropy over the predicted foreground (``argmax_k p_k != 0``); ``log K``
    (the maximum entropy) where no pixel is predicted as foreground. Score map: the pixel entropy
    ``(B, 1, *spatial)`` linearly interpolated to ``spatial_size`` if it differs.
    """
    pixel = predictive_entropy(probs)
    foreground = probs.argmax(dim=1) != 0
    image_score = foreground_mean(pixel, foreground, empty_value=max_entropy(probs.shape[1]))
    return DetectorOutput(image_score, to_input_size(pixel.unsqueeze(1), spatial_size))


class EntropyDetector(Detector):
    """Softmax entropy of one deterministic pass, as used by Cho et al. (2023, section 4.1) after
    Mehrtash et al. ("Confidence calibration and predictive uncertainty estimation for deep medical image
    segmentation", IEEE TMI 2020).

    * Pixel score: ``H = -sum_k p_k log p_k`` (nats), ``p = softmax(logits)``, in ``[0, log K]``.
    * Image score: the mean of ``H`` over the predicted foreground pixels (``argmax_k p_k != 0``); where
      nothing is predicted as foreground, the maximum entropy ``log K`` ("for clear rejection", the
      paper's rule).
    * Score map: ``H`` ``(B, 1, *spatial)``, linearly interpolated to the input size if the logits have
      another size.

    The network runs in eval mode during prediction; its modules' ``training`` flags are restored after.
    Scores are float32 on the network's device.

    Args:
        network: a trained segmentation network whose forward returns logits ``(B, K, *spatial)``,
            ``K >= 2`` (softmax), 2D or 3D.
    """

    name = "entropy"

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        with eval_mode(self.network):
            logits = segmentation_logits(self.network, images)
        return entropy_output(logits.softmax(dim=1), images.shape[2:])
