"""The detector contract of monai_ood.detectors.base, on the post-hoc detectors: ``predict`` shapes,
dtypes and finiteness in 2D and 3D, the network's training flags left alone (``eval_mode``), the K >= 2
check of ``segmentation_logits``, maps brought to the input size (``to_input_size``), the foreground mean
against float64 numpy, and the ``DETECTORS`` registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detector_helpers import FixedLogits, items, make_unet

from monai_ood.detectors import DETECTORS
from monai_ood.detectors.base import foreground_mean
from monai_ood.detectors.energy import EnergyDetector
from monai_ood.detectors.ensemble import EnsembleDetector, EnsembleDiceDetector
from monai_ood.detectors.entropy import EntropyDetector
from monai_ood.detectors.feature_statistics import FeatureStatisticsDetector
from monai_ood.detectors.intensity_histogram import IntensityHistogramDetector
from monai_ood.detectors.mahalanobis import MahalanobisDetector
from monai_ood.detectors.mc_dropout import MCDropoutDetector
from monai_ood.detectors.msp import MaxSoftmaxDetector


def build(name: str) -> object:
    if name == "msp":
        return MaxSoftmaxDetector(make_unet())
    if name == "entropy":
        return EntropyDetector(make_unet())
    if name == "energy":
        return EnergyDetector(make_unet())
    if name == "mc_dropout":
        return MCDropoutDetector(make_unet(dropout=0.2), num_passes=3)
    if name == "ensemble":
        return EnsembleDetector([make_unet(s) for s in range(3)])
    detector = MahalanobisDetector(make_unet())
    return detector.fit(items(torch.rand(12, 1, 32, 32, generator=torch.Generator().manual_seed(0))))


@pytest.mark.parametrize("name", ["msp", "entropy", "energy", "mc_dropout", "ensemble", "mahalanobis"])
def test_shapes_and_finite(name):
    detector = build(name)
    assert detector.name == name
    out = detector.predict(torch.rand(2, 1, 32, 32))
    assert out.image_score.shape == (2,) and out.image_score.dtype == torch.float32
    assert torch.isfinite(out.image_score).all()
    assert out.score_map is not None and out.score_map.shape == (2, 1, 32, 32)
    assert torch.isfinite(out.score_map).all()


@pytest.mark.parametrize("cls", [EntropyDetector, MahalanobisDetector])
def test_3d(cls):
    net = make_unet(spatial_dims=3)
    detector = cls(net)
    if detector.requires_fit:
        detector.fit(items(torch.rand(4, 1, 16, 16, 16)))
    out = detector.predict(torch.rand(2, 1, 16, 16, 16))
    assert out.image_score.shape == (2,) and out.score_map.shape == (2, 1, 16, 16, 16)


def test_network_training_flags_untouched():
    net = make_unet().train()
    MaxSoftmaxDetector(net).predict(torch.rand(1, 1, 32, 32))
    assert all(m.training for m in net.modules())


def test_rejects_single_channel_output():
    with pytest.raises(ValueError, match="K >= 2"):
        EntropyDetector(make_unet(out_channels=1)).predict(torch.rand(1, 1, 32, 32))


def test_low_resolution_logits_are_upsampled(known_logits):
    out = EntropyDetector(FixedLogits(known_logits[:, :, ::2, ::2].clone())).predict(
        torch.zeros(3, 1, 32, 32)
    )
    assert out.score_map.shape == (3, 1, 32, 32)


def test_foreground_mean_matches_numpy():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 6, 5, generator=g)
    mask = torch.rand(4, 6, 5, generator=g) > 0.6
    mask[2] = False  # an image without foreground gets the empty value
    mask[3] = True
    s, m = scores.double().numpy(), mask.numpy()
    for empty_value, expected_empty in ((7.5, 7.5), (torch.tensor([10.0, 20.0, 30.0, 40.0]), 30.0)):
        expected = [s[i][m[i]].mean() if m[i].any() else expected_empty for i in range(4)]
        got = foreground_mean(scores, mask, empty_value)
        assert got.shape == (4,) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_registry_entries():
    assert DETECTORS["feature_statistics"] is FeatureStatisticsDetector
    assert DETECTORS["intensity_histogram"] is IntensityHistogramDetector
    assert DETECTORS["ensemble_dice"] is EnsembleDiceDetector
    assert DETECTORS["ensemble"] is EnsembleDetector
    assert FeatureStatisticsDetector.requires_fit and IntensityHistogramDetector.requires_fit
    assert not EnsembleDiceDetector.requires_fit
