"""MECAM (monai_ood.detectors.mecam) on a tiny 2D UNet (1x32x32 images): the decoder exits it finds, its
CAMs and feature changes, determinism, the network left as it was, and its arguments."""

from __future__ import annotations

import pytest
import torch
from detector_helpers import SIZE, stack, tiny_unet, toy_items

from monai_ood.detectors.fcdd import FCDDNet
from monai_ood.detectors.mecam import MECAMDetector, find_decoder_exits


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
