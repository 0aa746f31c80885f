"""The backbone registry: one entry per supported network, checked against the network itself.

Adding a backbone is one entry in ``monai_ood.networks.presets.PRESETS`` plus a line in ``TINY`` below.
"""

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
}


def test_every_preset_has_a_tiny_case():
    assert set(TINY) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_stages_run_in_order_shallow_to_deep_and_end_at_the_feature_layer(name):
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
