"""Maximum softmax probability (monai_ood.detectors.msp) against float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detector_helpers import FixedLogits, K, foreground_reference
from scipy.special import softmax

from monai_ood.detectors.msp import MaxSoftmaxDetector


def test_msp_matches_numpy(known_logits):
    out = MaxSoftmaxDetector(FixedLogits(known_logits)).predict(torch.zeros(3, 1, 32, 32))
    z = known_logits.double().numpy()
    pixel = 1 - softmax(z, axis=1).max(1)
    expected = foreground_reference(pixel, z, lambda i: 1 - 1 / K)
    np.testing.assert_allclose(out.image_score.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert out.image_score[2] == pytest.approx(1 - 1 / K)
    np.testing.assert_allclose(out.score_map[:, 0].numpy(), pixel, atol=1e-6)
