"""MC dropout (monai_ood.detectors.mc_dropout): seeded passes with dropout really active, the caller's
RNG and the network's modes restored (also on error), and its argument checks."""

from __future__ import annotations

import pytest
import torch
from detector_helpers import K, make_unet
from torch import nn

from monai_ood.detectors.entropy import EntropyDetector
from monai_ood.detectors.mc_dropout import MCDropoutDetector


def test_mc_dropout_seeded_and_restores_modes():
    net = make_unet(dropout=0.3)
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    rng_before = torch.get_rng_state()
    a = MCDropoutDetector(net, num_passes=4, seed=7).predict(images)
    b = MCDropoutDetector(net, num_passes=4, seed=7).predict(images)
    c = MCDropoutDetector(net, num_passes=4, seed=8).predict(images)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert torch.equal(a.image_score, b.image_score) and torch.equal(a.score_map, b.score_map)
    assert not torch.allclose(a.score_map, c.score_map)
    deterministic = EntropyDetector(net).predict(images)
    assert not torch.allclose(a.score_map, deterministic.score_map)  # dropout really was active
    dropouts = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and not any(m.training for m in net.modules())


def test_mc_dropout_restores_modes_on_error():
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.conv = nn.Conv2d(1, K, 1)

        def forward(self, x):
            if self.drop.training:
                raise RuntimeError("boom")
            return self.conv(self.drop(x))

    net = Failing().eval()
    with pytest.raises(RuntimeError, match="boom"):
        MCDropoutDetector(net).predict(torch.rand(1, 1, 8, 8))
    assert not any(m.training for m in net.modules())


def test_mc_dropout_needs_dropout():
    with pytest.raises(ValueError, match="dropout=0.2"):
        MCDropoutDetector(make_unet())  # MONAI builds Dropout(p=0.0): that is no dropout
    with pytest.raises(ValueError, match="num_passes"):
        MCDropoutDetector(make_unet(dropout=0.2), num_passes=0)
