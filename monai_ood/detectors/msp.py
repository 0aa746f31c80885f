"""Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017), per pixel, aggregated over the foreground.

The plumbing the post-hoc detectors share (:func:`~monai_ood.detectors.base.eval_mode`,
:func:`~monai_ood.detectors.base.segmentation_logits`, ...) lives in :mod:`monai_ood.detectors.base`.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Detector, DetectorOutput, eval_mode, foreground_mean, segmentation_logits, to_input_size

__all__ = ["MaxSoftmaxDetector"]


class MaxSoftmaxDetector(Detector):
    """Maximum softmax probability baseline (Hendrycks & Gimpel, "A baseline for detecting misclassified
    and out-of-distribution examples in neural networks", ICLR 2017), applied per pixel.

    * Pixel score: ``1 - max_k softmax(logits)_k`` in ``[0, 1 - 1/K]`` (higher = more OOD).
    * Image score: the mean pixel score over the predicted foreground (``argmax_k != 0``, class 0 being
      background), the aggregation the paper uses for entropy (Cho et al. 2023, section 4.1, after
      Mehrtash et al. 2020). Where nothing is predicted as foreground, the score is the maximum possible
      value ``1 - 1/K`` (the uniform softmax), mirroring the paper's "maximum entropy" rule: an image
      the network finds nothing in is rejected clearly.
    * Score map: the pixel score ``(B, 1, *spatial)``; linearly interpolated to the input size if the
      logits have another size.

    The network runs in eval mode during prediction; its modules' ``training`` flags are restored after.
    Scores are float32 on the network's device.

    Args:
        network: a trained segmentation network whose forward returns logits ``(B, K, *spatial)``,
            ``K >= 2`` (softmax), 2D or 3D.
    """

    name = "msp"

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        with eval_mode(self.network):
            logits = segmentation_logits(self.network, images)
        probs = logits.softmax(dim=1)
        top, predicted = probs.max(dim=1)
        pixel = 1.0 - top
        num_classes = logits.shape[1]
        image_score = foreground_mean(pixel, predicted != 0, empty_value=1.0 - 1.0 / num_classes)
        return DetectorOutput(image_score, to_input_size(pixel.unsqueeze(1), images.shape[2:]))
