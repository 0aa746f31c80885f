"""The backbone registry (monai_ood.networks.presets): one entry per supported network, checked against the
network itself.

Adding a backbone is one entry in ``monai_ood.networks.presets.PRESETS`` plus a line in ``TINY`` below.
"""

import sys

import numpy as np
import pytest
import torch

from monai_ood.detectors import FusedDetector
from monai_ood.networks.presets import PRESETS, encoder_stages, feature_layer_for, preset_of

# a small configuration of every preset, and an input size it takes (2D)
TINY = {
    "unet": ({"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 0}, (32, 32)),
    "basic_unet": ({"features": (4, 4, 8, 8, 16, 4)}, (32, 32)),
    "dynunet": ({"filters": [4, 8, 8, 16, 16]}, (32, 32)),
    "segresnet": ({"init_filters": 8}, (32, 32)),
    "deeplabv3": ({}, (32, 32)),
    "swinunetr": ({"feature_size": 12, "depths": (1, 1, 1, 1)}, (64, 64)),
    "plain_conv_unet": ({"n_stages": 3, "features_per_stage": (4, 8, 16)}, (32, 32)),
    "residual_encoder_unet": (
        {"n_stages": 3, "features_per_stage": (4, 8, 16), "n_blocks_per_stage": 1},
        (32, 32),
    ),
}
# presets whose network comes from an optional package (the nnunet extra)
OPTIONAL = {
    "plain_conv_unet": "dynamic_network_architectures",
    "residual_encoder_unet": "dynamic_network_architectures",
}


def _skip_if_not_installed(name):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])


def test_every_preset_has_a_tiny_case():
    assert set(TINY) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_stages_run_in_order_shallow_to_deep_and_end_at_the_feature_layer(name):
    _skip_if_not_installed(name)
    kwargs, size = TINY[name]
    net = PRESETS[name].build(2, 1, 3, **kwargs).eval()
    assert preset_of(net) is PRESETS[name]
    stages = encoder_stages(net)
    modules = dict(net.named_modules())
    assert stages and all(stage in modules for stage in stages)
    order, sizes = [], {}

    def hook_for(stage):
        def hook(module, inputs, output):
            tensor = output if isinstance(output, torch.Tensor) else output[0]
            if stage not in sizes:
                order.append(stage)
                sizes[stage] = int(np.prod(tensor.shape[2:]))

        return hook

    handles = [modules[s].register_forward_hook(hook_for(s)) for s in stages]
    with torch.no_grad():
        net(torch.rand(1, 1, *size))
    for handle in handles:
        handle.remove()
    assert order == stages  # called shallow to deep, each once at least
    resolution = [sizes[s] for s in stages]
    assert resolution == sorted(resolution, reverse=True)  # never finer deeper down
    assert resolution[-1] < resolution[0]
    assert feature_layer_for(net) == stages[-1]  # the head's layer is the deepest stage


@pytest.mark.parametrize("name", ["unet", "segresnet"])
def test_the_default_detector_fits_on_a_registry_network(name):
    kwargs, size = TINY[name]
    net = PRESETS[name].build(2, 1, 3, **kwargs)
    rng = np.random.default_rng(0)
    items = [{"image": rng.random((1, *size), dtype=np.float32)} for _ in range(8)]
    detector = FusedDetector(net, fusion="sum", warped_copies=0).fit(items[:5], items[5:])
    assert detector.layers == encoder_stages(net)


def test_an_unknown_network_is_refused_with_the_presets_named():
    with pytest.raises(ValueError, match="presets exist for: unet"):
        encoder_stages(torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3)))


# ------------------------------------------------------------------------ nnU-Net's U-Nets


def _nnunet_unets(dims: int):
    """A PlainConvUNet and a ResidualEncoderUNet as nnU-Net's plans would build them, without plans."""
    unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if dims == 3 else torch.nn.InstanceNorm2d
    common = {
        "conv_bias": True,
        "norm_op": norm,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "nonlin": torch.nn.LeakyReLU,
        "nonlin_kwargs": {"inplace": True},
        "deep_supervision": True,  # as nnU-Net trains them: forward returns a list
    }
    plain = unet.PlainConvUNet(1, 4, (4, 8, 16, 16), conv, 3, (1, 2, 2, 2), 2, 3, 1, **common)
    residual = unet.ResidualEncoderUNet(1, 3, (4, 8, 16), conv, 3, (1, 2, 2), (1, 2, 2), 2, 1, **common)
    return {"plain_conv_unet": plain, "residual_encoder_unet": residual}


def _stage_shapes(net, stages, x):
    """The output shape of every stage in one forward pass."""
    modules = dict(net.named_modules())
    shapes = {}

    def hook_for(stage):
        def hook(module, inputs, output):  # returns None: a returned value would replace the output
            shapes.setdefault(stage, tuple(output.shape))

        return hook

    handles = [modules[s].register_forward_hook(hook_for(s)) for s in stages]
    with torch.no_grad():
        net(x)
    for handle in handles:
        handle.remove()
    return shapes


@pytest.mark.parametrize("dims", [2, 3])
def test_the_registry_resolves_nnunet_unets_built_without_plans(dims):
    for name, net in _nnunet_unets(dims).items():
        assert preset_of(net) is PRESETS[name]
        # independent reference: the encoder's own stage list and output channels
        expected = [f"encoder.stages.{i}" for i in range(len(net.encoder.stages))]
        assert encoder_stages(net) == expected and feature_layer_for(net) == expected[-1]
        sizes = _stage_shapes(net, expected, torch.rand(1, 1, *([16] * dims)))
        assert [sizes[s][1] for s in expected] == list(net.encoder.output_channels)
        assert sizes[expected[0]][2:] == (16,) * dims  # stage 0 has stride 1 in nnU-Net's plans
        assert sizes[expected[-1]][2] < sizes[expected[0]][2]


def test_the_default_detector_fits_on_an_nnunet_unet_with_deep_supervision():
    net = _nnunet_unets(3)["plain_conv_unet"]
    rng = np.random.default_rng(0)
    items = [{"image": rng.standard_normal((1, 16, 16, 16), dtype=np.float32)} for _ in range(6)]
    detector = FusedDetector(net, fusion="sum", warped_copies=0).fit(items[:4], items[4:])
    assert detector.layers == [f"encoder.stages.{i}" for i in range(4)]
    logits, out, _ = detector.segment_and_score(torch.rand(2, 1, 16, 16, 16))
    # the full-resolution output of the deep-supervision list is the segmentation
    assert logits.shape == (2, 3, 16, 16, 16) and out.score_map.shape == (2, 1, 16, 16, 16)


def test_nnunet_unets_without_their_package_fail_in_one_line(monkeypatch):
    from monai.utils import OptionalImportError

    for module in ["dynamic_network_architectures", "dynamic_network_architectures.architectures.unet"]:
        monkeypatch.setitem(sys.modules, module, None)  # as if the nnunet extra were not installed
    for name, title in [
        ("plain_conv_unet", "PlainConvUNet"),
        ("residual_encoder_unet", "ResidualEncoderUNet"),
    ]:
        with pytest.raises(OptionalImportError) as error:
            PRESETS[name].build(3, 1, 2)
        message = str(error.value)
        assert "\n" not in message and title in message and 'pip install "monai-ood[nnunet]"' in message
    # the other presets are not affected: networks are still resolved, unknown ones still refused
    kwargs, _ = TINY["unet"]
    assert preset_of(PRESETS["unet"].build(2, 1, 3, **kwargs)) is PRESETS["unet"]
    assert preset_of(torch.nn.Conv2d(1, 1, 1)) is None
