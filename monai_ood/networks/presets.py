"""Presets: which layer of each supported network carries the OOD head, and default networks to wrap.

The head goes on the encoder output (the bottleneck), as in the paper (section 4.1: "output features of
the encoder as f_int"), at 1/16 of the input resolution for the default configurations below.

| preset       | network                                   | hooked layer                      |
|--------------|-------------------------------------------|-----------------------------------|
| ``unet``     | :class:`monai.networks.nets.UNet`         | innermost ``...submodule`` (bottom) |
| ``basic_unet`` | :class:`monai.networks.nets.BasicUNet`  | ``down_4``                        |
| ``dynunet``  | :class:`monai.networks.nets.DynUNet`      | ``bottleneck``                    |
| ``segresnet``| :class:`monai.networks.nets.SegResNet`    | ``down_layers.<last>``            |
| ``deeplabv3``| :class:`monai_ood.networks.DeepLabV3`     | ``backbone.layer4`` (2048 channels) |
| ``swinunetr``| :class:`monai.networks.nets.SwinUNETR`    | ``encoder10``                     |
| ``plain_conv_unet`` | nnU-Net's ``PlainConvUNet``        | ``encoder.stages.<last>``         |
| ``residual_encoder_unet`` | nnU-Net's ``ResidualEncoderUNet`` | ``encoder.stages.<last>``     |

The last two are the U-Nets nnU-Net v2 plans (``dynamic_network_architectures``, installed with the
``nnunet`` extra); their encoder stages are ``encoder.stages.<i>``. They are resolved lazily: without that
package nothing is imported, no network is taken for one, and building one fails with a line that names
the extra.

Each entry of :data:`PRESETS` also lists the network's encoder stages (the default detector's layers):
a new backbone is one entry here, with the test of ``tests/networks/test_presets.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet
from monai.utils import OptionalImportError, look_up_option, optional_import
from torch import nn

from .prototype_net import PrototypeOODNet

__all__ = [
    "PRESETS",
    "Preset",
    "create_prototype_network",
    "encoder_stages",
    "feature_layer_for",
    "multiscale_layers",
    "preset_of",
]


def _unet_bottom(net: UNet) -> str:
    # MONAI's UNet nests each level as Sequential(down, SkipConnection(submodule), up): follow the chain.
    name, module = "model", net.model
    while isinstance(module, nn.Sequential) and len(module) == 3 and hasattr(module[1], "submodule"):
        name, module = f"{name}.1.submodule", module[1].submodule
    return name


def _segresnet_last_down(net: SegResNet) -> str:
    return f"down_layers.{len(net.down_layers) - 1}"


def _deeplabv3_layer(net: nn.Module) -> str:
    from .deeplabv3 import DEEPLABV3_FEATURE_LAYER

    return DEEPLABV3_FEATURE_LAYER


def _build_unet(spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> UNet:
    kwargs = {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2, **kwargs}
    return UNet(spatial_dims, in_channels, out_channels, **kwargs)


def _build_basic_unet(spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> BasicUNet:
    return BasicUNet(spatial_dims, in_channels, out_channels, **kwargs)


def _build_dynunet(spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> DynUNet:
    kwargs = {
        "kernel_size": [3] * 5,
        "strides": [1, 2, 2, 2, 2],
        "upsample_kernel_size": [2] * 4,
        "filters": [16, 32, 64, 128, 256],
        **kwargs,
    }
    return DynUNet(spatial_dims, in_channels, out_channels, **kwargs)


def _build_segresnet(spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> SegResNet:
    kwargs = {"init_filters": 16, "blocks_down": (1, 2, 2, 4, 4), "blocks_up": (1, 1, 1, 1), **kwargs}
    return SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)


def _build_swinunetr(spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    kwargs = {"feature_size": 24, **kwargs}
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, spatial_dims=spatial_dims, **kwargs)


def _swinunetr_type() -> type:
    from monai.networks.nets import SwinUNETR

    return SwinUNETR


def _build_deeplabv3(spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    from .deeplabv3 import DeepLabV3

    return DeepLabV3(spatial_dims, in_channels, out_channels, **kwargs)


_DNA_UNETS = "dynamic_network_architectures.architectures.unet"
_DNA_MISSING = (
    "{name} comes from dynamic_network_architectures (nnU-Net v2), which is not installed: "
    'pip install "monai-ood[nnunet]"'
)


class _NotInstalled:
    """Stands for a network class whose package is missing: nothing is an instance of it."""


def _dna_type(name: str) -> type:
    """nnU-Net's U-Net class ``name``, or :class:`_NotInstalled` without ``dynamic_network_architectures``."""
    network_type, found = optional_import(_DNA_UNETS, name=name)
    return network_type if found else _NotInstalled


