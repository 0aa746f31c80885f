"""FCDD, autoencoder and MECAM detectors on tiny 2D problems (1x32x32 images, UNet 4-8-16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from sklearn.metrics import roc_auc_score

from monai_ood.detectors.autoencoder import AutoencoderDetector
from monai_ood.detectors.base import NotFittedError
from monai_ood.detectors.fcdd import FCDDDetector, FCDDLoss, FCDDNet, pseudo_huber, train_fcdd
from monai_ood.detectors.mecam import MECAMDetector, find_decoder_exits
from monai_ood.transforms import OutlierSynthesis

SIZE = 32
# Outlier ops for the toy runs (elastic and swap work too, but warn and cost more at 32x32; gamma is
# nearly invisible behind the UNet's instance norms).
OUTLIER_OPS = ("rotate180", "vflip", "patch_permute")


def toy_items(n: int, seed: int) -> list[dict]:
    """A bright bar along the top and a disc (label 1) with an intensity ramp: upright structure."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    items = []
    for _ in range(n):
        cy, cx = rng.uniform(13, 21, size=2)
        radius = rng.uniform(5, 8)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        image = np.where(inside, 0.4 + 0.4 * (yy - cy + radius) / (2 * radius), 0.0)
        image[2:5, 6:26] = 1.0
        image = image + rng.normal(0, 0.02, image.shape)
        items.append(
            {
                "image": np.clip(image, 0, 1).astype(np.float32)[None],
                "label": inside.astype(np.int64)[None],
            }
        )
    return items


def stack(items: list[dict]) -> torch.Tensor:
    return torch.from_numpy(np.stack([item["image"] for item in items]))


def tiny_unet() -> UNet:
    return UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2))


# ---------------------------------------------------------------- FCDD


def test_fcdd_net_keeps_backbone_keys_and_forward():
    torch.manual_seed(0)
    backbone = tiny_unet()
    keys = list(backbone.state_dict())
    net = FCDDNet(backbone)
    assert net.layer == "model.1.submodule.1.submodule"
    assert list(backbone.state_dict()) == keys
    assert [k.removeprefix("backbone.") for k in net.state_dict() if k.startswith("backbone.")] == keys
    assert {k for k in net.state_dict() if not k.startswith("backbone.")} == {
        "head.projection.conv.weight",
        "head.projection.conv.bias",
    }
    x = torch.rand(2, 1, SIZE, SIZE)
    net.eval()
    assert torch.equal(net(x), backbone(x))
    logits, ood = net.forward_with_ood(x)
    assert torch.equal(logits, backbone(x))
    assert ood.score_map.shape == (2, 1, 8, 8) and ood.score_map_upsampled.shape == (2, 1, SIZE, SIZE)
    assert torch.allclose(ood.image_score, net.ood(x).image_score)
    assert torch.allclose(ood.image_score, ood.score_map.mean(dim=(1, 2, 3)))


def test_pseudo_huber_matches_float64_reference():
    e = torch.tensor([-1e6, -50.0, -1.0, -1e-4, 0.0, 1e-4, 0.3, 1.0, 50.0, 1e6, 1e30], dtype=torch.float32)
    got = pseudo_huber(e)
    e64 = e.double().numpy()
    expected = np.sqrt(e64**2 + 1.0) - 1.0
    assert (got >= 0).all() and torch.isfinite(got).all()
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-6, atol=0)
    # the network's map is the pseudo-Huber of the 1x1-conv head output
    net = FCDDNet(tiny_unet())
    features = torch.randn(2, 16, 8, 8) * 10
    assert torch.equal(net.score_map(features), pseudo_huber(net.head(features)))


def test_fcdd_loss_matches_float64_numpy():
    gen = torch.Generator().manual_seed(0)
    ind = pseudo_huber(torch.randn(3, 1, 8, 8, generator=gen) * 2)
    out = pseudo_huber(torch.randn(5, 1, 8, 8, generator=gen) * 2)
    ind64, out64 = ind.double().numpy(), out.double().numpy()
    s_out = out64.reshape(5, -1).mean(axis=1)
    expected = ind64.reshape(3, -1).mean(axis=1).mean() - np.log(1.0 - np.exp(-s_out)).mean()
    loss = FCDDLoss()(ind, out)
    assert loss.shape == ()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(FCDDLoss()(ind)), ind64.mean(), rtol=1e-6)


