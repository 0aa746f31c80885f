"""Attach the auxiliary prototypical classifier to an existing segmentation network via a forward hook."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .prototypes import MahalanobisPrototypes, ProjectionHead

__all__ = [
    "HookedEncoderNet",
    "PrototypeOODNet",
    "OODOutput",
    "TrainOutput",
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
        image_score: ``||A(x)||_1 / (number of feature pixels)``, ``(B,)``; higher = more OOD.
    """

    distances: torch.Tensor
    score_map: torch.Tensor
    score_map_upsampled: torch.Tensor | None
    image_score: torch.Tensor


@dataclass
class TrainOutput:
    """What one training step needs: logits of the InD batch and distances of InD and outlier batches."""

    logits: torch.Tensor
    distances: torch.Tensor
    outlier_distances: torch.Tensor | None


class _ReachedHookedLayer(Exception):
    """Raised from the hook to end an encoder-only forward pass at the hooked layer."""


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"the hooked layer must output a tensor (or a tuple starting with one), got {type(output)}"
    )


def encode_until(network: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` (a submodule of ``network``) from a forward pass that stops there.

    A temporary forward hook captures the output and raises, so the rest of the network (the decoder)
    never runs; the hook is removed afterwards, even on error.

    Raises:
        RuntimeError: if ``layer`` was not called by ``network``'s forward pass.
    """
    captured: list[torch.Tensor] = []

    def hook(module, inputs, output):
        captured.append(_first_tensor(output))
        raise _ReachedHookedLayer

    handle = layer.register_forward_hook(hook)
    try:
        network(x)
    except _ReachedHookedLayer:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(
            f"{type(layer).__name__} was not called during {type(network).__name__}'s forward pass"
        )
    return captured[0]


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
        modules = dict(backbone.named_modules())
        if self.layer not in modules:
            hint = ", ".join(name for name in list(modules)[1:12])
            raise ValueError(f"backbone has no module named {self.layer!r}; some of its modules: {hint}, ...")
        hooked = modules[self.layer]
        self.spatial_dims = spatial_dims if spatial_dims is not None else infer_spatial_dims(backbone)
        self.feature_channels = (
            feature_channels if feature_channels is not None else infer_feature_channels(hooked)
        )
        self.outlier_norm = look_up_option(outlier_norm, OUTLIER_NORM_MODES)
        self._capturing = False
        self._stop_at_hook = False
        self._captured: torch.Tensor | None = None
        self._hook_handle = hooked.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output) -> None:
        if not self._capturing:
            return
        self._captured = _first_tensor(output)
        if self._stop_at_hook:
            raise _ReachedHookedLayer

    @contextlib.contextmanager
    def _capture(self, stop: bool) -> Iterator[None]:
        self._capturing, self._stop_at_hook, self._captured = True, stop, None
        try:
            yield
        finally:
            self._capturing, self._stop_at_hook = False, False

    def _take_captured(self) -> torch.Tensor:
        features, self._captured = self._captured, None
        if features is None:
            raise RuntimeError(f"the hooked layer {self.layer!r} was not called during the forward pass")
        return features

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != self.spatial_dims + 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)
            raise ValueError(f"expected input (B, C, *{self.spatial_dims} spatial dims), got {shape}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits, exactly as the backbone returns them."""
        return self.backbone(x)

    def forward_capturing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One whole pass: the backbone's output and the hooked layer's features ``f_int(x)``."""
        self._check_input(x)
        with self._capture(stop=False):
            logits = self.backbone(x)
        return logits, self._take_captured()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Run the backbone only up to the hooked layer and return its features ``f_int(x)``."""
        self._check_input(x)
        with self._capture(stop=True):
            try:
                self.backbone(x)
            except _ReachedHookedLayer:
                pass
        return self._take_captured()

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


class PrototypeOODNet(HookedEncoderNet):
    """A segmentation network with the auxiliary prototypical OOD classifier of Cho et al. (2023).

    The backbone is kept exactly as given: the head is attached by a forward hook on the module named
    ``layer`` (e.g. the encoder bottleneck), so the backbone's architecture and state-dict keys do not
    change and a plain pretrained checkpoint loads with ``net.backbone.load_state_dict(...)``. The
    wrapper's own state dict holds ``backbone.*``, ``head.*`` and ``prototypes.*``.

    * ``forward(x)`` returns the backbone's output unchanged (a plain logits tensor), so MONAI inferers,
      bundles and nnU-Net predictors work with it; the hook is inactive and costs nothing.
    * :meth:`forward_with_ood` runs the backbone once and also returns the :class:`OODOutput`.
    * :meth:`ood` and :meth:`encode` run only the encoder up to the hooked layer: the hook raises once it
      has the features, which ends the forward pass generically, even in networks such as MONAI's
      ``UNet`` whose encoder and decoder are nested in one another.
    * :meth:`forward_train` runs the whole network on the InD batch and the encoder only on the outliers
      (paper section 3.2: outliers never reach the decoder or the segmentation loss).

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
    ) -> None:
        super().__init__(backbone, layer, feature_channels, spatial_dims, outlier_norm)
        self.num_classes = num_classes
        self.head = ProjectionHead(self.spatial_dims, self.feature_channels, head_channels, act=head_act)
        self.prototypes = MahalanobisPrototypes(num_classes, head_channels)

    @property
    def num_dims(self) -> int:
        """Embedding size ``c_g``: the chi-square degrees of freedom for the inclusion loss."""
        return self.prototypes.num_dims

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """``D_M`` of the projected features to every prototype: ``(B, K, *feature_spatial)``."""
        return self.prototypes(self.head(features))

    @staticmethod
    def ood_from_distances(distances: torch.Tensor, input_size: Sequence[int] | None = None) -> OODOutput:
        """Score map, upsampled score map and image score from per-class distances ``(B, K, *S)``."""
        score_map = distances.min(dim=1, keepdim=True).values
        upsampled = None
        if input_size is not None:
            mode = "bilinear" if score_map.dim() == 4 else "trilinear"
            upsampled = F.interpolate(score_map, size=tuple(input_size), mode=mode, align_corners=False)
        # ||A||_1 / (number of feature pixels): A >= 0, so this is the mean over the feature grid.
        image_score = score_map.flatten(1).mean(dim=1)
        return OODOutput(distances, score_map, upsampled, image_score)

    def forward_with_ood(self, x: torch.Tensor) -> tuple[torch.Tensor, OODOutput]:
        """One pass of the whole network: ``(logits, OODOutput)``."""
        logits, features = self.forward_capturing(x)
        return logits, self.ood_from_distances(self.distances(features), x.shape[2:])

    def ood(self, x: torch.Tensor) -> OODOutput:
        """OOD outputs only, from an encoder-only pass (the decoder is skipped)."""
        return self.ood_from_distances(self.distances(self.encode(x)), x.shape[2:])

    def forward_train(self, images: torch.Tensor, outliers: torch.Tensor | None = None) -> TrainOutput:
        """The forward passes of one training step (paper Fig. 1).

        Args:
            images: InD batch ``(B, C, *spatial)``; goes through the whole network.
            outliers: auxiliary outliers ``(B_o, C, *spatial_o)`` or ``None``; encoder only.

        Returns:
            :class:`TrainOutput` with ``logits`` ``(B, K_out, *spatial)``, ``distances``
            ``(B, K, *feature_spatial)`` and ``outlier_distances`` ``(B_o, K, *feature_spatial_o)``.
        """
        logits, features = self.forward_capturing(images)
        distances = self.distances(features)
        outlier_distances = None
        if outliers is not None:
            with self._outlier_normalisation():
                outlier_distances = self.distances(self.encode(outliers))
        return TrainOutput(logits, distances, outlier_distances)
