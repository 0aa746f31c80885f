"""The nnU-Net calibration record (monai_ood.integrations.nnunet.calibration): bound to the fold's weights and
detector, its Weibull fitted on the detector's tile maps recomputed here, and stale or old-format
records refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nnunet_helpers import require_nnunet

require_nnunet()

from monai_ood.calibration import Calibration, WeibullCalibrator, fingerprint  # noqa: E402
from monai_ood.integrations.nnunet import (  # noqa: E402
    fit_calibration,
    fit_detector,
    load_calibration,
    map_values,
    sample_patches,
)


def test_the_calibration_record_is_bound_to_weights_and_detector(fitted, tmp_path):
    net, detector, cases = fitted
    calibration = fit_calibration(detector, net, [cases["c3"][0]], (16, 16, 16), 0.5, {"fold": 0})
    path = calibration.save(tmp_path / "ood_calibration.json")
    record = json.loads(path.read_text())
    assert (record["map"], record["front_end"], record["metadata"]) == ("fused", "nnunet", {"fold": 0})
    assert record["fingerprint"] == fingerprint(net.state_dict(), detector.to_state())
    # the values it was fitted on: the detector's maps of the case's tiles, recomputed here
    values = torch.cat(list(map_values(detector, cases["c3"][0], (16, 16, 16))))
    reference = WeibullCalibrator().fit(values)
    assert calibration.weibull.shape == pytest.approx(reference.shape)
    loaded = load_calibration(path, net.state_dict(), detector)
    assert isinstance(loaded, Calibration) and loaded.weibull.scale == pytest.approx(
        calibration.weibull.scale
    )
    assert load_calibration(tmp_path / "missing.json", net, detector) is None


def test_a_stale_calibration_is_refused_in_one_line(fitted, tmp_path):
    net, detector, cases = fitted
    path = fit_calibration(detector, net, [cases["c3"][0]], (16, 16, 16)).save(tmp_path / "cal.json")
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    weights["backbone.encoder.stages.0.0.convs.0.conv.weight"] += 1e-3  # a retrained fold
    with pytest.raises(ValueError) as error:
        load_calibration(path, weights, detector, remedy="calibrate again with: CMD")
    message = str(error.value)
    assert (
        "\n" not in message and "other weights" in message and message.endswith("(calibrate again with: CMD)")
    )
    refit = fit_detector(net, detector_items(cases, 0), detector_items(cases, 1), num_classes=3, fusion="max")
    with pytest.raises(ValueError, match="another detector"):  # same weights, another detector
        load_calibration(path, net, refit)


def detector_items(cases, seed):
    return sample_patches(sorted(cases), cases.__getitem__, (16, 16, 16), 4, seed=seed)


def test_an_old_format_calibration_is_refused_in_one_line(fitted, tmp_path):
    net, detector, _ = fitted
    path = tmp_path / "ood_calibration.json"  # what monai-ood wrote before the record: a bare Weibull fit
    WeibullCalibrator().fit(np.random.default_rng(0).weibull(2.0, 500)).save(path)
    with pytest.raises(ValueError) as error:
        load_calibration(path, net, detector, remedy="CMD")
    assert "\n" not in str(error.value) and "bare Weibull fit" in str(error.value)
