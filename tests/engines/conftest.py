"""Fixtures of the engine tests, each made once for every test module that reads it: the training items, a
trained two-epoch run (``run``) and a ``model.pt`` with a previously stored calibration on which
``fit_detector`` ran (``fitted``). Their helpers are in ``engine_helpers.py``."""

import numpy as np
import pytest
from engine_helpers import (
    CLASS_NAMES,
    PREPROCESSING,
    random_items,
    save_tiny_model,
    training_config,
    training_items,
)
from scipy import stats

from monai_ood.calibration import WeibullCalibrator
from monai_ood.engines import load_model, train
from monai_ood.engines.posthoc import fit_detector


@pytest.fixture(scope="session")
def data():
    return training_items(12, seed=0), training_items(4, seed=1)


@pytest.fixture(scope="session")
def run(data, tmp_path_factory):
    train_items, val_items = data
    copies = [{k: v.copy() for k, v in item.items()} for item in train_items + val_items]
    output = tmp_path_factory.mktemp("run")
    result = train(
        train_items,
        val_items,
        training_config(),
        output,
        PREPROCESSING,
        class_names=CLASS_NAMES,
        progress=False,
    )
    # the items are inputs: training must not have modified them
    for before, after in zip(copies, train_items + val_items, strict=True):
        for key in ("image", "label"):
            np.testing.assert_array_equal(before[key], after[key])
    return output, result


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """A model.pt with a previously stored calibration, then fit_detector on it."""
    path = tmp_path_factory.mktemp("posthoc") / "model.pt"
    old_calibration = WeibullCalibrator().fit(stats.weibull_min.rvs(1.5, scale=4.0, size=500, random_state=0))
    weights = save_tiny_model(path, calibration=old_calibration)
    assert load_model(path, device="cpu").calibrator is not None  # there is one to drop
    train, val = random_items(5, seed=1), random_items(4, seed=2)
    detector = fit_detector(path, train, val, device="cpu")
    calibrator_after_fit = load_model(path, device="cpu").calibrator
    return path, detector, weights, train, val, calibrator_after_fit
