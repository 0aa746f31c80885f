"""Fixtures of the detector tests (their helper functions are in ``detector_helpers.py``)."""

from __future__ import annotations

import pytest
import torch
from detector_helpers import K


@pytest.fixture(scope="module")
def known_logits() -> torch.Tensor:
    """Image 0 mostly foreground, image 1 with some foreground, image 2 with none."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, K, 32, 32, generator=g) * 2
    logits[1, 0] += 2.0
    logits[2, 0] = logits[2, 1:].max(dim=0).values + 0.5 + torch.rand(32, 32, generator=g)
    assert (logits[2].argmax(0) == 0).all() and (logits[1].argmax(0) != 0).any()
    return logits
