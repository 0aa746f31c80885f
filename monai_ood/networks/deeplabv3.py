"""DeepLabV3 with a dilated ResNet-50 backbone for 2D and 3D segmentation.

Reference:
    Chen, L.-C., Papandreou, G., Schroff, F., Adam, H. (2017). "Rethinking Atrous Convolution for
    Semantic Image Segmentation". arXiv:1706.05587. Used as a segmentation baseline in Cho et al.
    (2023), section 4.2.3.

The layout follows torchvision's ``deeplabv3_resnet50`` (``replace_stride_with_dilation``,
``DeepLabHead``) but is written with MONAI layer factories so that a single code path serves 2D and 3D.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from monai.networks.nets.resnet import ResNetBottleneck

__all__ = [
    "DEEPLABV3_FEATURE_CHANNELS",
    "DEEPLABV3_FEATURE_LAYER",
    "ASPP",
    "DeepLabV3",
    "DilatedResNetBackbone",
    "DilatedResNetBottleneck",
]

#: Fully qualified module name (as in ``model.named_modules()``) of the deepest backbone stage.
DEEPLABV3_FEATURE_LAYER = "backbone.layer4"
#: Number of channels produced by :data:`DEEPLABV3_FEATURE_LAYER` (512 planes x bottleneck expansion 4).
DEEPLABV3_FEATURE_CHANNELS = 2048

_STAGE_PLANES = (64, 128, 256, 512)
_BASE_ATROUS_RATES = (6, 12, 18)  # rates of the paper for output stride 16
_INTERP_MODE = {2: "bilinear", 3: "trilinear"}


def _check_positive_int(name: str, value: object) -> None:
    # bool is a subclass of int; ``in_channels=True`` is a bug, not a channel count.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_spatial_dims(spatial_dims: object) -> None:
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")


class DilatedResNetBottleneck(ResNetBottleneck):
    """MONAI ``ResNetBottleneck`` whose 3x3 convolution can be dilated.

    MONAI 1.6.1's bottleneck hard-codes ``padding=1`` and no dilation, so only ``conv2`` is rebuilt
    here; parameter names and shapes are unchanged, which keeps state dicts interchangeable with
    MONAI's ``ResNet`` and torchvision's ``resnet50``.

    Args:
        in_planes: number of input channels.
        planes: number of bottleneck channels; the block outputs ``planes * 4`` channels.
        spatial_dims: number of spatial dimensions, 2 or 3.
        stride: stride of the 3x3 convolution.
        dilation: dilation (and padding) of the 3x3 convolution.
        downsample: optional module applied to the residual branch.
        act: MONAI activation spec.
        norm: MONAI normalization spec.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        spatial_dims: int = 3,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__(
            in_planes=in_planes,
            planes=planes,
            spatial_dims=spatial_dims,
            stride=stride,
            downsample=downsample,
            act=act,
            norm=norm,
        )
        if dilation != 1:
            # padding == dilation keeps the spatial size of a 3x3 kernel ("same" padding).
            self.conv2 = Conv[Conv.CONV, spatial_dims](
                planes, planes, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False
            )
        self.dilation = dilation