def _dna_build(name: str) -> Callable[..., nn.Module]:
    """A builder of nnU-Net's ``name`` U-Net (``PlainConvUNet`` or ``ResidualEncoderUNet``) in a default
    configuration of nnU-Net's plans (5 stages, 32 to 320 features, instance norm, leaky ReLU, no deep
    supervision); ``kwargs`` override its constructor arguments (``n_conv_per_stage`` of the plain U-Net
    is ``n_blocks_per_stage`` of the residual one)."""
    blocks = "n_conv_per_stage" if name == "PlainConvUNet" else "n_blocks_per_stage"

    def build(spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
        network_type, found = optional_import(_DNA_UNETS, name=name)
        if not found:
            raise OptionalImportError(_DNA_MISSING.format(name=name))
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        n_stages = int(kwargs.pop("n_stages", 5))
        defaults = {
            "features_per_stage": [min(32 * 2**i, 320) for i in range(n_stages)],
            "conv_op": nn.Conv3d if spatial_dims == 3 else nn.Conv2d,
            "kernel_sizes": 3,
            "strides": [1] + [2] * (n_stages - 1),
            blocks: 2,
            "n_conv_per_stage_decoder": 2,
            "conv_bias": True,
            "norm_op": nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d,
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "nonlin": nn.LeakyReLU,
            "nonlin_kwargs": {"inplace": True},
            "deep_supervision": False,
        }
        return network_type(
            input_channels=in_channels,
            n_stages=n_stages,
            num_classes=out_channels,
            **{**defaults, **kwargs},
        )

    return build


def _dna_stages(net: nn.Module) -> list[str]:
    return [f"encoder.stages.{i}" for i in range(len(net.encoder.stages))]


@dataclass(frozen=True)
class Preset:
    """A supported network, in one entry: how to build its default configuration, its encoder stages
    (shallow to deep, up to the bottleneck: the layers the default detector reads) and where its
    encoder output is (the layer the prototype head hooks)."""

    network_type: type | None
    build: Callable[..., nn.Module]
    feature_layer: Callable[[nn.Module], str]
    stages: Callable[[nn.Module], list[str]]


def _deeplabv3_type() -> type:
    from .deeplabv3 import DeepLabV3

    return DeepLabV3


def _unet_downs(net: UNet) -> list[str]:
    names, name, module = [], "model", net.model
    while isinstance(module, nn.Sequential) and len(module) == 3 and hasattr(module[1], "submodule"):
        names.append(f"{name}.0")
        name, module = f"{name}.1.submodule", module[1].submodule
    return names


PRESETS: dict[str, Preset] = {
    "unet": Preset(UNet, _build_unet, _unet_bottom, lambda net: [*_unet_downs(net), _unet_bottom(net)]),
    "basic_unet": Preset(
        BasicUNet,
        _build_basic_unet,
        lambda net: "down_4",
        lambda net: ["conv_0", "down_1", "down_2", "down_3", "down_4"],
    ),
    "dynunet": Preset(
        DynUNet,
        _build_dynunet,
        lambda net: "bottleneck",
        lambda net: ["input_block", *(f"downsamples.{i}" for i in range(len(net.downsamples))), "bottleneck"],
    ),
    "segresnet": Preset(
        SegResNet,
        _build_segresnet,
        _segresnet_last_down,
        lambda net: [f"down_layers.{i}" for i in range(len(net.down_layers))],
    ),
    # DeepLabV3 is resolved lazily so that importing the presets does not build the ResNet module.
    "deeplabv3": Preset(
        None,
        _build_deeplabv3,
        _deeplabv3_layer,
        lambda net: ["backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4"],
    ),
    # SwinUNETR: the convolutional encoder blocks on the transformer's hidden states; input sides must
    # be multiples of 32
    "swinunetr": Preset(
        None,
        _build_swinunetr,
        lambda net: "encoder10",
        lambda net: ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10"],
    ),
    # nnU-Net v2's U-Nets (optional package, resolved lazily); the stem of the residual one is not a stage
    "plain_conv_unet": Preset(
        None, _dna_build("PlainConvUNet"), lambda net: _dna_stages(net)[-1], _dna_stages
    ),
    "residual_encoder_unet": Preset(
        None, _dna_build("ResidualEncoderUNet"), lambda net: _dna_stages(net)[-1], _dna_stages
    ),
}
_LAZY_TYPES = {
    "deeplabv3": _deeplabv3_type,
    "swinunetr": _swinunetr_type,
    "plain_conv_unet": lambda: _dna_type("PlainConvUNet"),
    "residual_encoder_unet": lambda: _dna_type("ResidualEncoderUNet"),
}


def preset_of(network: nn.Module) -> Preset | None:
    """The registry entry whose network type ``network`` is, or ``None``."""
    for key, preset in PRESETS.items():
        if isinstance(network, preset.network_type or _LAZY_TYPES[key]()):
            return preset
    return None


def encoder_stages(network: nn.Module) -> list[str]:
    """Names of the encoder stages of a supported network, shallow to deep, up to the bottleneck."""
    preset = preset_of(network)
    if preset is None:
        raise ValueError(
            f"no preset lists the encoder stages of {type(network).__name__}: pass layer names "
            f"(presets exist for: {', '.join(PRESETS)})"
        )
    return preset.stages(network)


@torch.no_grad()
def multiscale_layers(
    network: nn.Module, count: int, main_layer: str | None = None, probe_size: int = 64
) -> list[str]:
    """Up to ``count`` of the deepest encoder stages whose resolution is finer than the main layer's (one
    per resolution, the last stage at each), shallow to deep: the layers of multi-scale heads (a shallow
    network may have fewer).

    Resolutions are read from one forward pass of a ``probe_size``-sided zero image (eval mode).
    """
    stages = encoder_stages(network)
    main_layer = main_layer or feature_layer_for(network)
    modules = dict(network.named_modules())
    first_conv = next(m for m in network.modules() if isinstance(m, nn.modules.conv._ConvNd))
    dims = first_conv.weight.dim() - 2
    sizes: dict[str, int] = {}

    def recorder(name: str):
        def hook(module, inputs, output) -> None:  # must return None: a returned value replaces the output
            sizes.setdefault(name, _numel(output))

        return hook

    handles = [modules[n].register_forward_hook(recorder(n)) for n in [*stages, main_layer]]
    was_training = network.training
    try:
        network.eval()
        network(torch.zeros(1, first_conv.in_channels, *([probe_size] * dims)))
    finally:
        network.train(was_training)
        for h in handles:
            h.remove()
    last_at = {}
    for name in stages:  # the last stage at each resolution
        if name in sizes and sizes[name] > sizes[main_layer]:
            last_at[sizes[name]] = name
    finer = [last_at[size] for size in sorted(last_at)]  # coarse (deep) to fine
    return finer[:count][::-1]


def _numel(output) -> int:
    tensor = output if isinstance(output, torch.Tensor) else output[0]
    return int(torch.Size(tensor.shape[2:]).numel())


def feature_layer_for(network: nn.Module) -> str:
    """The name of the encoder-output module of a supported network (the layer the head hooks).

    Raises:
        ValueError: for a network type without a preset; pass ``layer=...`` to :class:`PrototypeOODNet`.
    """
    preset = preset_of(network)
    if preset is not None:
        return preset.feature_layer(network)
    raise ValueError(
        f"no preset knows where the encoder of {type(network).__name__} ends; pass layer='<module name>' "
        f"(one of backbone.named_modules()); presets exist for: {', '.join(PRESETS)}"
    )


def create_prototype_network(
    preset: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    head_channels: int = 256,
    network_kwargs: dict[str, Any] | None = None,
    **wrapper_kwargs: Any,
) -> PrototypeOODNet:
    """Build a supported network with its default configuration and wrap it with the OOD head.

    Args:
        preset: a key of :data:`PRESETS` (``unet``, ``basic_unet``, ``dynunet``, ``segresnet``, ``deeplabv3``,
            ``swinunetr``, ``plain_conv_unet``, ``residual_encoder_unet``).
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: segmentation classes K (also the number of prototypes).
        head_channels: embedding size ``c_g``.
        network_kwargs: overrides of the network's constructor arguments.
        wrapper_kwargs: further :class:`PrototypeOODNet` arguments (``head_act``, ``outlier_norm``, ...).

    Example:
        >>> net = create_prototype_network("unet", spatial_dims=3, in_channels=1, out_channels=3, head_channels=32)
        >>> net(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 3, 32, 32, 32])
    """
    spec = look_up_option(preset, PRESETS)  # returns the value for a dict
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    backbone = spec.build(spatial_dims, in_channels, out_channels, **(network_kwargs or {}))
    return PrototypeOODNet(
        backbone,
        num_classes=out_channels,
        layer=spec.feature_layer(backbone),
        head_channels=head_channels,
        spatial_dims=spatial_dims,
        **wrapper_kwargs,
    )
