"""Monte Carlo dropout entropy (Gal & Ghahramani, ICML 2016), aggregated as in Cho et al. (2023, sec. 4.1)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from .base import Detector, DetectorOutput, eval_mode, module_device, segmentation_logits
from .entropy import entropy_output

__all__ = ["MCDropoutDetector", "dropout_modules"]


def dropout_modules(network: nn.Module) -> list[nn.Module]:
    """Every active dropout module of ``network`` (``p > 0``): ``nn.Dropout``, ``Dropout1d/2d/3d``,
    ``AlphaDropout`` and ``FeatureAlphaDropout`` (all ``_DropoutNd``); MONAI's ``ADN`` blocks hold these
    same torch classes. MONAI builds ``Dropout(p=0.0)`` when no dropout was asked for: those are skipped."""
    return [m for m in network.modules() if isinstance(m, _DropoutNd) and m.p > 0]


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the RNG dropout draws from on ``device`` for the duration, restoring the caller's RNG state
    after (``torch.random.fork_rng``); ``seed=None`` uses the global RNG as it is."""
    if seed is None:
        yield
        return
    cuda_index = None
    if device.type == "cuda":
        cuda_index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[] if cuda_index is None else [cuda_index]):
        torch.random.default_generator.manual_seed(seed)
        if cuda_index is not None:
            with torch.cuda.device(cuda_index):
                torch.cuda.manual_seed(seed)  # only this device, the one fork_rng restores
        yield


class MCDropoutDetector(Detector):
    """Predictive entropy of Monte Carlo dropout (Gal & Ghahramani, "Dropout as a Bayesian approximation:
    representing model uncertainty in deep learning", ICML 2016), scored as in Cho et al. (2023, section
    4.1) after Mehrtash et al. (2020).

    * ``num_passes`` stochastic forward passes (default 10, as in the paper and the benchmark protocol)
      with the network in eval mode except its dropout modules, which are switched to train mode (so
      batch norms keep using their running statistics); every ``training`` flag is restored afterwards,
      also on error.
    * ``p = mean over passes of softmax(logits)``; pixel score: the entropy of ``p`` in nats (the
      predictive entropy, total uncertainty).
    * Image score: the mean pixel entropy over the foreground predicted by ``p`` (``argmax_k p_k != 0``);
      ``log K`` (maximum entropy) where nothing is predicted as foreground (the paper's rule).
    * Score map: the pixel entropy ``(B, 1, *spatial)``, interpolated to the input size if needed.

    Reproducibility: with an integer ``seed`` each :meth:`predict` call reseeds the RNG of the network's
    device (CPU, or the one CUDA device) inside ``torch.random.fork_rng``, so the same call gives the same
    scores and the caller's RNG state is left untouched. The dropout masks of an image then depend on its
    position in the batch, so scores are reproducible for the same batching. ``seed=None`` draws from the
    global RNG instead. (Bit-identical repeats on CUDA also need deterministic kernels.)

    Args:
        network: a trained segmentation network with dropout (``p > 0``) whose forward returns logits
            ``(B, K, *spatial)``, ``K >= 2``, 2D or 3D.
        num_passes: number of stochastic forward passes (>= 1).
        seed: RNG seed for the dropout masks, or ``None``.

    Raises:
        ValueError: if the network has no dropout module with ``p > 0``.
    """

    name = "mc_dropout"

    def __init__(self, network: nn.Module, num_passes: int = 10, seed: int | None = 0) -> None:
        if not isinstance(num_passes, int) or num_passes < 1:
            raise ValueError(f"num_passes must be a positive int, got {num_passes!r}")
        if not dropout_modules(network):
            raise ValueError(
                f"MC dropout needs a network with dropout, but {type(network).__name__} has no dropout module "
                "with p > 0; train it with dropout (e.g. monai.networks.nets.UNet(..., dropout=0.2))"
            )
        super().__init__()
        self.network = network
        self.num_passes = num_passes
        self.seed = seed

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        dropouts = dropout_modules(self.network)
        if not dropouts:
            raise ValueError(f"{type(self.network).__name__} no longer has a dropout module with p > 0")
        device = module_device(self.network, images.device)
        probs = None
        with eval_mode(self.network), _seeded(self.seed, device):
            for module in dropouts:
                module.train()
            for _ in range(self.num_passes):
                step = segmentation_logits(self.network, images).softmax(dim=1)
                probs = step if probs is None else probs + step
        return entropy_output(probs / self.num_passes, images.shape[2:])
