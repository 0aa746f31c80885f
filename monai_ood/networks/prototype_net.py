"""Attach the auxiliary prototypical classifier to an existing segmentation network via a forward hook."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .capture import capture_features, named_module
from .gaussian import fit_shrunk_gaussian, mahalanobis_distance
from .prototypes import MahalanobisPrototypes, ProjectionHead

__all__ = [
    "HookedEncoderNet",
    "PrototypeOODNet",
    "OODOutput",
    "TrainOutput",
    "aggregate_score_map",
    "infer_feature_channels",
    "infer_spatial_dims",
]

OUTLIER_NORM_MODES = ("running", "batch")


@dataclass
class OODOutput:
    """The OOD outputs of :class:`PrototypeOODNet` (paper section 3.1).

    Attributes:
        distances: ``D_M`` to every class prototype, ``(B, K, *feature_spatial)``.
        score_map: ``A(x) = min_k D_M``, ``(B, 1, *feature_spatial)`` (paper eq. 6).
        score_map_upsampled: ``A(x)`` linearly interpolated to the input size, ``(B, 1, *input_spatial)``
            (the paper overlays maps "via bilinear interpolation"); ``None`` if no input size was given.
        image_score: ``||A(x)||_1 / (number of feature pixels)``, ``(B,)``; higher = more OOD. With the
            options of :class:`PrototypeOODNet` beyond the paper: the combination of its terms.
        terms: ``(B, T)`` raw value of every image-score term (:attr:`PrototypeOODNet.term_names`), or
            ``None``.
    """

    distances: torch.Tensor
    score_map: torch.Tensor
    score_map_upsampled: torch.Tensor | None
    image_score: torch.Tensor
    terms: torch.Tensor | None = None


@dataclass
class TrainOutput:
    """What one training step needs: logits of the InD batch and distances of InD and outlier batches
    (main layer; extra scales and the global term when the network has them)."""

    logits: torch.Tensor
    distances: torch.Tensor
    outlier_distances: torch.Tensor | None
    extra_distances: list[torch.Tensor] = field(default_factory=list)
    outlier_extra_distances: list[torch.Tensor] = field(default_factory=list)
    global_distances: torch.Tensor | None = None
    outlier_global_distances: torch.Tensor | None = None


def infer_feature_channels(module: nn.Module) -> int:
    """Guess the channel count a module outputs from its last convolution or normalisation layer.

    Raises:
        ValueError: when no such layer exists; pass ``feature_channels`` explicitly then.
    """
    for sub in reversed(list(module.modules())):
        if isinstance(sub, nn.modules.conv._ConvNd):
            return sub.out_channels
        if isinstance(sub, (nn.modules.batchnorm._NormBase, nn.modules.instancenorm._InstanceNorm)):
            if sub.num_features:
                return sub.num_features
        if isinstance(sub, nn.GroupNorm):
            return sub.num_channels
    raise ValueError(
        f"cannot infer the output channels of {type(module).__name__}: pass feature_channels=... explicitly"
    )


def infer_spatial_dims(module: nn.Module) -> int:
    """Return 2 or 3 from the first 2D/3D convolution inside ``module``."""
    for sub in module.modules():
        if isinstance(sub, (nn.Conv2d, nn.ConvTranspose2d)):
            return 2
        if isinstance(sub, (nn.Conv3d, nn.ConvTranspose3d)):
            return 3
    raise ValueError(
        f"cannot infer spatial_dims of {type(module).__name__}: pass spatial_dims=2 or 3 explicitly"
    )


class HookedEncoderNet(nn.Module):
    """A segmentation network with a forward hook on one named encoder layer: the machinery every
    auxiliary OOD head shares (:class:`PrototypeOODNet`, :class:`monai_ood.detectors.fcdd.FCDDNet`).

    The backbone is kept exactly as given (architecture and state-dict keys unchanged, so a plain
    checkpoint loads with ``net.backbone.load_state_dict(...)``); ``forward(x)`` returns its output; the
    hook is inactive unless a method asks for the features. :meth:`encode` ends the forward pass at the
    hooked layer (the hook raises), which works even where encoder and decoder are nested (MONAI's UNet).
    :meth:`_outlier_normalisation` sets how batch norms see outliers (``outlier_norm``, see
    :class:`PrototypeOODNet`). Subclasses add a head on the captured features.

    Args:
        backbone: any segmentation network returning logits.
        layer: dotted module name to hook; ``"auto"`` = the encoder bottleneck of a supported network.
        feature_channels: channels of the hooked layer's output; inferred when ``None``.
        spatial_dims: 2 or 3; inferred from the backbone's convolutions when ``None``.
        outlier_norm: ``"running"`` or ``"batch"``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layer: str = "auto",
        feature_channels: int | None = None,
        spatial_dims: int | None = None,
        outlier_norm: str = "running",
    ) -> None:
        super().__init__()
        from monai.utils import look_up_option

        from .presets import feature_layer_for  # deferred: presets imports this module

        self.backbone = backbone
        self.layer = feature_layer_for(backbone) if layer == "auto" else layer
        hooked = named_module(backbone, self.layer, "backbone")
        self.spatial_dims = spatial_dims if spatial_dims is not None else infer_spatial_dims(backbone)
        self.feature_channels = (
            feature_channels if feature_channels is not None else infer_feature_channels(hooked)
        )
        self.outlier_norm = look_up_option(outlier_norm, OUTLIER_NORM_MODES)

    def _capture_layers(self) -> list[str]:
        """The backbone layers a pass reads, in the order they run: the main layer last."""
        return [self.layer]

    def _capture(self, x: torch.Tensor, run_to_end: bool) -> tuple[Any, dict[str, torch.Tensor]]:
        """One pass of the backbone (whole, or up to the main layer) with :func:`capture_features`."""
        self._check_input(x)
        layers = self._capture_layers()
        output, captured = capture_features(self.backbone, layers, x, run_to_end, whole_output=True)
        if list(captured)[-1] != self.layer:
            raise RuntimeError(
                f"extra_layers {[n for n in captured if n != self.layer]} ran after the main layer "
                f"{self.layer!r}: extra layers must be shallower than the main one"
            )
        return output, captured

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != self.spatial_dims + 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)
            raise ValueError(f"expected input (B, C, *{self.spatial_dims} spatial dims), got {shape}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits, exactly as the backbone returns them."""
        return self.backbone(x)

    def forward_capturing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One whole pass: the backbone's output and the hooked layer's features ``f_int(x)``."""
        logits, captured = self._capture(x, run_to_end=True)
        return logits, captured[self.layer]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Run the backbone only up to the hooked layer and return its features ``f_int(x)``."""
        return self._capture(x, run_to_end=False)[1][self.layer]

    @contextlib.contextmanager
    def _outlier_normalisation(self) -> Iterator[None]:
        batch_norms = [m for m in self.backbone.modules() if isinstance(m, _BatchNorm)]
        saved = [(m.training, m.momentum) for m in batch_norms]
        try:
            for m in batch_norms:
                if self.outlier_norm == "running":
                    m.eval()
                else:  # batch statistics for normalising, but momentum 0 leaves the running ones unchanged
                    m.momentum = 0.0
            yield
        finally:
            for m, (training, momentum) in zip(batch_norms, saved, strict=True):
                m.train(training)
                m.momentum = momentum


AGGREGATIONS = ("mean", "quantile", "foreground")


def aggregate_score_map(
    score_map: torch.Tensor,
    aggregation: str = "mean",
    quantile: float = 0.9,
    foreground: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image scores ``(B,)`` from a score map ``(B, 1, *S)``.

    * ``"mean"``: ``||A(x)||_1 / (number of cells)``, the paper's score (A >= 0).
    * ``"quantile"``: the ``quantile`` of A over the grid (upper quantiles: a small anomaly counts).
    * ``"foreground"``: the mean of A over ``foreground`` (a ``(B, 1, *S)`` mask, e.g. the predicted
      foreground on the feature grid); where an image has no foreground cell, its maximum of A
      (predicting nothing at all is itself a sign of an unfamiliar input).
    """
    flat = score_map.flatten(1)
    if aggregation == "mean":
        return flat.mean(dim=1)
    if aggregation == "quantile":
        return torch.quantile(flat.float(), quantile, dim=1).to(flat.dtype)
    if aggregation == "foreground":
        if foreground is None:
            raise ValueError("aggregation='foreground' needs the predicted foreground mask")
        mask = foreground.flatten(1).to(flat.dtype)
        count = mask.sum(dim=1)
        mean = (flat * mask).sum(dim=1) / count.clamp_min(1.0)
        return torch.where(count > 0, mean, flat.max(dim=1).values)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


class PrototypeOODNet(HookedEncoderNet):
    """A segmentation network with the auxiliary prototypical OOD classifier of Cho et al. (2023).

    The backbone is kept exactly as given: the head is attached by a forward hook on the module named
    ``layer`` (e.g. the encoder bottleneck), so the backbone's architecture and state-dict keys do not
    change and a plain pretrained checkpoint loads with ``net.backbone.load_state_dict(...)``. The
    wrapper's own state dict holds ``backbone.*``, ``head.*`` and ``prototypes.*`` (plus the optional
    terms below).

    * ``forward(x)`` returns the backbone's output unchanged (a plain logits tensor), so MONAI inferers,
      bundles and nnU-Net predictors work with it; the hook is inactive and costs nothing.
    * :meth:`forward_with_ood` runs the backbone once and also returns the :class:`OODOutput`.
    * :meth:`ood` and :meth:`encode` run only the encoder up to the hooked layer: the hook raises once it
      has the features, which ends the forward pass generically, even in networks such as MONAI's
      ``UNet`` whose encoder and decoder are nested in one another (``aggregation="foreground"`` needs the
      predicted segmentation, so :meth:`ood` then runs the whole network once).
    * :meth:`forward_train` runs the whole network on the InD batch and the encoder only on the outliers
      (paper section 3.2: outliers never reach the decoder or the segmentation loss).

    Beyond the paper (all off by default, so the defaults are the paper's head):

    * ``extra_layers``: more (shallower) encoder layers, each with its own projection head and
      prototypes (multi-scale heads). Their maps are fused at the finest grid (sum of ``A_s / c_g``,
      in units of the chi-square mean) and each scale is one term of the image score.
    * ``global_head``: an image-level prototype on the bottleneck features pooled to a
      ``global_grid``-per-axis grid (layout survives the pooling), projected to ``c_g`` by a linear
      layer; its Mahalanobis distance is one more term (viewpoint and layout are whole-image properties).
    * ``gaussian_term``: a post-hoc single Gaussian (Ledoit-Wolf) on globally pooled bottleneck
      features, fitted by :meth:`refit` (the hybrid with Gonzalez et al.'s Mahalanobis score).
    * ``aggregation``: image score of each local term as the paper's mean, an upper ``quantile`` or the
      mean over the predicted foreground.

    With more than one term, the image score is ``log sum_t H_t``, the log of the sum of per-term Weibull
    cumulative hazards ``H_t = (s_t / scale_t) ** shape_t = -log(1 - F_t(s_t))`` (``sum_t H_t`` is ``-log``
    of the product of the per-term survival probabilities; the log keeps it finite in float32);
    :meth:`fit_score_combination` fits ``F_t`` on validation images (until then ``scale_t`` is the term's
    chi-square mean ``c_g`` and ``shape_t = 1``). With one term the image score
    is that term itself (the paper's ``||A(x)||_1`` for the defaults).

    Normalisation layers and outliers: instance, group and layer norms are per-sample, so outliers and
    InD images never influence each other. Batch norms are handled by ``outlier_norm``: ``"running"``
    (default) switches them to eval mode for the outlier pass, so outliers are normalised with the InD
    running statistics exactly as they would be at test time and never update them; ``"batch"``
    normalises the outlier batch with its own statistics but still leaves the running statistics
    untouched.

    Args:
        backbone: any segmentation network returning logits.
        num_classes: K, the number of classes (prototypes), including background.
        layer: dotted name of the module to hook, as in ``backbone.named_modules()``;
            ``"auto"`` picks the bottleneck for the networks known to :mod:`monai_ood.networks.presets`.
        feature_channels: channels of the hooked layer's output; inferred when ``None``.
        head_channels: embedding size ``c_g`` (the paper: 256).
        head_act: activation of the projection head (MONAI spec).
        spatial_dims: 2 or 3; inferred from the backbone's convolutions when ``None``.
        outlier_norm: ``"running"`` or ``"batch"`` (see above).
        extra_layers: dotted names of shallower layers for multi-scale heads (run before ``layer``), or a
            number ``n``: the ``n`` deepest encoder stages finer than ``layer`` (supported networks).
        global_head: add the image-level prototype term.
        global_grid: pooling grid per axis of the global term.
        gaussian_term: add the post-hoc Gaussian term (fitted by :meth:`refit`).
        aggregation: ``"mean"`` (paper), ``"quantile"`` or ``"foreground"``.
        quantile: the quantile for ``aggregation="quantile"``.

    Example:
        >>> from monai.networks.nets import UNet
        >>> unet = UNet(2, 1, 4, channels=(8, 16, 32), strides=(2, 2))
        >>> net = PrototypeOODNet(unet, num_classes=4, head_channels=16)
        >>> logits, ood = net.forward_with_ood(torch.rand(2, 1, 32, 32))
        >>> logits.shape, ood.score_map.shape, ood.image_score.shape
        (torch.Size([2, 4, 32, 32]), torch.Size([2, 1, 8, 8]), torch.Size([2]))
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        layer: str = "auto",
        feature_channels: int | None = None,
        head_channels: int = 256,
        head_act="PRELU",
        spatial_dims: int | None = None,
        outlier_norm: str = "running",
        extra_layers: Sequence[str] | int = (),
        global_head: bool = False,
        global_grid: int = 2,
        gaussian_term: bool = False,
        aggregation: str = "mean",
        quantile: float = 0.9,
    ) -> None:
        super().__init__(backbone, layer, feature_channels, spatial_dims, outlier_norm)
        from monai.utils import look_up_option

        self.num_classes = num_classes
        self.head = ProjectionHead(self.spatial_dims, self.feature_channels, head_channels, act=head_act)
        self.prototypes = MahalanobisPrototypes(num_classes, head_channels)
        self.aggregation = look_up_option(aggregation, AGGREGATIONS)
        if not 0.0 < float(quantile) <= 1.0:
            raise ValueError(f"quantile must lie in (0, 1], got {quantile!r}")
        self.quantile = float(quantile)

        if isinstance(extra_layers, str):
            extra_layers = (extra_layers,)
        elif isinstance(extra_layers, int):
            from .presets import multiscale_layers

            extra_layers = multiscale_layers(backbone, extra_layers, self.layer) if extra_layers else ()
        self.extra_layers = tuple(extra_layers)
        modules = dict(backbone.named_modules())
        for name in self.extra_layers:
            if name not in modules or name == self.layer:
                raise ValueError(f"extra_layers: backbone has no module {name!r} other than the main layer")
        self.extra_heads = nn.ModuleList(
            ProjectionHead(self.spatial_dims, infer_feature_channels(modules[n]), head_channels, act=head_act)
            for n in self.extra_layers
        )
        self.extra_prototypes = nn.ModuleList(
            MahalanobisPrototypes(num_classes, head_channels) for _ in self.extra_layers
        )

        self.global_grid = int(global_grid)
        self.global_projection = None
        self.global_prototype = None
        if global_head:
            pooled = self.feature_channels * self.global_grid**self.spatial_dims
            self.global_projection = nn.Sequential(
                nn.Linear(pooled, head_channels), nn.PReLU(), nn.Linear(head_channels, head_channels)
            )
            self.global_prototype = MahalanobisPrototypes(1, head_channels)
        self.gaussian_term = bool(gaussian_term)
        if self.gaussian_term:
            self.register_buffer("gaussian_mean", torch.zeros(self.feature_channels, dtype=torch.float64))
            self.register_buffer("gaussian_cholesky", torch.eye(self.feature_channels, dtype=torch.float64))
            self.register_buffer("gaussian_fitted", torch.tensor(False))
        # (shape, scale) of the per-term Weibull hazards; defaults: shape 1, scale = chi-square mean
        defaults = [[1.0, float(head_channels)]] * (1 + len(self.extra_layers) + bool(global_head))
        if self.gaussian_term:
            defaults.append([1.0, float(self.feature_channels) ** 0.5])
        # only with several terms: the paper's head keeps exactly its state-dict keys
        weibull = torch.tensor(defaults, dtype=torch.float64) if len(defaults) > 1 else None
        self.register_buffer("term_weibull", weibull)

    # -- capture --------------------------------------------------------------------------------------
    def _capture_layers(self) -> list[str]:
        return [*self.extra_layers, self.layer]

    def _passes(self, x: torch.Tensor, run_to_end: bool) -> tuple[Any, torch.Tensor, list[torch.Tensor]]:
        """``(logits or None, main features, extra layers' features)`` from one pass."""
        logits, captured = self._capture(x, run_to_end)
        return logits, captured[self.layer], [captured[n] for n in self.extra_layers]

    # -- terms ------------------------------------------------------------------------------------------
    @property
    def num_dims(self) -> int:
        """Embedding size ``c_g``: the chi-square degrees of freedom for the inclusion loss."""
        return self.prototypes.num_dims

    @property
    def term_names(self) -> list[str]:
        """Names of the image-score terms, in the order of ``term_weibull``."""
        names = [f"local:{self.layer}"] + [f"local:{n}" for n in self.extra_layers]
        if self.global_prototype is not None:
            names.append("global")
        if self.gaussian_term:
            names.append("gaussian")
        return names

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """``D_M`` of the projected features to every prototype: ``(B, K, *feature_spatial)``."""
        return self.prototypes(self.head(features))

    def scale_distances(
        self, features: torch.Tensor, extra_features: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Per-class distances of every local scale, main layer first."""
        out = [self.distances(features)]
        for head, prototypes, f in zip(self.extra_heads, self.extra_prototypes, extra_features, strict=True):
            out.append(prototypes(head(f)))
        return out

    def global_embedding(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, c_g)`` image embedding of the global term."""
        pool = F.adaptive_avg_pool2d if features.dim() == 4 else F.adaptive_avg_pool3d
        return self.global_projection(pool(features, self.global_grid).flatten(1))

    def global_distances(self, features: torch.Tensor) -> torch.Tensor | None:
        """``(B, 1, 1)`` distance of the global embedding to the image prototype, or ``None``."""
        if self.global_prototype is None:
            return None
        return self.global_prototype(self.global_embedding(features).unsqueeze(-1))

    def gaussian_distance(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance ``(B,)`` of globally pooled features to the fitted Gaussian (float64)."""
        if not bool(self.gaussian_fitted):
            raise RuntimeError("the Gaussian term is not fitted: call net.refit(train_batches) first")
        return mahalanobis_distance(
            features.flatten(2).mean(dim=2), self.gaussian_mean, self.gaussian_cholesky
        )

    def _foreground_on(self, logits: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor | None:
        if logits is None or self.aggregation != "foreground":
            return None
        foreground = (logits.argmax(dim=1, keepdim=True) > 0).float()
        return (F.adaptive_avg_pool2d if foreground.dim() == 4 else F.adaptive_avg_pool3d)(
            foreground, tuple(size)
        ) > 0.5

    def term_scores(
        self,
        scale_distances: Sequence[torch.Tensor],
        features: torch.Tensor,
        logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, T)`` raw image-level values of every term (see :attr:`term_names`)."""
        columns = []
        for d in scale_distances:
            score_map = d.min(dim=1, keepdim=True).values
            mask = self._foreground_on(logits, score_map.shape[2:])
            columns.append(aggregate_score_map(score_map, self.aggregation, self.quantile, mask))
        global_d = self.global_distances(features)
        if global_d is not None:
            columns.append(global_d.flatten(1)[:, 0])
        if self.gaussian_term:
            columns.append(self.gaussian_distance(features).to(columns[0].dtype))
        return torch.stack(columns, dim=1)

    def combine_terms(self, terms: torch.Tensor) -> torch.Tensor:
        """Image scores ``(B,)``: the one term itself, or the log of the sum of the terms' Weibull hazards."""
        if terms.shape[1] == 1:
            return terms[:, 0]
        shape, scale = self.term_weibull[:, 0], self.term_weibull[:, 1]
        # log H_t = k_t log(s_t / scale_t); log sum_t H_t by log-sum-exp, finite for any shape k_t
        log_hazards = shape * (terms.double().clamp_min(1e-30) / scale).log()
        return torch.logsumexp(log_hazards, dim=1).to(terms.dtype)

    def fused_score_map(self, scale_distances: Sequence[torch.Tensor]) -> torch.Tensor:
        """``A(x)`` for one scale; for several, ``sum_s A_s / c_g`` on the finest scale's grid."""
        maps = [d.min(dim=1, keepdim=True).values for d in scale_distances]
        if len(maps) == 1:
            return maps[0]
        finest = max((m.shape[2:] for m in maps), key=lambda s: torch.Size(s).numel())
        return sum(_resize(m, finest) for m in maps) / float(self.num_dims)

    def _ood_output(
        self,
        x: torch.Tensor,
        features: torch.Tensor,
        extra: Sequence[torch.Tensor],
        logits: torch.Tensor | None,
    ) -> OODOutput:
        scale_distances = self.scale_distances(features, extra)
        score_map = self.fused_score_map(scale_distances)
        upsampled = _resize(score_map, x.shape[2:])
        terms = self.term_scores(scale_distances, features, logits)
        return OODOutput(scale_distances[0], score_map, upsampled, self.combine_terms(terms), terms)

    # -- passes -----------------------------------------------------------------------------------------
    def forward_with_ood(self, x: torch.Tensor) -> tuple[torch.Tensor, OODOutput]:
        """One pass of the whole network: ``(logits, OODOutput)``."""
        logits, features, extra = self._passes(x, run_to_end=True)
        return logits, self._ood_output(x, features, extra, logits)

    def ood(self, x: torch.Tensor) -> OODOutput:
        """OOD outputs only, from an encoder-only pass (the decoder is skipped unless the aggregation
        needs the predicted foreground)."""
        if self.aggregation == "foreground":
            return self.forward_with_ood(x)[1]
        _, features, extra = self._passes(x, run_to_end=False)
        return self._ood_output(x, features, extra, None)

    def forward_train(self, images: torch.Tensor, outliers: torch.Tensor | None = None) -> TrainOutput:
        """The forward passes of one training step (paper Fig. 1).

        Args:
            images: InD batch ``(B, C, *spatial)``; goes through the whole network.
            outliers: auxiliary outliers ``(B_o, C, *spatial_o)`` or ``None``; encoder only.

        Returns:
            :class:`TrainOutput` with ``logits`` ``(B, K_out, *spatial)``, ``distances``
            ``(B, K, *feature_spatial)`` and ``outlier_distances`` ``(B_o, K, *feature_spatial_o)`` of the
            main layer, plus the extra scales' and the global term's distances when configured.
        """
        logits, features, extra = self._passes(images, run_to_end=True)
        scales = self.scale_distances(features, extra)
        out = TrainOutput(logits, scales[0], None, scales[1:], None, self.global_distances(features), None)
        if outliers is not None:
            with self._outlier_normalisation():
                _, outlier_features, outlier_extra = self._passes(outliers, run_to_end=False)
                outlier_scales = self.scale_distances(outlier_features, outlier_extra)
                out.outlier_distances = outlier_scales[0]
                out.outlier_extra_distances = outlier_scales[1:]
                out.outlier_global_distances = self.global_distances(outlier_features)
        return out

    # -- post-hoc fitting -------------------------------------------------------------------------------
    @torch.no_grad()
    def refit(self, batches, prototypes: bool = True, min_variance: float = 1e-4) -> PrototypeOODNet:
        """Re-estimate the prototypes from training features and fit the Gaussian term.

        Args:
            batches: iterable of ``(images, labels)`` tensors of InD training images (labels
                ``(B, 1, *spatial)`` class indices, brought to each feature grid by majority vote).
            prototypes: re-estimate every local prototype (class-conditional mean and diagonal variance
                of the projected features) and the global one; ``False`` fits only the Gaussian term.
            min_variance: floor of the re-estimated variances.
        """
        from .feature_grid import labels_to_feature_grid

        was_training = self.training
        self.eval()
        device = self.prototypes.means.device
        num_scales = 1 + len(self.extra_layers)
        sums = torch.zeros(num_scales, self.num_classes, self.num_dims, dtype=torch.float64)
        squares = torch.zeros_like(sums)
        counts = torch.zeros(num_scales, self.num_classes, dtype=torch.float64)
        global_embeddings, pooled = [], []
        heads = [self.head, *self.extra_heads]
        for images, labels in batches:
            _, features, extra = self._passes(images.to(device), run_to_end=False)
            for s, (head, f) in enumerate(zip(heads, [features, *extra], strict=True)):
                v = head(f).double()
                grid = labels_to_feature_grid(labels.to(device), self.num_classes, v.shape[2:])
                one_hot = F.one_hot(grid.flatten(1), self.num_classes).double()  # (B, S, K)
                flat = v.flatten(2)  # (B, C, S)
                sums[s] += torch.einsum("bsk,bcs->kc", one_hot, flat).cpu()
                squares[s] += torch.einsum("bsk,bcs->kc", one_hot, flat * flat).cpu()
                counts[s] += one_hot.sum(dim=(0, 1)).cpu()
            if self.global_prototype is not None:
                global_embeddings.append(self.global_embedding(features).double().cpu())
            pooled.append(features.flatten(2).mean(dim=2).double().cpu())
        if not pooled:
            raise ValueError("refit needs at least one batch of training images")
        if prototypes:
            for s, protos in enumerate([self.prototypes, *self.extra_prototypes]):
                present = counts[s] > 0
                mean = sums[s] / counts[s].clamp_min(1)[:, None]
                var = (squares[s] / counts[s].clamp_min(1)[:, None] - mean * mean).clamp_min(min_variance)
                protos.means.data[present] = mean[present].to(protos.means)
                protos.log_variances.data[present] = var[present].log().to(protos.log_variances)
            if global_embeddings:
                g = torch.cat(global_embeddings)
                self.global_prototype.means.data[0] = g.mean(0).to(self.global_prototype.means)
                var = g.var(0, unbiased=False).clamp_min(min_variance)
                self.global_prototype.log_variances.data[0] = var.log().to(
                    self.global_prototype.log_variances
                )
        if self.gaussian_term:
            x = torch.cat(pooled)
            if len(x) < 2 or not torch.isfinite(x).all():
                raise ValueError("the Gaussian term needs >= 2 training images with finite features")
            gaussian = fit_shrunk_gaussian(x.numpy())
            self.gaussian_mean.copy_(gaussian.mean.to(self.gaussian_mean))
            self.gaussian_cholesky.copy_(gaussian.cholesky.to(self.gaussian_cholesky))
            self.gaussian_fitted.fill_(True)
        self.train(was_training)
        return self

    @torch.no_grad()
    def fit_score_combination(self, images_batches) -> torch.Tensor:
        """Fit the per-term Weibull hazards on InD validation images; returns the terms ``(N, T)``."""
        from ..calibration.weibull import WeibullCalibrator  # deferred: keep networks free of scipy

        was_training = self.training
        self.eval()
        device = self.prototypes.means.device
        terms = []
        for images in images_batches:
            terms.append(self.ood(images.to(device)).terms.double().cpu())
        self.train(was_training)
        terms = torch.cat(terms)
        if self.term_weibull is None:
            return terms  # one term: its own value is the image score, nothing to combine
        for t in range(terms.shape[1]):
            weibull = WeibullCalibrator(min_samples=2).fit(terms[:, t].numpy())
            self.term_weibull[t, 0], self.term_weibull[t, 1] = weibull.shape, weibull.scale
        return terms
