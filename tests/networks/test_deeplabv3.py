"""Tests for monai_ood.networks.deeplabv3 (imported directly: the package __init__ may be in flux)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from monai_ood.networks.deeplabv3 import (
    ASPP,
    DEEPLABV3_FEATURE_CHANNELS,
    DEEPLABV3_FEATURE_LAYER,
    DeepLabV3,
)

# Small inputs keep the full ResNet-50 widths affordable on CPU; sizes divide by 16.
SHAPES = {2: (2, 1, 64, 64), 3: (1, 1, 32, 32, 32)}
# Output stride 8 keeps layer3/layer4 twice as large, so smaller inputs suffice there.
SHAPES_OS8 = {2: (1, 1, 32, 32), 3: (1, 1, 16, 16, 16)}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # These tensors are tiny: intra-op threads only add OpenMP sync overhead, which on a busy 2-core
    # machine nearly doubled the run time. Restored afterwards so other test modules are unaffected.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def small_net() -> DeepLabV3:
    # One block per stage: same widths and key structure, cheaper to build, for error-path tests.
    return DeepLabV3(spatial_dims=2, in_channels=1, out_channels=2, layers=(1, 1, 1, 1)).eval()


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("output_stride", [16, 8])
def test_logits_and_feature_shapes(spatial_dims: int, output_stride: int) -> None:
    torch.manual_seed(0)
    net = DeepLabV3(
        spatial_dims=spatial_dims, in_channels=1, out_channels=3, output_stride=output_stride
    ).eval()
    assert dict(net.named_modules())[DEEPLABV3_FEATURE_LAYER] is net.backbone.layer4

    captured = {}
    handle = net.get_submodule(DEEPLABV3_FEATURE_LAYER).register_forward_hook(
        lambda _m, _i, out: captured.update(features=out)
    )
    x = torch.randn((SHAPES if output_stride == 16 else SHAPES_OS8)[spatial_dims])
    with torch.no_grad():
        logits = net(x)
    handle.remove()

    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (x.shape[0], 3, *x.shape[2:])
    assert torch.isfinite(logits).all()
    features = captured["features"]
    assert features.shape[1] == DEEPLABV3_FEATURE_CHANNELS == 2048
    assert tuple(features.shape[2:]) == tuple(s // output_stride for s in x.shape[2:])


def test_gradients_flow() -> None:
    torch.manual_seed(0)
    net = DeepLabV3(spatial_dims=2, in_channels=1, out_channels=2).train()
    x = torch.randn(2, 1, 32, 32)
    target = torch.randint(0, 2, (2, 32, 32))
    loss = nn.functional.cross_entropy(net(x), target)
    loss.backward()
    for param in (net.backbone.conv1.weight, net.classifier[-1].weight):
        assert param.grad is not None
        assert torch.isfinite(param.grad).all()
        assert param.grad.abs().sum() > 0


def test_aspp_trains_with_batch_size_one_3d() -> None:
    # The image pooling branch has no norm, so batch norm elsewhere never sees a single value per channel.
    aspp = ASPP(spatial_dims=3, in_channels=8, out_channels=4, atrous_rates=(1, 2, 3)).train()
    out = aspp(torch.randn(1, 8, 3, 3, 3))
    assert out.shape == (1, 4, 3, 3, 3)
    out.sum().backward()
    assert aspp.pooling[1].conv.weight.grad is not None


def test_norm_spec_reaches_every_block() -> None:
    net = DeepLabV3(2, 1, 2, layers=(1, 1, 1, 1), norm=("group", {"num_groups": 32}))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert isinstance(net.backbone.layer4[0].bn2, nn.GroupNorm)
    out = net.train()(torch.randn(1, 1, 32, 32))
    assert out.shape == (1, 2, 32, 32)


def test_pretrained_backbone_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    src = DeepLabV3(spatial_dims=2, in_channels=1, out_channels=2)
    # Non-default buffers make sure running statistics are carried over as well.
    src.backbone.bn1.running_mean.uniform_()
    backbone_only = tmp_path / "backbone.pt"
    full_model = tmp_path / "full.pt"
    torch.save(src.backbone.state_dict(), backbone_only)
    # A whole-model state dict: "backbone."-prefixed keys plus head keys (the big ASPP left out to keep
    # the file small; any non-backbone key must be ignored).
    whole = {k: v for k, v in src.state_dict().items() if not k.startswith("aspp.")}
    assert any(k.startswith("classifier.") for k in whole)
    torch.save(whole, full_model)

    torch.manual_seed(1)
    dst = DeepLabV3(spatial_dims=2, in_channels=1, out_channels=2, pretrained_backbone=str(backbone_only))
    expected = src.backbone.state_dict()
    for key, value in dst.backbone.state_dict().items():
        assert torch.equal(value, expected[key]), key

    with torch.no_grad():
        for param in dst.backbone.parameters():
            param.zero_()
    dst.load_pretrained_backbone(full_model)
    for key, value in dst.backbone.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # Only the backbone is loaded; the head keeps its own initialisation.
    assert not torch.equal(dst.classifier[-1].weight, src.classifier[-1].weight)


def test_pretrained_backbone_errors(tmp_path, small_net: DeepLabV3) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        small_net.load_pretrained_backbone(tmp_path / "missing.pt")

    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not load"):
        small_net.load_pretrained_backbone(garbage)

    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="state dict"):
        small_net.load_pretrained_backbone(not_a_dict)

    wrong_keys = tmp_path / "keys.pt"
    state = dict(small_net.backbone.state_dict())
    del state["conv1.weight"]
    state["fc.weight"] = torch.zeros(2, 2048)
    torch.save(state, wrong_keys)
    with pytest.raises(ValueError, match=r"missing keys.*conv1\.weight.*unexpected keys.*fc\.weight"):
        small_net.load_pretrained_backbone(wrong_keys)

    wrong_shape = tmp_path / "shape.pt"
    state = dict(small_net.backbone.state_dict())
    state["conv1.weight"] = torch.zeros(64, 3, 7, 7)  # an RGB stem loaded into a 1-channel model
    torch.save(state, wrong_shape)
    with pytest.raises(ValueError, match=r"shape mismatch.*conv1\.weight.*\(64, 3, 7, 7\)"):
        small_net.load_pretrained_backbone(wrong_shape)

    with pytest.raises(FileNotFoundError):
        DeepLabV3(2, 1, 2, layers=(1, 1, 1, 1), pretrained_backbone=tmp_path / "missing.pt")


def test_forward_rejects_wrong_rank(small_net: DeepLabV3) -> None:
    with pytest.raises(ValueError, match="got"):
        small_net(torch.zeros(1, 1, 16, 16, 16))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spatial_dims": 1},
        {"spatial_dims": 4},
        {"in_channels": 0},
        {"out_channels": -1},
        {"out_channels": 2.0},
        {"output_stride": 32},
        {"output_stride": 4},
        {"aspp_channels": 0},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"layers": (3, 4, 6)},
        {"layers": (3, 4, 0, 3)},
        {"atrous_rates": (6, 12)},
        {"atrous_rates": (6, 0, 18)},
    ],
)
def test_invalid_arguments(kwargs: dict) -> None:
    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, **kwargs}
    with pytest.raises(ValueError, match="got"):
        DeepLabV3(**args)
