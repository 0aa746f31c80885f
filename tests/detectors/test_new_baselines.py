"""Multi-layer feature statistics, intensity histograms (IHF) and ensemble pairwise Dice, against
independent float64 numpy / scikit-learn references."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from torch import nn

from monai_ood.detectors import DETECTORS
from monai_ood.detectors.base import NotFittedError
from monai_ood.detectors.ensemble import EnsembleDetector, EnsembleDiceDetector, pairwise_dice
from monai_ood.detectors.feature_statistics import FeatureStatisticsDetector
from monai_ood.detectors.intensity_histogram import IntensityHistogramDetector
from monai_ood.networks import PrototypeOODNet

K = 3
# the encoder stages of UNet(channels=(4, 8, 16), strides=(2, 2)), shallow to deep, and its decoder
STAGES = ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule"]
DECODER = ["model.1.submodule.2", "model.2"]


def make_unet(seed: int = 0, norm="instance") -> UNet:
    torch.manual_seed(seed)
    return UNet(2, 1, K, channels=(4, 8, 16), strides=(2, 2), norm=norm).eval()


def items(images) -> list[dict]:
    images = np.asarray(images, dtype=np.float32)
    return [{"image": image, "label": np.zeros((1, *image.shape[1:]), np.int64)} for image in images]


def rand(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


class FixedLogits(nn.Module):
    """A member stub returning known logits, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: x.shape[0]]


