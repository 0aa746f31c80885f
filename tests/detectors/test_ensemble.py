"""Deep ensembles (monai_ood.detectors.ensemble): the mean-softmax entropy and the pairwise Dice of the
members' segmentations, against single-network entropy and a brute-force float64 reference."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from detector_helpers import FixedLogits, K, make_unet, rand
from monai.networks.nets import UNet

from monai_ood.detectors.ensemble import EnsembleDetector, EnsembleDiceDetector, pairwise_dice
from monai_ood.detectors.entropy import EntropyDetector


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
