"""The energy score (monai_ood.detectors.energy) against float64 numpy, at two temperatures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detector_helpers import FixedLogits, foreground_reference
from scipy.special import logsumexp

from monai_ood.detectors.energy import EnergyDetector


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
