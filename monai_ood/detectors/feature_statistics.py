"""Multi-layer feature statistics: one shrinkage Gaussian per encoder stage, z-scored and summed
(FRODO-style, after Çallı et al. and Lambert et al.; the BENCHMARK.md baseline "multi-layer feature
statistics")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.utils import look_up_option
from torch import nn

from ..networks.capture import capture_features, named_module
from ..networks.gaussian import fit_shrunk_gaussian, mahalanobis_distance
from ..networks.presets import encoder_stages
from ..networks.prototype_net import PrototypeOODNet
from .base import Detector, DetectorOutput, NotFittedError, batches, eval_mode, module_device

__all__ = ["FeatureStatisticsDetector"]

STATISTICS = ("mean", "std")


class FeatureStatisticsDetector(Detector):
    """Channel statistics of every encoder stage, one Ledoit-Wolf Gaussian per stage, per-stage
    Mahalanobis distances z-scored on validation images and summed.

    The multi-layer feature-statistics baseline of the benchmark protocol (BENCHMARK.md, "Methods
    compared in one run"). FRODO (Çallı et al., "FRODO: an in-depth analysis of a system to reject
    outlier samples from a trained neural network", IEEE Trans. Med. Imaging) fits one Gaussian to the
    spatially pooled features of each layer and combines the per-layer Mahalanobis distances; Lambert, Forbes,
    Doyle, Dojat, "Multi-layer aggregation as a key to feature-based OOD detection" (UNSURE/MICCAI 2023,
    arXiv:2307.15647, code ``benolmbrt/MedicOOD``) benchmark it on 3D segmentation networks.

    * Stages: ``layers=None`` = every encoder stage of the network
      (:func:`monai_ood.networks.presets.encoder_stages`, shallow to deep, up to the bottleneck), or a
      list of dotted module names. A :class:`~monai_ood.networks.PrototypeOODNet` is unwrapped to its
      ``.backbone`` (names are relative to the backbone).
    * Features, from **one forward pass**: a forward hook on every stage reduces the stage output
      ``(B, C, *S)`` to its channel statistics over space, in float64, and the pass stops (the hook
      raises) as soon as the last hooked stage has run, so the decoder never runs. Per stage the vector
      is the concatenation, in the order of ``statistics``, of the channel ``mean`` and the channel
      ``std`` (population standard deviation, ``correction=0``): ``2C`` values by default. A stage whose
      output has one pixel has ``std = 0``: keep only ``"mean"`` for such a stage's network, or rely on
      the shrinkage (it gives the constant dimensions a small positive variance). MedicOOD's FRODO
      hooks every convolution and keeps the channel means only; the stages and the added ``std``
      (contrast and noise, where artefacts show: BENCHMARK.md, "Aggregation and depth") are this
      project's choice.
    * Fit: per stage the mean and the **Ledoit-Wolf** shrunk covariance
      (:class:`sklearn.covariance.LedoitWolf`) of the training vectors in float64 (shrinkage is needed:
      ``2C`` is 2 x 256 at a UNet bottleneck against ~100 training images). MedicOOD's FRODO
      instead adds ``0.01 I`` to the covariance of standardised features and averages distances divided
      by the feature dimension; the z-scoring below is this project's choice (BENCHMARK.md), which makes
      the per-stage terms comparable whatever their dimension.
    * Z-scoring: per stage, the mean and the sample standard deviation (``ddof=1``) of the Mahalanobis
      distances of the **validation** items (``fit(train_items, val_items)``). With ``val_items=None``
      the training items' own distances are used instead (``reference_ == "train"``): those are biased
      low (the Gaussian was fitted on them), and more so for high-dimensional stages, so the deep stages
      get inflated z-scores; pass validation items where there are any.
    * Image score: the sum over stages of ``(d_s - loc_s) / scale_s``, ``d_s`` the Mahalanobis distance
      (not squared) of stage ``s``. :meth:`stage_distances` and :meth:`stage_scores` give the ``(B, S)``
      per-stage terms for fusion. No score map (``None``).

    The network runs in eval mode for fitting and prediction; its ``training`` flags are restored after.
    The image score is float32 on the network's device.

    Args:
        network: the trained segmentation network (or a ``PrototypeOODNet`` wrapping it).
        layers: ``None`` (every encoder stage of a supported network) or dotted module names.
        statistics: a non-empty subset of ``("mean", "std")``, in the order they are concatenated.
        batch_size: images per forward pass during :meth:`fit`.

    Raises:
        ValueError: for unknown layer names or statistics, or a network without known stages and no
            ``layers``.

    Attributes (after ``fit``):
        means_, covariances_: per stage, ``(D_s,)`` and ``(D_s, D_s)`` float64 CPU tensors.
        shrinkages_: per stage Ledoit-Wolf intensities. loc_, scale_: ``(S,)`` float64 CPU tensors, the
        z-scoring constants. reference_: ``"validation"`` or ``"train"``. num_train_: training images.

    Example:
        >>> from monai.networks.nets import UNet
        >>> net = UNet(2, 1, 3, channels=(4, 8, 16), strides=(2, 2))
        >>> items = [{"image": np.random.rand(1, 32, 32).astype("float32")} for _ in range(8)]
        >>> detector = FeatureStatisticsDetector(net).fit(items[:6], items[6:])
        >>> detector.stage_scores(torch.rand(2, 1, 32, 32)).shape
        torch.Size([2, 3])
    """

    name = "feature_statistics"
    requires_fit = True

    def __init__(
        self,
        network: nn.Module,
        layers: Sequence[str] | None = None,
        statistics: Sequence[str] = ("mean", "std"),
        batch_size: int = 8,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(statistics, str) or not statistics:
            raise ValueError(f"statistics must be a non-empty sequence of {STATISTICS}, got {statistics!r}")
        statistics = tuple(look_up_option(s, STATISTICS) for s in statistics)
        if len(set(statistics)) != len(statistics):
            raise ValueError(f"statistics must not repeat, got {statistics!r}")
        super().__init__()
        if isinstance(network, PrototypeOODNet):
            network = network.backbone
        if layers is None:
            layers = encoder_stages(network)
        elif isinstance(layers, str) or not layers:
            raise ValueError(f"layers must be None or a non-empty list of module names, got {layers!r}")
        layers = list(dict.fromkeys(layers))  # drop repeats, keep order
        self._modules = [named_module(network, layer) for layer in layers]
        self.network = network
        self.layers = layers
        self.statistics = statistics
        self.batch_size = batch_size
        self.means_: list[torch.Tensor] | None = None
        self.covariances_: list[torch.Tensor] | None = None
        self.shrinkages_: list[float] | None = None
        self.loc_: torch.Tensor | None = None
        self.scale_: torch.Tensor | None = None
        self.reference_: str | None = None
        self.num_train_: int | None = None
        self._choleskys: list[torch.Tensor] | None = None
        self._device_cache: tuple[torch.device, list[torch.Tensor], list[torch.Tensor]] | None = None

    # -- features ---------------------------------------------------------------------------------------
    def _statistics_of(self, output: torch.Tensor) -> torch.Tensor:
        flat = output.detach().double().flatten(2)  # (B, C, N)
        parts = {"mean": lambda: flat.mean(dim=2), "std": lambda: flat.std(dim=2, correction=0)}
        return torch.cat([parts[s]() for s in self.statistics], dim=1)

    def stage_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per stage the ``(B, D_s)`` float64 statistics vectors of ``images`` ``(B, C, *spatial)``, from
        one forward pass that ends after the last hooked stage.

        Raises:
            RuntimeError: if a hooked stage did not run during the network's forward pass.
        """
        with eval_mode(self.network), torch.no_grad():
            _, captured = capture_features(
                self.network,
                self.layers,
                images.to(module_device(self.network, images.device)),
                run_to_end=False,
                modules=self._modules,
            )
        return [self._statistics_of(captured[name]) for name in self.layers]

    def _collect(self, items: Sequence[dict]) -> list[np.ndarray]:
        per_batch = [
            [v.cpu() for v in self.stage_features(b.float())] for b in batches(items, self.batch_size)
        ]
        return [torch.cat([stages[s] for stages in per_batch]).numpy() for s in range(len(self.layers))]

    # -- fit --------------------------------------------------------------------------------------------
    def _fit(self, train_items: Sequence[dict], val_items: Sequence[dict] | None) -> None:
        if len(train_items) < 2:
            raise ValueError("FeatureStatisticsDetector.fit needs at least 2 training images")
        if val_items is not None and len(val_items) < 2:
            raise ValueError("z-scoring needs at least 2 validation images (or val_items=None)")
        train = self._collect(train_items)
        means, covariances, shrinkages, choleskys = [], [], [], []
        for layer, x in zip(self.layers, train, strict=True):
            if not np.isfinite(x).all():
                raise ValueError(f"the statistics of stage {layer!r} contain NaN or inf")
            gaussian = fit_shrunk_gaussian(x)
            means.append(gaussian.mean)
            covariances.append(gaussian.covariance)
            shrinkages.append(gaussian.shrinkage)
            choleskys.append(gaussian.cholesky)
        self.means_, self.covariances_, self.shrinkages_ = means, covariances, shrinkages
        self._choleskys, self._device_cache = choleskys, None
        self.num_train_ = len(train_items)
        self.loc_ = self.scale_ = None  # not z-scored yet: _distances needs only the Gaussians

        reference = self._collect(val_items) if val_items is not None else train
        distances = self._distances([torch.from_numpy(v) for v in reference]).numpy()  # (N, S)
        loc, scale = distances.mean(axis=0), distances.std(axis=0, ddof=1)
        for layer, value in zip(self.layers, scale, strict=True):
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"the reference distances of stage {layer!r} have no spread (std {value})")
        self.loc_, self.scale_ = torch.from_numpy(loc), torch.from_numpy(scale)
        self.reference_ = "validation" if val_items is not None else "train"

    # -- scoring ----------------------------------------------------------------------------------------
    def _gaussians(self, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self._choleskys is None or self.means_ is None:
            raise NotFittedError("FeatureStatisticsDetector must be fitted first: call .fit(train_items)")
        if self._device_cache is None or self._device_cache[0] != device:
            means = [m.to(device) for m in self.means_]
            self._device_cache = (device, means, [c.to(device) for c in self._choleskys])
        return self._device_cache[1], self._device_cache[2]

    def _distances(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        means, choleskys = self._gaussians(vectors[0].device)
        return torch.stack(
            [mahalanobis_distance(v, m, c) for v, m, c in zip(vectors, means, choleskys, strict=True)], dim=1
        )

    def stage_distances(self, images: torch.Tensor) -> torch.Tensor:
        """Per-stage Mahalanobis distances ``(B, S)`` (float64, network device), stages as in ``layers``."""
        self._gaussians(images.device)  # not-fitted check before the forward pass
        return self._distances(self.stage_features(images))

    def stage_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Per-stage z-scores ``(d_s - loc_s) / scale_s`` ``(B, S)`` (float64); their sum is the score."""
        if self.loc_ is None or self.scale_ is None:
            raise NotFittedError("FeatureStatisticsDetector must be fitted first: call .fit(train_items)")
        distances = self.stage_distances(images)
        return (distances - self.loc_.to(distances.device)) / self.scale_.to(distances.device)

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        return DetectorOutput(self.stage_scores(images).sum(dim=1).float(), None)
