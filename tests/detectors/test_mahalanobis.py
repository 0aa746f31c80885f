"""The single-Gaussian Mahalanobis detector (monai_ood.detectors.mahalanobis) against float64 numpy and
scikit-learn's Ledoit-Wolf, its options, and a toy OOD set it separates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detector_helpers import K, items, make_unet
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from torch import nn

from monai_ood.detectors.base import NotFittedError
from monai_ood.detectors.mahalanobis import MahalanobisDetector
from monai_ood.networks import PrototypeOODNet

BOTTLENECK = "model.1.submodule.1.submodule"  # of UNet(channels=(4, 8, 16), strides=(2, 2))


def reference_features(net: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Bottleneck features via an independent hook on a full forward pass, float64 numpy."""
    captured = []
    handle = dict(net.named_modules())[BOTTLENECK].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        net(images)
    handle.remove()
    return captured[0].double().numpy()


def test_mahalanobis_matches_numpy():
    net = make_unet(2)
    g = torch.Generator().manual_seed(0)
    train, test = torch.rand(10, 1, 32, 32, generator=g), torch.rand(3, 1, 32, 32, generator=g)
    detector = MahalanobisDetector(net, batch_size=4)  # 3 batches: tests concatenation
    assert detector.layer == BOTTLENECK
    with pytest.raises(NotFittedError):
        detector.predict(test)
    detector.fit(items(train))

    pooled = reference_features(net, train).mean(axis=(2, 3))
    lw = LedoitWolf().fit(pooled)
    np.testing.assert_allclose(detector.mean_.numpy(), pooled.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(detector.covariance_.numpy(), lw.covariance_, rtol=1e-4, atol=1e-8)
    assert 0 < detector.shrinkage_ <= 1 and detector.num_train_ == 10

    mean, precision = pooled.mean(0), np.linalg.inv(lw.covariance_)
    feats = reference_features(net, test)
    diff = feats.mean(axis=(2, 3)) - mean
    expected = np.sqrt(np.einsum("nd,de,ne->n", diff, precision, diff))
    out = detector.predict(test)
    np.testing.assert_allclose(out.image_score.numpy(), expected, rtol=1e-4)

    pixels = np.moveaxis(feats, 1, -1) - mean  # (B, h, w, C)
    low = np.sqrt(np.einsum("bhwd,de,bhwe->bhw", pixels, precision, pixels))[:, None]
    expected_map = F.interpolate(torch.from_numpy(low), size=(32, 32), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(out.score_map.numpy(), expected_map.numpy(), rtol=1e-4)


def test_mahalanobis_options():
    net = make_unet()
    train = items(torch.rand(6, 1, 32, 32))
    grid = MahalanobisDetector(net, pool_size=2).fit(train)
    assert grid.mean_.shape == (16 * 4,)
    out = grid.predict(torch.rand(2, 1, 32, 32))
    assert out.image_score.shape == (2,) and out.score_map is None
    wrapped = MahalanobisDetector(PrototypeOODNet(net, num_classes=K, head_channels=4))
    assert wrapped.layer == BOTTLENECK and wrapped.network is net
    with pytest.raises(ValueError, match="no module named"):
        MahalanobisDetector(net, layer="nope")
    with pytest.raises(ValueError, match="at least 2"):
        MahalanobisDetector(net).fit(train[:1])


def test_mahalanobis_separates_toy_ood():
    # An untrained network: batch norm in eval mode is the identity at initialisation, so the features
    # keep the intensity statistics (instance norm would remove them and leave little to separate).
    net = make_unet(4, norm="batch")
    g = torch.Generator().manual_seed(0)

    def ind(n):  # Gaussian noise around mid grey
        return (0.5 + 0.1 * torch.randn(n, 1, 32, 32, generator=g)).clamp(0, 1)

    def ood(n):  # a visibly different distribution: sparse bright speckle on black
        return (torch.rand(n, 1, 32, 32, generator=g) > 0.9).float()

    detector = MahalanobisDetector(net).fit(items(ind(40)))
    scores_in = detector.predict(ind(20)).image_score.numpy()
    scores_out = detector.predict(ood(20)).image_score.numpy()
    labels = np.r_[np.zeros(20), np.ones(20)]
    assert roc_auc_score(labels, np.r_[scores_in, scores_out]) > 0.9
