"""Deep-ensemble scores: predictive entropy (Lakshminarayanan et al., NeurIPS 2017), aggregated as in Cho
et al. (2023), and the members' pairwise Dice (Zenk et al. 2025)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .base import Detector, DetectorOutput, eval_mode, segmentation_logits, to_input_size
from .entropy import entropy_output

__all__ = ["EnsembleDetector", "EnsembleDiceDetector", "pairwise_dice"]


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

    def member_probabilities(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """Each member's softmax ``(B, K, *spatial)`` in turn, on the first member's device (a generator:
        wrap it in :func:`contextlib.closing` so that the members' modes are restored even if the
        consumer stops early or raises).

        Raises:
            ValueError: if a member's output shape differs from the first member's.
        """
        first = None
        with eval_mode(*self.networks):
            for index, network in enumerate(self.networks):
                step = segmentation_logits(network, images).softmax(dim=1)
                if first is None:
                    first = (step.shape, step.device)
                elif step.shape != first[0]:
                    raise ValueError(
                        f"ensemble members disagree on the output shape: member 0 gives {tuple(first[0])}, "
                        f"member {index} gives {tuple(step.shape)}"
                    )
                yield step.to(first[1])

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        probs = None
        with contextlib.closing(self.member_probabilities(images)) as members:  # restores modes on error
            for step in members:
                probs = step if probs is None else probs + step
        return entropy_output(probs / len(self.networks), images.shape[2:])


def pairwise_dice(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean over member pairs of the mean foreground Dice between their label maps.

    For members ``i < j`` and each foreground class ``k = 1 .. K-1``:
    ``Dice = 2 |A_i,k & A_j,k| / (|A_i,k| + |A_j,k|)``, and **1 where both masks are empty** (two members
    agreeing that class ``k`` is absent agree perfectly; MONAI's ``compute_dice(..., ignore_empty=False)``
    rule). The Dice of a pair is the mean over the ``K - 1`` foreground classes; the result is the mean
    over the ``M (M - 1) / 2`` pairs.

    Args:
        masks: ``(M, B, *spatial)`` integer label maps of ``M >= 2`` members.
        num_classes: ``K >= 2`` (label 0 is background).

    Returns:
        ``(B,)`` float64, in ``[0, 1]``.
    """
    if masks.dim() < 3 or masks.shape[0] < 2:
        raise ValueError(f"masks must be (M >= 2, B, *spatial), got shape {tuple(masks.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes!r}")
    labels = masks.flatten(2)  # (M, B, N)
    classes = torch.arange(1, num_classes, device=masks.device)
    onehot = labels.unsqueeze(-1) == classes  # (M, B, N, K-1) bool
    sizes = onehot.sum(dim=2)  # (M, B, K-1)
    dice = []
    for i, j in itertools.combinations(range(len(masks)), 2):
        overlap = (onehot[i] & onehot[j]).sum(dim=1).double()
        total = (sizes[i] + sizes[j]).double()
        dice.append(torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.ones_like(total)))
    return torch.stack(dice).mean(dim=2).mean(dim=0)


class EnsembleDiceDetector(EnsembleDetector):
    """Disagreement of a deep ensemble's masks: one minus the mean pairwise Dice between the members'
    argmax segmentations, the best image-level failure detector of Zenk et al. ("Comparative
    benchmarking of failure detection methods in medical image segmentation: unveiling the role of
    confidence aggregation", Medical Image Analysis 2025; BENCHMARK.md, "Methods compared in one run").

    * Image score: ``1 - pairwise_dice(argmax masks)`` (:func:`pairwise_dice`: mean over member pairs of
      the mean foreground Dice, 1 for a class both members leave empty), in ``[0, 1]``, higher = more OOD.
      Zenk et al.'s implementation (``PairwiseDiceAggregator`` in ``segmentation_failures_benchmark``)
      offers both a generalised Dice (its class default) and this mean Dice over classes with the same
      empty-vs-empty rule; the benchmark protocol names the mean Dice.
    * Score map: the fraction of members that disagree with the per-pixel majority label,
      ``1 - (votes of the most voted label) / M``, in ``[0, 1 - 1/M]`` (independent of how a tie is
      broken), ``(B, 1, *spatial)`` at input size.

    Members run one after another (only their ``(B, *spatial)`` masks are kept), in eval mode with their
    ``training`` flags restored after. Scores are float32 on the first member's device.

    Args:
        networks: at least two trained members with the same output shape ``(B, K, *spatial)``, ``K >= 2``.

    Raises:
        ValueError: for fewer than two members, or (at prediction) members whose outputs differ in shape.
    """

    name = "ensemble_dice"

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        networks = list(networks)
        if len(networks) < 2:
            raise ValueError(f"pairwise Dice needs at least two ensemble members, got {len(networks)}")
        super().__init__(networks)

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        masks, num_classes = [], 0
        with contextlib.closing(self.member_probabilities(images)) as members:
            for probs in members:
                masks.append(probs.argmax(dim=1))
                num_classes = probs.shape[1]
        masks = torch.stack(masks)  # (M, B, *spatial)
        image_score = (1.0 - pairwise_dice(masks, num_classes)).float()
        majority = torch.stack([(masks == k).sum(dim=0) for k in range(num_classes)]).amax(dim=0)
        disagreement = 1.0 - majority.float() / len(masks)  # (B, *spatial)
        return DetectorOutput(image_score, to_input_size(disagreement.unsqueeze(1), images.shape[2:]))
