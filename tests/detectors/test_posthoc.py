"""Post-hoc detectors: MSP, entropy, energy, MC dropout, deep ensemble, single-Gaussian Mahalanobis."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from scipy.special import logsumexp, softmax
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from torch import nn

from monai_ood.detectors.base import NotFittedError
from monai_ood.detectors.energy import EnergyDetector
from monai_ood.detectors.ensemble import EnsembleDetector
from monai_ood.detectors.entropy import EntropyDetector
from monai_ood.detectors.mahalanobis import MahalanobisDetector
from monai_ood.detectors.mc_dropout import MCDropoutDetector
from monai_ood.detectors.msp import MaxSoftmaxDetector
from monai_ood.networks import PrototypeOODNet

K = 3
BOTTLENECK = "model.1.submodule.1.submodule"  # of UNet(channels=(4, 8, 16), strides=(2, 2))


def make_unet(
    seed: int = 0, spatial_dims: int = 2, dropout: float = 0.0, out_channels: int = K, norm="instance"
) -> UNet:
    torch.manual_seed(seed)
    net = UNet(spatial_dims, 1, out_channels, channels=(4, 8, 16), strides=(2, 2), dropout=dropout, norm=norm)
    return net.eval()


class FixedLogits(nn.Module):
    """A network stub returning known logits, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: x.shape[0]]


def items(images: torch.Tensor) -> list[dict]:
    return [{"image": image.numpy(), "label": np.zeros((1, *image.shape[1:]), np.int64)} for image in images]


@pytest.fixture(scope="module")
def known_logits() -> torch.Tensor:
    """Image 0 mostly foreground, image 1 with some foreground, image 2 with none."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, K, 32, 32, generator=g) * 2
    logits[1, 0] += 2.0
    logits[2, 0] = logits[2, 1:].max(dim=0).values + 0.5 + torch.rand(32, 32, generator=g)
    assert (logits[2].argmax(0) == 0).all() and (logits[1].argmax(0) != 0).any()
    return logits


def foreground_reference(pixel: np.ndarray, logits: np.ndarray, empty) -> np.ndarray:
    """Float64 numpy: mean over argmax != 0 per image; ``empty(i)`` where there is no foreground."""
    out = []
    for i in range(len(pixel)):
        mask = logits[i].argmax(0) != 0
        out.append(pixel[i][mask].mean() if mask.any() else empty(i))
    return np.array(out)


# -- shapes for every detector ---------------------------------------------------------------------------
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


# -- MSP / entropy / energy against float64 numpy --------------------------------------------------------
def test_msp_matches_numpy(known_logits):
    out = MaxSoftmaxDetector(FixedLogits(known_logits)).predict(torch.zeros(3, 1, 32, 32))
    z = known_logits.double().numpy()
    pixel = 1 - softmax(z, axis=1).max(1)
    expected = foreground_reference(pixel, z, lambda i: 1 - 1 / K)
    np.testing.assert_allclose(out.image_score.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert out.image_score[2] == pytest.approx(1 - 1 / K)
    np.testing.assert_allclose(out.score_map[:, 0].numpy(), pixel, atol=1e-6)


def test_entropy_matches_numpy(known_logits):
    out = EntropyDetector(FixedLogits(known_logits)).predict(torch.zeros(3, 1, 32, 32))
    z = known_logits.double().numpy()
    p = softmax(z, axis=1)
    pixel = -(p * np.log(p)).sum(1)
    expected = foreground_reference(pixel, z, lambda i: np.log(K))
    np.testing.assert_allclose(out.image_score.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert out.image_score[2] == pytest.approx(np.log(K))
    np.testing.assert_allclose(out.score_map[:, 0].numpy(), pixel, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_energy_matches_numpy(known_logits, temperature):
    out = EnergyDetector(FixedLogits(known_logits), temperature=temperature).predict(
        torch.zeros(3, 1, 32, 32)
    )
    z = known_logits.double().numpy()
    pixel = -temperature * logsumexp(z / temperature, axis=1)
    expected = foreground_reference(pixel, z, lambda i: pixel[i].max())
    np.testing.assert_allclose(out.image_score.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.score_map[:, 0].numpy(), pixel, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        EnergyDetector(FixedLogits(known_logits), temperature=0)


def test_low_resolution_logits_are_upsampled(known_logits):
    out = EntropyDetector(FixedLogits(known_logits[:, :, ::2, ::2].clone())).predict(
        torch.zeros(3, 1, 32, 32)
    )
    assert out.score_map.shape == (3, 1, 32, 32)


# -- MC dropout ------------------------------------------------------------------------------------------
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


# -- ensemble --------------------------------------------------------------------------------------------
def test_ensemble_of_identical_members_equals_entropy():
    net = make_unet(5)
    images = torch.rand(3, 1, 32, 32)
    ensemble = EnsembleDetector([net, copy.deepcopy(net), copy.deepcopy(net)]).predict(images)
    single = EntropyDetector(net).predict(images)
    torch.testing.assert_close(ensemble.image_score, single.image_score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ensemble.score_map, single.score_map, rtol=1e-5, atol=1e-6)


def test_ensemble_member_checks():
    with pytest.raises(ValueError, match="at least one"):
        EnsembleDetector([])
    mismatched = EnsembleDetector([make_unet(), make_unet(out_channels=2)])
    with pytest.raises(ValueError, match="disagree"):
        mismatched.predict(torch.rand(1, 1, 32, 32))


# -- Mahalanobis -----------------------------------------------------------------------------------------
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
