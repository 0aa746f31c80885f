"""nnU-Net's predictor with the detector's maps (monai_ood.integrations.nnunet.predictor), in-process on a
fitted detector: the maps of several folds are averaged and each fold's map is calibrated with its own
Weibull (against scipy's CDF in float64). Prediction from a trained model folder, its files and its
refusals run end to end in test_nnunet_integration.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunet_helpers import require_nnunet
from scipy import stats

require_nnunet()

from monai_ood.integrations.nnunet import (  # noqa: E402
    fit_calibration,
    fit_detector,
    nnUNetPrototypeOODPredictor,
    sample_patches,
    score_case,
)


def test_predict_ood_maps_averages_the_folds_and_calibrates_each_with_its_own_record(fitted):
    net, detector, cases = fitted
    patches = (16, 16, 16)
    # a second fold: the same weights, a detector fitted on other patches (so other map scales)
    train = sample_patches(["c0", "c1", "c2"], cases.__getitem__, patches, 6, seed=2)
    other = fit_detector(
        net, train, sample_patches(["c3"], cases.__getitem__, patches, 4, seed=3), num_classes=3
    )
    detectors = [detector, other]
    calibrations = [fit_calibration(d, net, [cases["c3"][0]], patches) for d in detectors]

    predictor = nnUNetPrototypeOODPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.network = net
    predictor.configuration_manager = type("Configuration", (), {"patch_size": list(patches)})()
    weights = {key: value.clone() for key, value in net.state_dict().items()}
    predictor.list_of_parameters = [weights, weights]
    with pytest.raises(RuntimeError, match="no detectors for its folds"):
        predictor.predict_ood_maps(torch.randn(1, 20, 18, 24))
    predictor.detectors, predictor.calibrations = detectors, calibrations

    data = torch.from_numpy(cases["c1"][0])  # (1, 18, 20, 22): larger than one patch
    maps = predictor.predict_ood_maps(data)
    folds = [
        score_case(d, data, patches, predictor.tile_step_size, predictor.use_gaussian) for d in detectors
    ]
    assert not torch.allclose(folds[0].score_map, folds[1].score_map)  # two folds that differ
    assert maps["score"].shape == (18, 20, 22)
    np.testing.assert_allclose(
        maps["score"].numpy(),
        np.mean([f.score_map.double().numpy() for f in folds], axis=0),
        rtol=1e-5,
        atol=1e-6,
    )
    assert maps["image_score"] == pytest.approx(np.mean([f.image_score for f in folds]), rel=1e-6)
    expected = np.mean(
        [
            stats.weibull_min.cdf(f.score_map.double().numpy(), c.weibull.shape, scale=c.weibull.scale)
            for f, c in zip(folds, calibrations, strict=True)
        ],
        axis=0,
    )
    np.testing.assert_allclose(maps["calibrated"].numpy(), expected, rtol=1e-4, atol=1e-6)
    predictor.calibrations = [calibrations[0], None]  # A_xi only when every fold has a calibration
    assert predictor.predict_ood_maps(data)["calibrated"] is None
