"""Deep-ensemble entropy (Lakshminarayanan et al., NeurIPS 2017), aggregated as in Cho et al. (2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Detector, DetectorOutput, eval_mode, segmentation_logits
from .entropy import entropy_output

__all__ = ["EnsembleDetector"]


class EnsembleDetector(Detector):
    """Predictive entropy of a deep ensemble (Lakshminarayanan, Pritzel, Blundell, "Simple and scalable
    predictive uncertainty estimation using deep ensembles", NeurIPS 2017), scored as in Cho et al.
    (2023, section 4.1) after Mehrtash et al. (2020). The benchmark protocol uses 5 members.

    * ``p = mean over members of softmax(logits)``; pixel score: the entropy of ``p`` in nats.
    * Image score: the mean pixel entropy over the foreground predicted by ``p`` (``argmax_k p_k != 0``);
      ``log K`` (maximum entropy) where nothing is predicted as foreground (the paper's rule).
    * Score map: the pixel entropy ``(B, 1, *spatial)``, interpolated to the input size if needed.

    Members run one after another (memory of one member at a time), each in eval mode with its
    ``training`` flags restored after; each gets the images on its own device and the probabilities are
    accumulated on the first member's device.

    Args:
        networks: the trained members (at least one); their forwards return logits ``(B, K, *spatial)``,
            ``K >= 2``, and must agree on the output shape.

    Raises:
        ValueError: for no members, or (at prediction) members whose outputs differ in shape.
    """

    name = "ensemble"

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        networks = list(networks)
        if not networks:
            raise ValueError("an ensemble needs at least one network")
        for index, network in enumerate(networks):
            if not isinstance(network, nn.Module):
                raise TypeError(f"member {index} is a {type(network).__name__}, not an nn.Module")
        super().__init__()
        self.networks = nn.ModuleList(networks)

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        probs = None
        with eval_mode(*self.networks):
            for index, network in enumerate(self.networks):
                step = segmentation_logits(network, images).softmax(dim=1)
                if probs is None:
                    probs = step
                elif step.shape != probs.shape:
                    raise ValueError(
                        f"ensemble members disagree on the output shape: member 0 gives {tuple(probs.shape)}, "
                        f"member {index} gives {tuple(step.shape)}"
                    )
                else:
                    probs = probs + step.to(probs.device)
        return entropy_output(probs / len(self.networks), images.shape[2:])
