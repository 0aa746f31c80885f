"""The paper's detector: the auxiliary prototypical classifier's score (Cho et al. 2023, eq. 6)."""

from __future__ import annotations

import torch

from ..networks import PrototypeOODNet
from .base import Detector, DetectorOutput, eval_mode, module_device

__all__ = ["PrototypeDetector"]


class PrototypeDetector(Detector):
    """The image score and map ``A(x)`` (upsampled) of a trained :class:`~monai_ood.networks.PrototypeOODNet`:
    the score is the network's own aggregation of ``A`` (its ``aggregation``: the mean over feature
    pixels, the paper's ``||A(x)||_1 / (feature pixels)``, a quantile or the foreground mean; with
    score terms, their Weibull-hazard combination). Needs no fitting: the head was trained with the
    network.

    One encoder-only pass (:meth:`PrototypeOODNet.ood`): the decoder is not needed for the score.
    """

    name = "prototype"

    def __init__(self, net: PrototypeOODNet) -> None:
        if not isinstance(net, PrototypeOODNet):
            raise TypeError(f"PrototypeDetector needs a PrototypeOODNet, got {type(net).__name__}")
        super().__init__()
        self.net = net

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        with eval_mode(self.net):
            ood = self.net.ood(images.to(module_device(self.net, images.device)))
        return DetectorOutput(ood.image_score, ood.score_map_upsampled)
