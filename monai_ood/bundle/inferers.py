"""Inferers that produce the OOD outputs of a :class:`~monai_ood.networks.PrototypeOODNet` in a bundle.

The network's ``forward`` returns plain logits (so ``verify_net_in_out`` and every MONAI inferer work);
the OOD outputs come from these inferers, which call :meth:`~monai_ood.networks.PrototypeOODNet.forward_with_ood`
or :meth:`~monai_ood.networks.PrototypeOODNet.ood` on the network the engine holds.

:class:`PrototypeOODInferer` returns ONE tensor, the logits with the upsampled score map ``A(x)``
appended as the last channel, through any MONAI inferer (``SimpleInferer``, ``SlidingWindowInferer``,
``SliceInferer``). One tensor rather than a dict on purpose: MONAI 1.6's sliding-window inference
returns dict outputs as plain tensors without the input's metadata, which ``Invertd`` and ``SaveImaged``
need to write the outputs at the input's geometry. :class:`~monai_ood.bundle.SplitOODOutputd` splits
the channels again in the post-processing.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer, SimpleInferer
from torch import nn

from ..engines.step import TrainingForward

__all__ = ["PrototypeOODInferer", "ScoreMapInferer", "unwrap_network"]


def unwrap_network(network: nn.Module) -> nn.Module:
    """The :class:`~monai_ood.networks.PrototypeOODNet` inside DDP / DataParallel / :class:`TrainingForward`.

    Raises:
        TypeError: if what is inside has no OOD outputs (``forward_with_ood``).
    """
    inner = network
    while True:
        if isinstance(inner, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = inner.module
        elif isinstance(inner, TrainingForward):
            inner = inner.network
        else:
            break
    if not hasattr(inner, "forward_with_ood"):
        raise TypeError(
            f"the network must be a monai_ood PrototypeOODNet (with forward_with_ood), got {type(inner).__name__}"
        )
    return inner


class PrototypeOODInferer(Inferer):
    """Segmentation logits and the score map ``A(x)`` in one tensor: ``(B, K + 1, *spatial)``.

    Channels ``0..K-1`` are the logits, channel ``K`` is ``A(x)`` linearly upsampled to the (window's)
    input size, each window from one pass of the whole network (``forward_with_ood``). The base inferer
    stitches windows/slices and keeps the input's metadata.

    Args:
        inferer: the MONAI inferer to run the combined predictor with (e.g. ``SliceInferer`` to run a 2D
            model slice by slice over a volume, ``SlidingWindowInferer`` for 3D); ``None`` = ``SimpleInferer``.
    """

    def __init__(self, inferer: Inferer | None = None) -> None:
        super().__init__()
        self.inferer = inferer if inferer is not None else SimpleInferer()

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        net = unwrap_network(network)

        def predictor(x: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
            logits, ood = net.forward_with_ood(x)
            return torch.cat([logits, ood.score_map_upsampled.to(logits.dtype)], dim=1)

        return self.inferer(inputs, predictor, *args, **kwargs)


class ScoreMapInferer(Inferer):
    """The score map ``A(x)`` alone, from the network's OOD pass (:meth:`~monai_ood.networks.PrototypeOODNet.ood`).

    Args:
        upsample: ``False`` (default): ``A(x)`` on the feature grid ``(B, 1, *feature_spatial)``, the
            values the paper fits its Weibull calibration to (each feature cell counts once); ``True``:
            linearly upsampled to the input size.
    """

    def __init__(self, upsample: bool = False) -> None:
        super().__init__()
        self.upsample = bool(upsample)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        ood = unwrap_network(network).ood(inputs)
        return (ood.score_map_upsampled if self.upsample else ood.score_map).float()
