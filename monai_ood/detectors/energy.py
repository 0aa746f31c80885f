"""Energy score (Liu, Wang, Owens, Li, NeurIPS 2020), per pixel, aggregated over the predicted foreground."""

from __future__ import annotations

import torch
from torch import nn

from .base import Detector, DetectorOutput, eval_mode, foreground_mean, segmentation_logits, to_input_size

__all__ = ["EnergyDetector"]


class EnergyDetector(Detector):
    """Free energy of the logits (Liu et al., "Energy-based out-of-distribution detection", NeurIPS 2020),
    applied per pixel.

    * Pixel score: ``E = -T * logsumexp_k(logits_k / T)`` (higher energy = more OOD), temperature ``T``
      (default 1, the setting Liu et al. use for scoring without fine-tuning).
    * Image score: the mean of ``E`` over the predicted foreground pixels (``argmax_k logits != 0``). Where
      nothing is predicted as foreground, the image's **maximum** pixel energy. The energy is unbounded,
      so there is no "maximum possible value" to mirror the paper's maximum-entropy rule with; the image's
      own most OOD pixel is the closest analogue (the score of the least confident pixel, at least as
      high as any foreground mean the image could have had) and keeps the score on the energy scale.
    * Score map: ``E`` ``(B, 1, *spatial)``, linearly interpolated to the input size if the logits have
      another size.

    The network runs in eval mode during prediction; its modules' ``training`` flags are restored after.
    Scores are float32 on the network's device.

    Args:
        network: a trained segmentation network whose forward returns logits ``(B, K, *spatial)``,
            ``K >= 2``, 2D or 3D.
        temperature: ``T > 0``.
    """

    name = "energy"

    def __init__(self, network: nn.Module, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        super().__init__()
        self.network = network
        self.temperature = float(temperature)

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        with eval_mode(self.network):
            logits = segmentation_logits(self.network, images)
        pixel = -self.temperature * torch.logsumexp(logits / self.temperature, dim=1)
        image_score = foreground_mean(
            pixel, logits.argmax(dim=1) != 0, empty_value=pixel.flatten(1).max(dim=1).values
        )
        return DetectorOutput(image_score, to_input_size(pixel.unsqueeze(1), images.shape[2:]))
