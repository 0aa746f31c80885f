"""The autoencoder detector (monai_ood.detectors.autoencoder) on a tiny 2D problem (1x32x32 images):
training lowers the held-out reconstruction error, OOD images score higher, seeded replay, padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detector_helpers import SIZE, stack, toy_items
from sklearn.metrics import roc_auc_score

from monai_ood.detectors.autoencoder import AutoencoderDetector
from monai_ood.detectors.base import NotFittedError

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
