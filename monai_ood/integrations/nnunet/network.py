"""The network nnU-Net trains: its planned U-Net with the prototype head on the bottleneck.

:class:`nnUNetPrototypeOODNet` is a :class:`~monai_ood.networks.PrototypeOODNet` around the network
nnU-Net builds from its plans (``PlainConvUNet`` or ``ResidualEncoderUNet`` of
``dynamic_network_architectures``). It keeps what nnU-Net relies on:

* ``forward(x)`` returns exactly the backbone's output (a list of deep-supervision logits while
  ``decoder.deep_supervision`` is on, one logits tensor otherwise), so nnU-Net's predictor, its sliding
  window and its validation run unchanged;
* ``.decoder`` and ``.encoder`` are the backbone's, so ``nnUNetTrainer.set_deep_supervision_enabled``
  (``network.decoder.deep_supervision = ...``) works;
* ``forward(x, outliers, with_ood=True)`` is the whole training pass in one call, so the trainer goes
  through ``self.network(...)`` (and a ``DistributedDataParallel`` wrapper sees the call).

The hooked layer and the default detector's layers come from the backbone registry
(:data:`monai_ood.networks.presets.PRESETS`, entries ``plain_conv_unet`` and ``residual_encoder_unet``:
stages ``encoder.stages.<i>``, the last one the bottleneck).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ...networks.presets import feature_layer_for, preset_of
from ...networks.prototype_net import PrototypeOODNet

__all__ = ["bottleneck_layer", "nnUNetPrototypeOODNet"]


def bottleneck_layer(backbone: nn.Module) -> str:
    """Dotted name of the encoder's last stage (the bottleneck) of nnU-Net's U-Net, from the backbone
    registry (:func:`monai_ood.networks.presets.feature_layer_for`: ``encoder.stages.<last>`` of a
    ``PlainConvUNet`` or ``ResidualEncoderUNet``).

    Raises:
        ValueError: for a network the registry does not know (one line naming the trainer settings).
    """
    if preset_of(backbone) is None:
        raise ValueError(
            f"the backbone registry has no entry for {type(backbone).__name__} (nnU-Net's PlainConvUNet and "
            "ResidualEncoderUNet are registered); set the trainer's ood_layer and ood_detector_layers to "
            "dotted module names, or add the network to monai_ood.networks.presets.PRESETS"
        )
    return feature_layer_for(backbone)


def _stage_channels(backbone: nn.Module, layer: str) -> int | None:
    """Output channels of ``encoder.stages.<i>`` from the encoder's ``output_channels``, if that is the layer."""
    channels = getattr(getattr(backbone, "encoder", None), "output_channels", None)
    prefix = "encoder.stages."
    if channels is None or not layer.startswith(prefix) or not layer[len(prefix) :].isdigit():
        return None
    index = int(layer[len(prefix) :])
    return int(channels[index]) if index < len(channels) else None


class nnUNetPrototypeOODNet(PrototypeOODNet):  # noqa: N801 (nnU-Net's naming)
    """:class:`~monai_ood.networks.PrototypeOODNet` shaped for nnU-Net (see the module docstring).

    Args:
        backbone: the network nnU-Net planned (``get_network_from_plans``).
        num_classes: K prototypes = nnU-Net's ``label_manager.num_segmentation_heads`` (background included).
        layer: dotted module name to hook; ``None`` = the bottleneck, ``encoder.stages.<last>``.
        head_channels: embedding size ``c_g`` (the paper: 256).
        head_act: activation of the projection head (MONAI spec).
        outlier_norm: how batch norms treat outliers (nnU-Net's default instance norm is per sample, so
            this only matters for batch-norm plans); see :class:`~monai_ood.networks.PrototypeOODNet`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        layer: str | None = None,
        head_channels: int = 256,
        head_act="PRELU",
        outlier_norm: str = "running",
    ) -> None:
        layer = bottleneck_layer(backbone) if layer is None else layer
        super().__init__(
            backbone,
            num_classes,
            layer=layer,
            feature_channels=_stage_channels(backbone, layer),
            head_channels=head_channels,
            head_act=head_act,
            outlier_norm=outlier_norm,
        )

    @property
    def decoder(self) -> nn.Module:
        """The backbone's decoder (nnU-Net switches deep supervision through it)."""
        return self.backbone.decoder

    @property
    def encoder(self) -> nn.Module:
        """The backbone's encoder."""
        return self.backbone.encoder

    def forward(self, x: torch.Tensor, outliers: torch.Tensor | None = None, with_ood: bool = False):
        """The backbone's output; with ``outliers`` or ``with_ood``, the training pass.

        Returns:
            ``backbone(x)``, or ``(logits, distances, outlier_distances)`` as in
            :meth:`~monai_ood.networks.PrototypeOODNet.forward_train` (``outlier_distances`` is ``None``
            without outliers).
        """
        if outliers is None and not with_ood:
            return self.backbone(x)
        out = self.forward_train(x, outliers)
        return out.logits, out.distances, out.outlier_distances

    @contextlib.contextmanager
    def recording_features(self) -> Iterator[list[torch.Tensor]]:
        """Record the hooked layer's output of every forward pass run inside the block.

        Lets a caller that runs the network through someone else's code (nnU-Net's validation step)
        get the features of that same pass instead of running the encoder again.

        Yields:
            A list the features are appended to, one tensor per pass.
        """
        layer = dict(self.backbone.named_modules())[self.layer]
        recorded: list[torch.Tensor] = []

        def hook(module, inputs, output):
            recorded.append(output if isinstance(output, torch.Tensor) else output[0])

        handle = layer.register_forward_hook(hook)
        try:
            yield recorded
        finally:
            handle.remove()