def mahalanobis_numpy(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    lw = LedoitWolf().fit(train)
    diff, precision = x - train.mean(0), np.linalg.inv(lw.covariance_)
    return np.sqrt(np.einsum("nd,de,ne->n", diff, precision, diff))


# -- feature statistics -----------------------------------------------------------------------------------
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


# -- intensity histograms ---------------------------------------------------------------------------------
def brain_like(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Two-tissue discs on a zero background: a crude stand-in for skull-stripped slices."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        radius, (cy, cx) = rng.uniform(9, 13), size / 2 + rng.normal(0, 1, 2)
        d = np.hypot(yy - cy, xx - cx)
        image = np.where(d < 0.6 * radius, 0.7, 0.35) * (d < radius)
        out[i, 0] = np.clip(image + (d < radius) * rng.normal(0, 0.05, d.shape), 0, 1)
    return out


@pytest.mark.parametrize("foreground", ["nonzero", "all"])
def test_histograms_match_numpy(foreground):
    images = brain_like(4, 0)
    images[1, 0, :4] = 1.2  # out of range: counted in the last bin after clipping
    images[2] = 0.0  # no foreground at all
    detector = IntensityHistogramDetector(bins=16, foreground=foreground, threshold=1e-3)
    got = detector.histograms(torch.from_numpy(images))
    assert got.shape == (4, 16) and got.dtype == np.float64
    for i, image in enumerate(images.astype(np.float64)):
        values = image[image > 1e-3] if foreground == "nonzero" else image.ravel()
        if values.size == 0:
            np.testing.assert_array_equal(got[i], 0)
            continue
        expected, _ = np.histogram(np.clip(values, 0, 1), bins=16, range=(0, 1), density=True)
        np.testing.assert_allclose(got[i], expected, rtol=1e-12, atol=1e-12)


def test_histogram_mahalanobis_matches_numpy():
    train, test = brain_like(30, 1), brain_like(5, 2)
    detector = IntensityHistogramDetector(bins=12)
    with pytest.raises(NotFittedError):
        detector.predict(torch.from_numpy(test))
    detector.fit(items(train))

    def hist(x):
        return np.stack([np.histogram(i[i > 1e-3], 12, (0, 1), density=True)[0] for i in x])

    np.testing.assert_allclose(
        detector.covariance_.numpy(), LedoitWolf().fit(hist(train)).covariance_, rtol=1e-6
    )
    out = detector.predict(torch.from_numpy(test))
    assert out.score_map is None and out.image_score.shape == (5,) and out.image_score.dtype == torch.float32
    np.testing.assert_allclose(out.image_score.numpy(), mahalanobis_numpy(hist(test), hist(train)), rtol=1e-4)

    reduced = IntensityHistogramDetector(bins=12, pca=4).fit(items(train))
    pca = PCA(n_components=4, svd_solver="full").fit(hist(train))
    expected = mahalanobis_numpy(pca.transform(hist(test)), pca.transform(hist(train)))
    np.testing.assert_allclose(
        reduced.predict(torch.from_numpy(test)).image_score.numpy(), expected, rtol=1e-4
    )
    assert IntensityHistogramDetector(bins=12, pca=0.99).fit(items(train)).pca_.n_components_ <= 12


def test_histogram_scores_shifted_images_higher():
    detector = IntensityHistogramDetector().fit(items(brain_like(40, 3)))
    held_out = torch.from_numpy(brain_like(20, 4))
    shifted = {
        "constant": torch.full_like(held_out, 0.5),
        "inverted": 1 - held_out,
        "inverted inside the brain": torch.where(held_out > 1e-3, 1 - held_out, held_out),
    }
    scores_in = detector.predict(held_out).image_score.numpy()
    labels = np.r_[np.zeros(20), np.ones(20)]
    for name, images in shifted.items():
        scores_out = detector.predict(images).image_score.numpy()
        assert roc_auc_score(labels, np.r_[scores_in, scores_out]) == 1.0, name


def test_histogram_options():
    with pytest.warns(UserWarning, match="Quantisation"):
        IntensityHistogramDetector(bins=500)
    with pytest.raises(ValueError, match="bins"):
        IntensityHistogramDetector(bins=1)
    with pytest.raises(ValueError, match="pca"):
        IntensityHistogramDetector(pca=1.5)
    with pytest.raises(ValueError):
        IntensityHistogramDetector(foreground="brain")
    with pytest.raises(ValueError, match="at least 2"):
        IntensityHistogramDetector().fit(items(brain_like(1, 0)))
    with pytest.raises(ValueError, match="exceed"):
        IntensityHistogramDetector(bins=8, pca=20).fit(items(brain_like(5, 0)))


# -- ensemble pairwise Dice -------------------------------------------------------------------------------
def pairwise_dice_reference(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """Brute force: loop over images, pairs and foreground classes; empty vs empty = 1."""
    out = []
    for b in range(masks.shape[1]):
        pairs = []
        for i, j in itertools.combinations(range(len(masks)), 2):
            per_class = []
            for k in range(1, num_classes):
                a, c = masks[i, b] == k, masks[j, b] == k
                total = a.sum() + c.sum()
                per_class.append(1.0 if total == 0 else 2.0 * (a & c).sum() / total)
            pairs.append(np.mean(per_class))
        out.append(np.mean(pairs))
    return np.array(out)


def test_pairwise_dice_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, K, 16, 16, generator=g) * 2  # 4 members, 3 images
    logits[:, 2, 0] += 100  # image 2: every member predicts background only (empty vs empty = 1)
    logits[0, 1, 0] += 100  # image 1: member 0 predicts nothing, the others something
    masks = logits.argmax(2)
    expected = pairwise_dice_reference(masks.numpy(), K)
    got = pairwise_dice(masks, K)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert got[2] == 1.0

    detector = EnsembleDiceDetector([FixedLogits(member) for member in logits])
    out = detector.predict(torch.zeros(3, 1, 16, 16))
    np.testing.assert_allclose(out.image_score.numpy(), 1 - expected, rtol=1e-6, atol=1e-7)
    assert out.image_score[2] == 0.0
    m = masks.numpy()  # score map: fraction of members not voting for the majority label
    votes = np.stack([(m == k).sum(0) for k in range(K)])
    np.testing.assert_allclose(out.score_map[:, 0].numpy(), 1 - votes.max(0) / 4, atol=1e-7)


def test_ensemble_dice_of_identical_members_is_zero_and_flags_restored():
    net = make_unet(5).train()
    detector = EnsembleDiceDetector([net, copy.deepcopy(net), copy.deepcopy(net)])
    out = detector.predict(rand(2, 3))
    assert torch.equal(out.image_score, torch.zeros(2)) and out.score_map.shape == (2, 1, 32, 32)
    assert torch.equal(out.score_map, torch.zeros_like(out.score_map))
    assert all(m.training for m in net.modules())
    different = EnsembleDiceDetector([make_unet(s) for s in range(3)]).predict(rand(2, 3))
    assert (different.image_score > 0).all() and (different.image_score <= 1).all()
    with pytest.raises(ValueError, match="at least two"):
        EnsembleDiceDetector([net])
    with pytest.raises(ValueError, match="disagree"):
        EnsembleDiceDetector([net, UNet(2, 1, 2, channels=(4, 8), strides=(2,))]).predict(rand(1, 3))
    assert all(m.training for m in net.modules())  # restored after the error too


def test_ensemble_entropy_unchanged_by_the_refactor():
    members = [make_unet(s) for s in range(3)]
    images = rand(2, 4)
    probs = torch.stack([m(images).softmax(1) for m in members]).mean(0)
    entropy = -(probs * probs.log()).sum(1)
    torch.testing.assert_close(EnsembleDetector(members).predict(images).score_map[:, 0], entropy)


def test_registry_entries():
    assert DETECTORS["feature_statistics"] is FeatureStatisticsDetector
    assert DETECTORS["intensity_histogram"] is IntensityHistogramDetector
    assert DETECTORS["ensemble_dice"] is EnsembleDiceDetector
    assert DETECTORS["ensemble"] is EnsembleDetector
    assert FeatureStatisticsDetector.requires_fit and IntensityHistogramDetector.requires_fit
    assert not EnsembleDiceDetector.requires_fit