@pytest.mark.parametrize("value", [0.0, 1e6, -1e6])
def test_fcdd_loss_finite_under_extreme_e(value):
    e_ind = torch.full((2, 1, 4, 4), value, requires_grad=True)
    e_out = torch.full((2, 1, 4, 4), value, requires_grad=True)
    loss = FCDDLoss()(pseudo_huber(e_ind), pseudo_huber(e_out))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(e_ind.grad).all() and torch.isfinite(e_out.grad).all()


@pytest.fixture(scope="module")
def fcdd_runs():
    # Residual units: with a single conv + instance norm at the bottleneck (UNet 4-8-16 without them)
    # FCDD separates the toy outliers only after several hundred steps.
    def factory():
        return UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)

    train, test = toy_items(32, seed=1), toy_items(16, seed=2)
    kwargs = dict(batch_size=8, seed=0, outlier_ops=OUTLIER_OPS, lr=3e-3)
    before = train_fcdd(factory, train, steps=0, **kwargs)
    after = train_fcdd(factory, train, steps=150, **kwargs)
    synthesis = OutlierSynthesis(ops=OUTLIER_OPS)
    synthesis.set_random_state(123)  # held-out outliers, made from held-out InD images
    images = stack(test)
    outliers = torch.stack([synthesis(image) for image in images])
    return before, after, images, outliers


def test_fcdd_training_separates_ind_from_outliers(fcdd_runs):
    before, after, images, outliers = fcdd_runs
    labels = np.r_[np.zeros(len(images)), np.ones(len(outliers))]
    results = {}
    for name, net in (("before", before), ("after", after)):
        detector = FCDDDetector(net)
        ind, ood = detector.predict(images), detector.predict(outliers)
        assert ind.score_map.shape == (16, 1, SIZE, SIZE) and (ind.score_map >= 0).all()
        auroc = roc_auc_score(labels, np.r_[ind.image_score.numpy(), ood.image_score.numpy()])
        results[name] = (ind.image_score.mean(), ood.image_score.mean(), auroc)
    (ind_before, ood_before, _), (ind_after, ood_after, auroc_after) = results["before"], results["after"]
    # F starts near 0 for every image (small 1x1-conv weights), so eq. (3) first lifts all scores
    # through its outlier term; what training must achieve is InD scores low *relative to* outliers.
    assert auroc_after > 0.95
    assert ood_after > 1.2 * ind_after
    assert ind_after / ood_after < 0.8 * (ind_before / ood_before)


def test_fcdd_detector_arguments():
    with pytest.raises(ValueError, match="either"):
        FCDDDetector()
    with pytest.raises(TypeError, match="FCDDNet"):
        FCDDDetector(tiny_unet())
    det = FCDDDetector(backbone_factory=tiny_unet, steps=2, batch_size=2, outlier_ops=OUTLIER_OPS)
    assert det.requires_fit and not det.is_fitted
    with pytest.raises(NotFittedError):
        det.predict(torch.rand(1, 1, SIZE, SIZE))
    det.fit(toy_items(4, seed=3))
    assert isinstance(det.net, FCDDNet)
    assert det.predict(torch.rand(2, 1, SIZE, SIZE)).image_score.shape == (2,)


# ---------------------------------------------------------------- autoencoder

AE_KWARGS = dict(channels=(8, 16, 32), strides=(2, 2, 2), batch_size=8, lr=3e-3, seed=0, device="cpu")


@pytest.fixture(scope="module")
def ae_runs():
    train, test = toy_items(32, seed=4), toy_items(24, seed=5)
    untrained = AutoencoderDetector(steps=0, **AE_KWARGS).fit(train)
    trained = AutoencoderDetector(steps=80, **AE_KWARGS).fit(train)
    return untrained, trained, stack(test)


def test_autoencoder_training_reduces_heldout_error(ae_runs):
    untrained, trained, test = ae_runs
    out = trained.predict(test)
    assert out.image_score.shape == (24,) and out.score_map.shape == (24, 1, SIZE, SIZE)
    assert torch.allclose(out.image_score, out.score_map.mean(dim=(1, 2, 3)))
    assert trained.history[-1] < trained.history[0]
    assert out.image_score.mean() < 0.5 * untrained.predict(test).image_score.mean()


