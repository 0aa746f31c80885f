"""FCDD (monai_ood.detectors.fcdd) on a tiny 2D problem (1x32x32 images, UNet 4-8-16): the network
wrapper, the pseudo-Huber map and the loss against float64 numpy, and training that separates InD
images from synthesised outliers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detector_helpers import OUTLIER_OPS, SIZE, stack, tiny_unet, toy_items
from monai.networks.nets import UNet
from sklearn.metrics import roc_auc_score

from monai_ood.detectors.base import NotFittedError
from monai_ood.detectors.fcdd import FCDDDetector, FCDDLoss, FCDDNet, pseudo_huber, train_fcdd
from monai_ood.transforms import OutlierSynthesis


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
