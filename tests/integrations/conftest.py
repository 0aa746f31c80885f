"""Fixtures of the nnU-Net integration's unit tests (their helpers are in ``nnunet_helpers.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fitted():
    """The wrapped network (deep supervision on, as trained) and its default detector fitted on patches (read
    by test_nnunet_detector, test_nnunet_sliding_window, test_nnunet_calibration, test_nnunet_predictor)."""
    from nnunet_helpers import case, require_nnunet, wrapped

    require_nnunet()
    from monai_ood.integrations.nnunet import fit_detector, sample_patches

    net = wrapped()
    cases = {f"c{i}": case((18, 20, 22), seed=i, foreground=(9, 10, 11)) for i in range(4)}
    train = sample_patches(["c0", "c1", "c2"], cases.__getitem__, (16, 16, 16), 6, seed=0)
    val = sample_patches(["c3"], cases.__getitem__, (16, 16, 16), 4, seed=1)
    detector = fit_detector(net, train, val, num_classes=3, fusion="sum")
    return net, detector, cases
