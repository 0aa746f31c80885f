"""Weibull calibration of a saved model (monai_ood.engines.calibration.calibrate): fitted on the
feature-resolution maps A(x) of the validation images, or on the default detector's fused map when the
checkpoint holds one, and stored in the checkpoint; each fit against WeibullCalibrator on maps
recomputed here."""

import numpy as np
import pytest
import torch

from monai_ood.calibration import WeibullCalibrator
from monai_ood.engines import calibrate, load_model

# 32x32 images are too small for the elastic outlier's default control grid; TorchIO warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:The maximum displacement is larger:RuntimeWarning")


def test_calibration_is_stored_in_the_checkpoint(run, data):
    _, result = run
    _, val_items = data
    calibrator = calibrate(result.best_checkpoint, val_items, batch_size=3, device="cpu")
    loaded = load_model(result.best_checkpoint, device="cpu")
    assert loaded.calibrator is not None
    assert loaded.calibrator.to_dict() == calibrator.to_dict()
    assert loaded.metrics["val_mean_dice"] > 0  # the rest of the checkpoint is kept

    # the fit uses exactly the feature-resolution maps A(x) of every validation image
    images = torch.from_numpy(np.stack([item["image"] for item in val_items]))
    with torch.no_grad():
        score_map = loaded.net.ood(images).score_map
    assert calibrator.num_samples == score_map.numel() == 4 * 8 * 8
    reference = WeibullCalibrator().fit(
        score_map
    )  # one batch of 4 here, batches of 3 above: float noise only
    assert calibrator.shape == pytest.approx(reference.shape, rel=1e-5)
    assert calibrator.scale == pytest.approx(reference.scale, rel=1e-5)


def test_calibrate_fits_the_detectors_fused_map(fitted, tmp_path):
    path, val = tmp_path / "model.pt", fitted[4]
    path.write_bytes(fitted[0].read_bytes())  # a copy: the other tests read the uncalibrated file
    calibrator = calibrate(path, val, batch_size=3, device="cpu")
    detector = load_model(path, device="cpu").detector
    images = torch.from_numpy(np.stack([item["image"] for item in val]))
    maps = detector.segment_and_score(images)[2]  # the fused map on its own grid
    reference = WeibullCalibrator().fit(maps.double().numpy().ravel())
    assert calibrator.num_samples == maps.numel()
    assert calibrator.shape == pytest.approx(reference.shape, rel=1e-6)
    assert calibrator.scale == pytest.approx(reference.scale, rel=1e-6)
    stored = load_model(path, device="cpu").calibrator
    assert (stored.shape, stored.scale) == (calibrator.shape, calibrator.scale)
    # the head's map would give another fit: the comparison above tells the two apart
    with torch.no_grad():
        head = WeibullCalibrator().fit(
            load_model(path, device="cpu").net.ood(images).score_map.numpy().ravel()
        )
    assert head.scale != pytest.approx(reference.scale, rel=1e-3)
