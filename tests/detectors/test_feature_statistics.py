"""Multi-layer feature statistics (monai_ood.detectors.feature_statistics) against independent float64
numpy / scikit-learn references: per-stage statistics, Ledoit-Wolf Gaussians, the validation z-scores,
one forward pass stopped after the deepest stage, and its options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detector_helpers import K, items, mahalanobis_numpy, make_unet, rand
from sklearn.covariance import LedoitWolf
from torch import nn

from monai_ood.detectors.base import NotFittedError
from monai_ood.detectors.feature_statistics import FeatureStatisticsDetector
from monai_ood.networks import PrototypeOODNet

# the encoder stages of UNet(channels=(4, 8, 16), strides=(2, 2)), shallow to deep, and its decoder
STAGES = ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule"]


DECODER = ["model.1.submodule.2", "model.2"]


def reference_statistics(net: nn.Module, images: torch.Tensor, statistics=("mean", "std")) -> list:
    """Per stage ``(B, D)`` float64 numpy vectors via independent hooks on a full forward pass."""
    modules = dict(net.named_modules())
    captured = {}
    handles = [
        modules[name].register_forward_hook(lambda m, i, o, name=name: captured.setdefault(name, o))
        for name in STAGES
    ]
    with torch.no_grad():
        net(images)
    for handle in handles:
        handle.remove()
    out = []
    for name in STAGES:
        x = captured[name].double().numpy()
        parts = {"mean": x.mean(axis=(2, 3)), "std": x.std(axis=(2, 3))}  # population std
        out.append(np.concatenate([parts[s] for s in statistics], axis=1))
    return out


def test_feature_statistics_matches_numpy():
    net = make_unet(2)
    train, val, test = rand(12, 0), rand(6, 1), rand(3, 2)
    detector = FeatureStatisticsDetector(net, batch_size=5)  # 3 training batches: tests concatenation
    assert detector.layers == STAGES and detector.name == "feature_statistics"
    with pytest.raises(NotFittedError):
        detector.predict(test)
    with pytest.raises(NotFittedError):
        detector.stage_scores(test)
    detector.fit(items(train), items(val))
    assert detector.reference_ == "validation" and detector.num_train_ == 12

    for got, expected in zip(detector.stage_features(test), reference_statistics(net, test), strict=True):
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-9)

    ref_train, ref_val, ref_test = (reference_statistics(net, x) for x in (train, val, test))
    z = []
    for s in range(len(STAGES)):
        lw = LedoitWolf().fit(ref_train[s])
        np.testing.assert_allclose(detector.means_[s].numpy(), ref_train[s].mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(detector.covariances_[s].numpy(), lw.covariance_, rtol=1e-4, atol=1e-10)
        assert detector.covariances_[s].shape == (2 * [4, 8, 16][s],) * 2
        d_val = mahalanobis_numpy(ref_val[s], ref_train[s])
        loc, scale = d_val.mean(), d_val.std(ddof=1)
        np.testing.assert_allclose([detector.loc_[s], detector.scale_[s]], [loc, scale], rtol=1e-4)
        z.append((mahalanobis_numpy(ref_test[s], ref_train[s]) - loc) / scale)
    z = np.stack(z, axis=1)
    np.testing.assert_allclose(detector.stage_scores(test).numpy(), z, rtol=1e-4, atol=1e-6)
    out = detector.predict(test)
    assert out.score_map is None and out.image_score.dtype == torch.float32
    np.testing.assert_allclose(out.image_score.numpy(), z.sum(1), rtol=1e-4, atol=1e-5)


def test_feature_statistics_without_validation_uses_training_distances():
    net = make_unet(3)
    train = rand(10, 4)
    detector = FeatureStatisticsDetector(net).fit(items(train))
    assert detector.reference_ == "train"
    distances = detector.stage_distances(train).numpy()
    np.testing.assert_allclose(detector.loc_.numpy(), distances.mean(0), rtol=1e-6)
    np.testing.assert_allclose(detector.scale_.numpy(), distances.std(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(detector.stage_scores(train).mean(0).numpy(), 0, atol=1e-6)


def test_feature_statistics_one_forward_pass_stopped_after_the_deepest_stage():
    net = make_unet(1)
    modules = dict(net.named_modules())
    calls = dict.fromkeys(STAGES + DECODER, 0)

    def counter(name):
        def hook(module, inputs, output):
            calls[name] += 1

        return hook

    detector = FeatureStatisticsDetector(net, batch_size=16).fit(items(rand(8, 5)), items(rand(4, 6)))
    handles = [modules[name].register_forward_hook(counter(name)) for name in calls]
    try:
        detector.predict(rand(2, 7))
    finally:
        for handle in handles:
            handle.remove()
    assert all(calls[name] == 1 for name in STAGES), calls  # every stage exactly once
    assert all(calls[name] == 0 for name in DECODER), calls  # the decoder never ran
    assert all(not module._forward_hooks for module in net.modules())  # the detector's hooks are gone


def test_feature_statistics_options_and_flags():
    net = make_unet(0).train()
    train = items(rand(8, 8))
    shallow = FeatureStatisticsDetector(net, layers=["model.0"], statistics=("mean",)).fit(train, train[:4])
    assert shallow.stage_scores(rand(2, 9)).shape == (2, 1) and shallow.means_[0].shape == (4,)
    reordered = FeatureStatisticsDetector(net, layers=["model.0"], statistics=("std", "mean"))
    expected = reference_statistics(net.eval(), rand(2, 9), statistics=("std", "mean"))[0]
    net.train()
    np.testing.assert_allclose(
        reordered.stage_features(rand(2, 9))[0].numpy(), expected, rtol=1e-6, atol=1e-9
    )
    FeatureStatisticsDetector(net).fit(train, train[:4]).predict(rand(2, 9))
    assert all(m.training for m in net.modules())  # training flags restored after fit and predict
    wrapped = FeatureStatisticsDetector(PrototypeOODNet(net, num_classes=K, head_channels=4))
    assert wrapped.network is net and wrapped.layers == STAGES
    with pytest.raises(ValueError, match="no module named"):
        FeatureStatisticsDetector(net, layers=["nope"])
    with pytest.raises(ValueError, match="statistics"):
        FeatureStatisticsDetector(net, statistics=())
    with pytest.raises(ValueError):
        FeatureStatisticsDetector(net, statistics=("median",))
    with pytest.raises(ValueError, match="at least 2 training"):
        FeatureStatisticsDetector(net).fit(train[:1])
    with pytest.raises(ValueError, match="at least 2 validation"):
        FeatureStatisticsDetector(net).fit(train, train[:1])