class DilatedResNetBackbone(nn.Module):
    """ResNet bottleneck backbone with stride replaced by dilation in the last stage(s).

    Stem (7x7 conv, stride 2, norm, act, 3x3 max-pool, stride 2) followed by four bottleneck stages with
    64/128/256/512 planes (256/512/1024/2048 output channels). With ``output_stride=16`` the stride of
    ``layer4`` is replaced by dilation 2; with ``output_stride=8`` the strides of ``layer3`` and ``layer4``
    are replaced by dilation 2 and 4. As in torchvision's ``replace_stride_with_dilation``, the first
    block of a dilated stage keeps the previous dilation.

    Submodule names (``conv1``, ``bn1``, ``act``, ``maxpool``, ``layer1`` ... ``layer4``) match MONAI's
    ``ResNet`` and torchvision's ``resnet50`` (without ``fc``), so their backbone weights load directly
    when shapes agree.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: number of input channels.
        layers: number of bottleneck blocks in each of the four stages; ``(3, 4, 6, 3)`` is ResNet-50.
        output_stride: ratio of input to ``layer4`` spatial size, 8 or 16.
        norm: MONAI normalization spec, e.g. ``"batch"`` or ``("group", {"num_groups": 32})``.
        act: MONAI activation spec.

    Raises:
        ValueError: if an argument is out of range.

    Shapes:
        input ``(B, in_channels, *spatial)`` -> output ``(B, 2048, *spatial / output_stride)``
        (rounded up per stride-2 operation).
    """

    out_channels = DEEPLABV3_FEATURE_CHANNELS

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        layers: Sequence[int] = (3, 4, 6, 3),
        output_stride: int = 16,
        norm: str | tuple = "batch",
        act: str | tuple = ("relu", {"inplace": True}),
    ) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        _check_positive_int("in_channels", in_channels)
        if isinstance(output_stride, bool) or output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) != 4:
            raise ValueError(f"layers must be a sequence of 4 positive integers, got {layers!r}")
        for n in layers:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"layers must be a sequence of 4 positive integers, got {layers!r}")

        self.spatial_dims = spatial_dims
        self.output_stride = output_stride
        conv_type = Conv[Conv.CONV, spatial_dims]

        self.conv1 = conv_type(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=64)
        self.act = get_act_layer(name=act)
        self.maxpool = Pool[Pool.MAX, spatial_dims](kernel_size=3, stride=2, padding=1)

        # Stem gives stride 4, layer2 and layer3 would add x2 each (16), layer4 another x2 (32).
        dilate = (False, False, output_stride == 8, True)
        self._in_planes = 64
        self._dilation = 1
        for i, (planes, blocks) in enumerate(zip(_STAGE_PLANES, layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage = self._make_layer(spatial_dims, planes, blocks, stride, dilate[i], norm, act)
            self.add_module(f"layer{i + 1}", stage)
        del self._in_planes, self._dilation

        # Same initialisation as MONAI/torchvision ResNet; norm layers already start at weight 1, bias 0.
        for m in self.modules():
            if isinstance(m, conv_type):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self,
        spatial_dims: int,
        planes: int,
        blocks: int,
        stride: int,
        dilate: bool,
        norm: str | tuple,
        act: str | tuple,
    ) -> nn.Sequential:
        expansion = DilatedResNetBottleneck.expansion
        previous_dilation = self._dilation
        if dilate:
            # Trade the stride for dilation so later blocks see the same receptive field.
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._in_planes != planes * expansion:
            # bias=False (unlike MONAI's default) because a norm follows, as in torchvision.
            downsample = nn.Sequential(
                Conv[Conv.CONV, spatial_dims](
                    self._in_planes, planes * expansion, kernel_size=1, stride=stride, bias=False
                ),
                get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=planes * expansion),
            )
        stage = [
            DilatedResNetBottleneck(
                self._in_planes, planes, spatial_dims, stride, previous_dilation, downsample, act, norm
            )
        ]
        self._in_planes = planes * expansion
        for _ in range(1, blocks):
            stage.append(
                DilatedResNetBottleneck(
                    self._in_planes, planes, spatial_dims, 1, self._dilation, None, act, norm
                )
            )
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the deepest backbone features.

        Args:
            x: input of shape ``(B, in_channels, *spatial)``.

        Returns:
            Features of shape ``(B, 2048, *spatial / output_stride)``.
        """
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling as in DeepLabV3 (Chen et al. 2017, section 3.3).

    Five parallel branches: a 1x1 convolution, three dilated 3x3 convolutions and image-level pooling;
    their concatenation is projected by a 1x1 convolution (norm, act, dropout). MONAI's ``SimpleASPP``
    is not reused because it has no image pooling branch and no per-branch normalization.

    The image pooling branch has no normalization layer: after global pooling there is a single value
    per channel and sample, so batch norm fails in training at batch size 1 (common with 3D patches)
    and instance norm is undefined. Its convolution therefore carries a bias.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: number of input channels.
        out_channels: number of channels of every branch and of the projection.
        atrous_rates: dilation rates of the three 3x3 branches.
        norm: MONAI normalization spec.
        act: MONAI activation spec.
        dropout: dropout probability after the projection.

    Shapes:
        ``(B, in_channels, *spatial)`` -> ``(B, out_channels, *spatial)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int = 256,
        atrous_rates: Sequence[int] = _BASE_ATROUS_RATES,
        norm: str | tuple = "batch",
        act: str | tuple = ("relu", {"inplace": True}),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        for rate in atrous_rates:
            _check_positive_int("atrous_rates entries", rate)

        def conv_norm_act(cin: int, kernel_size: int, dilation: int = 1) -> Convolution:
            # Convolution derives "same" padding from kernel size and dilation.
            return Convolution(
                spatial_dims, cin, out_channels, kernel_size=kernel_size, dilation=dilation,
                act=act, norm=norm, bias=False,
            )  # fmt: skip

        self.branches = nn.ModuleList(
            [conv_norm_act(in_channels, 1)] + [conv_norm_act(in_channels, 3, r) for r in atrous_rates]
        )
        self.pooling = nn.Sequential(
            Pool[Pool.ADAPTIVEAVG, spatial_dims](1),
            Convolution(
                spatial_dims, in_channels, out_channels, kernel_size=1, act=act, norm=None, bias=True
            ),
        )
        n_cat = out_channels * (len(self.branches) + 1)
        self.project = Convolution(
            spatial_dims,
            n_cat,
            out_channels,
            kernel_size=1,
            act=act,
            norm=norm,
            dropout=dropout if dropout > 0 else None,
            adn_ordering="NAD",  # conv -> norm -> act -> dropout, as in torchvision
            bias=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ASPP.

        Args:
            x: features of shape ``(B, in_channels, *spatial)``.

        Returns:
            Tensor of shape ``(B, out_channels, *spatial)``.
        """
        outs = [branch(x) for branch in self.branches]
        # Upsampling a 1-voxel map (bilinear/trilinear, align_corners=False) is a broadcast.
        outs.append(self.pooling(x).expand(-1, -1, *x.shape[2:]))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3(nn.Module):
    """DeepLabV3 (ResNet bottleneck backbone + ASPP) for 2D or 3D semantic segmentation.

    The backbone is a ResNet-50 style network (bottleneck expansion 4, 2048 output channels) with
    dilated last stage(s) for the requested output stride. The ASPP head uses atrous rates
    ``(6, 12, 18)`` at output stride 16 and ``(12, 24, 36)`` at output stride 8, projects to
    ``aspp_channels``, and ``classifier`` (3x3 conv, norm, act, 1x1 conv) produces logits that are
    upsampled (bilinear/trilinear, ``align_corners=False``) to the input size.

    Features for out-of-distribution heads are taken from the module named
    :data:`DEEPLABV3_FEATURE_LAYER` (``"backbone.layer4"``, :data:`DEEPLABV3_FEATURE_CHANNELS` channels,
    spatial size ``input / output_stride``).

    Reference:
        Chen et al. (2017), "Rethinking Atrous Convolution for Semantic Image Segmentation",
        arXiv:1706.05587; used in Cho et al. (2023), section 4.2.3.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: number of input channels.
        out_channels: number of output classes (logit channels).
        output_stride: 16 (dilate ``layer4``) or 8 (dilate ``layer3`` and ``layer4``).
        layers: bottleneck blocks per backbone stage; ``(3, 4, 6, 3)`` is ResNet-50.
        norm: MONAI normalization spec, e.g. ``"batch"``, ``("instance", {"affine": True})`` or
            ``("group", {"num_groups": 32})``.
        aspp_channels: channels of every ASPP branch, the projection and the classifier hidden layer.
        dropout: dropout probability after the ASPP projection (torchvision uses 0.5).
        pretrained_backbone: optional path to a local file holding a backbone state dict, with
            backbone-only keys (e.g. ``"layer1.0.conv1.weight"``) or keys prefixed with ``"backbone."``
            (other keys, e.g. ``"aspp.*"``, are then ignored). Loaded with ``weights_only=True``;
            nothing is ever downloaded.
        act: MONAI activation spec used throughout.
        atrous_rates: override of the three ASPP dilation rates; by default ``(6, 12, 18)`` scaled by
            ``16 / output_stride``.

    Raises:
        ValueError: if an argument is out of range, or the pretrained file is unreadable or its keys or
            shapes do not match the backbone.
        FileNotFoundError: if ``pretrained_backbone`` is not an existing file.

    Shapes:
        input ``(B, in_channels, *spatial)`` -> logits ``(B, out_channels, *spatial)``, where ``spatial``
        is ``(H, W)`` or ``(D, H, W)``; sizes divisible by ``output_stride`` are recommended.

    Example:
        >>> net = DeepLabV3(spatial_dims=3, in_channels=1, out_channels=3)
        >>> net(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 3, 32, 32, 32])
    """

    feature_layer = DEEPLABV3_FEATURE_LAYER
    feature_channels = DEEPLABV3_FEATURE_CHANNELS

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        output_stride: int = 16,
        layers: Sequence[int] = (3, 4, 6, 3),
        norm: str | tuple = "batch",
        aspp_channels: int = 256,
        dropout: float = 0.1,
        pretrained_backbone: str | os.PathLike | None = None,
        *,
        act: str | tuple = ("relu", {"inplace": True}),
        atrous_rates: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        _check_positive_int("aspp_channels", aspp_channels)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if isinstance(output_stride, bool) or output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        if atrous_rates is None:
            # The paper doubles the rates when the output stride halves, keeping the field of view.
            atrous_rates = tuple(r * 16 // output_stride for r in _BASE_ATROUS_RATES)
        elif (
            isinstance(atrous_rates, (str, bytes))
            or not isinstance(atrous_rates, Sequence)
            or len(atrous_rates) != 3
            or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in atrous_rates)
        ):
            # Checked here, before the backbone is built, so a bad call fails fast.
            raise ValueError(f"atrous_rates must be a sequence of 3 positive integers, got {atrous_rates!r}")

        self.spatial_dims = spatial_dims
        self.output_stride = output_stride
        self.backbone = DilatedResNetBackbone(spatial_dims, in_channels, layers, output_stride, norm, act)
        self.aspp = ASPP(
            spatial_dims, DEEPLABV3_FEATURE_CHANNELS, aspp_channels, tuple(atrous_rates), norm, act, dropout
        )
        self.classifier = nn.Sequential(
            Convolution(
                spatial_dims, aspp_channels, aspp_channels, kernel_size=3, act=act, norm=norm, bias=False
            ),
            Conv[Conv.CONV, spatial_dims](aspp_channels, out_channels, kernel_size=1),
        )
        if pretrained_backbone is not None:
            self.load_pretrained_backbone(pretrained_backbone)

    def load_pretrained_backbone(self, path: str | os.PathLike) -> None:
        """Load backbone weights from a local state dict file (strict: every key and shape must match).

        Args:
            path: file written by ``torch.save(state_dict, path)``; keys are either backbone-only or
                prefixed with ``"backbone."`` (then non-backbone keys are ignored).

        Raises:
            FileNotFoundError: if ``path`` is not an existing file.
            ValueError: if the file cannot be read as a state dict, or keys or shapes do not match;
                the message lists the offending keys.
        """
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"pretrained_backbone file not found: {str(file)!r}")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt file, not a torch file, or non-tensor pickled objects
            raise ValueError(
                f"could not load pretrained_backbone {str(file)!r} as a state dict: {err}"
            ) from err
        if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise ValueError(
                f"pretrained_backbone {str(file)!r} must contain a state dict (mapping of str to tensors), "
                f"got {type(state).__name__}"
                + (f" with keys {sorted(map(str, state))[:5]!r}" if isinstance(state, Mapping) else "")
            )
        prefix = "backbone."
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        expected = self.backbone.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or mismatched:
            problems = []
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatch", mismatched),
            ):
                if items:
                    more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
                    problems.append(f"{label} ({len(items)}): {items[:10]!r}{more}")
            raise ValueError(
                f"pretrained_backbone {str(file)!r} does not match the backbone "
                f"(spatial_dims={self.spatial_dims}, layers, in_channels): " + "; ".join(problems)
            )
        self.backbone.load_state_dict(state, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment ``x``.

        Args:
            x: input of shape ``(B, in_channels, *spatial)`` with ``len(spatial) == spatial_dims``.

        Returns:
            Logits of shape ``(B, out_channels, *spatial)`` (a plain tensor, as MONAI inferers expect).

        Raises:
            ValueError: if ``x`` does not have ``spatial_dims + 2`` dimensions.
        """
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected input of shape (B, C, {'D, ' if self.spatial_dims == 3 else ''}H, W), "
                f"got {tuple(x.shape)!r}"
            )
        features = self.backbone(x)
        logits = self.classifier(self.aspp(features))
        return F.interpolate(
            logits, size=x.shape[2:], mode=_INTERP_MODE[self.spatial_dims], align_corners=False
        )