def test_autoencoder_ood_scores_higher(ae_runs):
    _, trained, test = ae_runs
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(test.shape, generator=gen)
    inverted = 1.0 - test
    ind = trained.predict(test).image_score.numpy()
    for ood in (noise, inverted):
        scores = trained.predict(ood).image_score.numpy()
        labels = np.r_[np.zeros(len(ind)), np.ones(len(scores))]
        assert roc_auc_score(labels, np.r_[ind, scores]) > 0.9


def test_autoencoder_not_fitted_and_seeded_replay():
    det = AutoencoderDetector(steps=3, **AE_KWARGS)
    with pytest.raises(NotFittedError):
        det.predict(torch.rand(1, 1, SIZE, SIZE))
    train = toy_items(8, seed=6)
    images = stack(toy_items(4, seed=7))
    first = det.fit(train).predict(images)
    second = AutoencoderDetector(steps=3, **AE_KWARGS).fit(train).predict(images)
    assert torch.equal(first.image_score, second.image_score)
    assert torch.equal(first.score_map, second.score_map)


def test_autoencoder_pads_sizes_not_divisible_by_strides():
    det = AutoencoderDetector(steps=1, **AE_KWARGS).fit(toy_items(2, seed=8))
    out = det.predict(torch.rand(2, 1, 30, 27))
    assert out.score_map.shape == (2, 1, 30, 27) and torch.isfinite(out.image_score).all()


# ---------------------------------------------------------------- MECAM


@pytest.fixture()
def unet():
    torch.manual_seed(0)
    return tiny_unet()


def test_mecam_finds_unet_exits(unet):
    exits = find_decoder_exits(unet, torch.rand(1, 1, SIZE, SIZE))
    assert exits == ["model.1.submodule.2", "model.2"]  # the up blocks, deepest first
    det = MECAMDetector(unet)
    det.predict(torch.rand(1, 1, SIZE, SIZE))
    assert det.exits == exits and det.encoder_layer == "model.1.submodule.1.submodule"
    # wrappers are unwrapped to their backbone and hooked layer
    assert MECAMDetector(FCDDNet(unet)).network is unet


def test_mecam_shapes_finite_deterministic(unet):
    images = stack(toy_items(3, seed=9))
    unet.train()
    det = MECAMDetector(unet)
    first, second = det.predict(images), det.predict(images)
    assert first.image_score.shape == (3,) and first.score_map.shape == (3, 1, SIZE, SIZE)
    assert torch.isfinite(first.image_score).all() and torch.isfinite(first.score_map).all()
    assert torch.equal(first.image_score, second.image_score)
    assert torch.equal(first.score_map, second.score_map)
    # the network is left as it was: training mode, no hooks
    assert unet.training and all(not m._forward_hooks for m in unet.modules())
    # the two directions mirror each other
    mirrored = MECAMDetector(unet, ood_if="larger_change").predict(images)
    assert torch.allclose(mirrored.image_score, -first.image_score)


def test_mecam_cams_in_unit_interval(unet):
    det = MECAMDetector(unet)
    images = stack(toy_items(2, seed=10))
    cams = det.exit_cams(images)
    assert len(cams) == 2 and all(cam.shape == (2, 1, SIZE, SIZE) for cam in cams)
    combined = det.combined_cam(images)
    assert combined.shape == (2, 1, SIZE, SIZE)
    assert combined.min() >= 0 and combined.max() <= 1 and combined.max() > 0


def test_mecam_zero_cam_changes_nothing(unet):
    det = MECAMDetector(unet)
    images = stack(toy_items(2, seed=11))
    change, change_map = det.feature_change(images, cam=torch.zeros(2, 1, SIZE, SIZE))
    assert torch.equal(change, torch.zeros(2)) and torch.equal(change_map, torch.zeros(2, 1, SIZE, SIZE))
    change, _ = det.feature_change(images, cam=torch.ones(2, 1, SIZE, SIZE))  # everything masked
    assert (change > 0).all()


def test_mecam_hard_mask_and_arguments(unet):
    det = MECAMDetector(unet, exits=["model.2"], mask_threshold=0.5)
    out = det.predict(torch.rand(2, 1, SIZE, SIZE))
    assert torch.isfinite(out.image_score).all() and (out.image_score <= 0).all()
    with pytest.raises(ValueError, match="unknown"):
        MECAMDetector(unet, exits=["no.such.module"])
    with pytest.raises(ValueError, match="mask_threshold"):
        MECAMDetector(unet, mask_threshold=0.0)
