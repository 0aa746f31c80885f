"""Softmax entropy (monai_ood.detectors.entropy) against float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detector_helpers import FixedLogits, K, foreground_reference
from scipy.special import softmax

from monai_ood.detectors.entropy import EntropyDetector


def test_entropy_matches_numpy(known_logits):
    out = EntropyDetector(FixedLogits(known_logits)).predict(torch.zeros(3, 1, 32, 32))
    z = known_logits.double().numpy()
    p = softmax(z, axis=1)
    pixel = -(p * np.log(p)).sum(1)
    expected = foreground_reference(pixel, z, lambda i: np.log(K))
    np.testing.assert_allclose(out.image_score.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert out.image_score[2] == pytest.approx(np.log(K))
    np.testing.assert_allclose(out.score_map[:, 0].numpy(), pixel, atol=1e-5)
