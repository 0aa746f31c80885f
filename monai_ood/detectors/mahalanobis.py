"""Single-Gaussian Mahalanobis distance on encoder features (Gonzalez et al., MICCAI 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..networks.capture import encode_until, named_module
from ..networks.gaussian import fit_shrunk_gaussian, mahalanobis_distance
from ..networks.presets import feature_layer_for
from ..networks.prototype_net import PrototypeOODNet
from .base import Detector, DetectorOutput, NotFittedError, batches, eval_mode, module_device, to_input_size

__all__ = ["MahalanobisDetector"]

_ADAPTIVE_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


class MahalanobisDetector(Detector):
    """One Gaussian fitted to pooled encoder features of the InD training images; the score is the
    Mahalanobis distance to it (Gonzalez et al., "Detecting when pre-trained nnU-Net models fail silently
    for COVID-19 lung lesion segmentation", MICCAI 2021: the single-class version of Lee et al. 2018, the
    baseline Cho et al. 2023 contrast their class-wise prototypes with).

    * Features: the output of the module ``layer`` (``"auto"``: the encoder bottleneck from
      :func:`monai_ood.networks.feature_layer_for`), captured by a temporary forward hook; the pass stops
      at that layer (the decoder is never run). A :class:`~monai_ood.networks.PrototypeOODNet` is unwrapped
      to its ``.backbone`` (``"auto"`` then means the layer its head hooks; a given name is relative to the
      backbone).
    * Pooling (Gonzalez et al. reduce the encoder features by average pooling before fitting the Gaussian):
      ``pool_size=1`` (default) is global average pooling, one ``C``-vector per image;
      ``pool_size=g > 1`` is adaptive average pooling to a ``g x g (x g)`` grid, flattened channel-major to
      a ``C * g^d`` vector (keeps coarse layout, multiplies the dimension by ``g^d``).
    * Fit: the mean and the **Ledoit-Wolf** shrunk covariance (:class:`sklearn.covariance.LedoitWolf`,
      shrinkage towards ``(trace / D) * I`` with the analytically optimal intensity) of the pooled training
      features, in float64. Shrinkage is required: ``D`` (256-2048 at the bottleneck) is comparable to or
      larger than the ~100 training images, where the sample covariance is singular. ``val_items`` are not
      used. At least 2 training images.
    * Image score: ``sqrt((z - mu)^T Sigma^{-1} (z - mu))`` of the pooled test features ``z`` (the distance,
      not its square; the ranking is the same), computed in float64 with a Cholesky factor of ``Sigma``
      and a triangular solve (no explicit inverse).
    * Score map (``pool_size=1`` only, where the Gaussian lives in the ``C``-dimensional space of a single
      feature pixel): the same Gaussian applied to every unpooled feature pixel, ``(B, 1, *feature_spatial)``,
      bilinearly/trilinearly interpolated (``align_corners=False``) to the input size. Single pixels vary
      more than image means, so map values are larger than image scores; the map shows where, not how
      much. For ``pool_size > 1`` the map is ``None``.

    The network runs in eval mode for fitting and prediction; its ``training`` flags are restored after.
    Scores are float32 on the network's device.

    Args:
        network: the trained segmentation network.
        layer: ``"auto"`` or the dotted name of a module in ``network.named_modules()``.
        pool_size: ``1`` for global average pooling, ``g > 1`` for adaptive average pooling to ``g^d``.
        batch_size: images per forward pass during :meth:`fit`.

    Attributes (after ``fit``):
        mean_: ``(D,)`` float64 CPU tensor. covariance_: ``(D, D)`` float64 CPU tensor (shrunk).
        shrinkage_: the Ledoit-Wolf shrinkage intensity in ``[0, 1]``. num_train_: training images used.
    """

    name = "mahalanobis"
    requires_fit = True

    def __init__(
        self, network: nn.Module, layer: str = "auto", pool_size: int = 1, batch_size: int = 8
    ) -> None:
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be a positive int, got {pool_size!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        super().__init__()
        if isinstance(network, PrototypeOODNet):
            network, layer = network.backbone, (network.layer if layer == "auto" else layer)
        elif layer == "auto":
            layer = feature_layer_for(network)
        module = named_module(network, layer)
        self.network = network
        self.layer = layer
        self.pool_size = pool_size
        self.batch_size = batch_size
        self._module = module
        self.mean_: torch.Tensor | None = None
        self.covariance_: torch.Tensor | None = None
        self.shrinkage_: float | None = None
        self.num_train_: int | None = None
        self._cholesky: torch.Tensor | None = None
        self._device_cache: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None

    # -- features ---------------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Output of the hooked layer for ``images`` ``(B, C, *spatial)``, from an encoder-only pass."""
        with eval_mode(self.network):
            return encode_until(
                self.network, self._module, images.to(module_device(self.network, images.device))
            )

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` features to ``(B, D)`` vectors: global (``pool_size=1``) or adaptive average pooling."""
        if self.pool_size == 1:
            return features.flatten(2).mean(dim=2)
        return _ADAPTIVE_POOL[features.dim() - 2](features, self.pool_size).flatten(1)

    # -- fit --------------------------------------------------------------------------------------------
    def _fit(self, train_items: Sequence[dict], val_items: Sequence[dict] | None) -> None:
        with torch.no_grad():
            pooled = [
                self.pool(self.features(batch.float())).double().cpu()
                for batch in batches(train_items, self.batch_size)
            ]
        if not pooled or sum(len(p) for p in pooled) < 2:
            raise ValueError("MahalanobisDetector.fit needs at least 2 training images")
        x = torch.cat(pooled).numpy()
        if not np.isfinite(x).all():
            raise ValueError(f"the features of layer {self.layer!r} contain NaN or inf")
        self.mean_, self.covariance_, self._cholesky, self.shrinkage_ = fit_shrunk_gaussian(x)
        self.num_train_ = len(x)
        self._device_cache = None

    # -- scoring ----------------------------------------------------------------------------------------
    def _statistics(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cholesky is None or self.mean_ is None:
            raise NotFittedError("MahalanobisDetector must be fitted first: call .fit(train_items)")
        if self._device_cache is None or self._device_cache[0] != device:
            self._device_cache = (device, self.mean_.to(device), self._cholesky.to(device))
        return self._device_cache[1], self._device_cache[2]

    def distance(self, vectors: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance (float64) of ``vectors`` ``(N, D)`` to the fitted Gaussian: ``(N,)``."""
        mean, chol = self._statistics(vectors.device)
        if vectors.shape[-1] != mean.shape[0]:
            raise ValueError(
                f"expected {mean.shape[0]}-dimensional vectors, got shape {tuple(vectors.shape)}"
            )
        return mahalanobis_distance(vectors, mean, chol)

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        features = self.features(images)
        image_score = self.distance(self.pool(features)).float()
        score_map = None
        if self.pool_size == 1:
            batch, channels, spatial = features.shape[0], features.shape[1], features.shape[2:]
            pixels = features.movedim(1, -1).reshape(-1, channels)
            low = self.distance(pixels).float().reshape(batch, 1, *spatial)
            score_map = to_input_size(low, images.shape[2:])
        return DetectorOutput(image_score, score_map)
