"""The post-hoc step of the bundles (monai_ood.bundle.posthoc, ``configs/calibrate.json``): detector.pt and
calibration.json are the core's detector file and calibration record, bound to the weights and the
detector (the Weibull against scipy's fit); model files are loaded or refused in one line naming the
step to run, and stale or foreign calibrations are refused."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from bundle_helpers import labelled_items as _items
from bundle_helpers import one_line as _one_line
from bundle_helpers import tiny_detector as _detector
from bundle_helpers import tiny_net as _tiny_net

from monai_ood.bundle import (
    TrainingForward,
    calibrate_detector,
    fit_detector,
    load_weights,
    require_calibration,
    require_checkpoint,
    require_detector,
    unwrap_network,
)
from monai_ood.calibration import Calibration, fingerprint
from monai_ood.engines.checkpoint import load_detector


def test_fit_and_calibrate_write_the_cores_records(model_files):
    """detector.pt is the core's detector file, calibration.json the core's record of the detector's map,
    bound to these weights and this detector; its Weibull is scipy's fit of the maps, computed one slice
    at a time."""
    from scipy import stats

    f = model_files
    stored = torch.load(f.folder / "detector.pt", weights_only=True)
    reloaded = load_detector(f.folder / "detector.pt", f.net)
    images = torch.from_numpy(np.stack([item["image"] for item in f.val]))
    for ours, theirs in zip(
        reloaded.segment_and_score(images), f.detector.segment_and_score(images), strict=True
    ):
        if hasattr(ours, "image_score"):
            ours, theirs = (ours.image_score, ours.score_map), (theirs.image_score, theirs.score_map)
        torch.testing.assert_close(ours, theirs)

    record = Calibration.load(f.folder / "calibration.json")
    assert (record.map, record.front_end) == ("fused", "bundle")
    assert (
        record.fingerprint
        == fingerprint(f.net, f.detector.to_state())
        == fingerprint(f.net.state_dict(), stored)
    )
    assert record.metadata == {"validation_images": len(f.val)}
    with torch.no_grad():
        maps = np.concatenate(
            [
                f.detector.segment_and_score(torch.from_numpy(item["image"][None]))[2]
                .double()
                .numpy()
                .ravel()
                for item in f.val
            ]
        )
    shape, _, scale = stats.weibull_min.fit(maps, floc=0)
    assert record.weibull.num_samples == maps.size
    assert record.weibull.shape == pytest.approx(shape, rel=2e-3)
    assert record.weibull.scale == pytest.approx(scale, rel=2e-3)
    # a wrapped network (DDP, TrainingForward) is the same network: the same fingerprint
    wrapped = calibrate_detector(TrainingForward(f.net), f.detector, f.val, f.folder / "again.json")
    assert wrapped.fingerprint == record.fingerprint


def test_fit_detector_refuses_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as refused:
        fit_detector(_detector(_tiny_net()), _items(4, 0), _items(1, 1), tmp_path / "detector.pt")
    assert "at least 2 validation images" in _one_line(refused)
    assert not (tmp_path / "detector.pt").exists()


def test_load_weights(model_files, tmp_path):
    fresh = load_weights(TrainingForward(_tiny_net()), model_files.folder / "model.pt").network
    for key, value in model_files.net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # MONAI's CheckpointSaver with several objects stores {"model": state dict}
    torch.save({"model": model_files.net.state_dict()}, tmp_path / "model.pt")
    assert fingerprint(load_weights(_tiny_net(), tmp_path / "model.pt")) == fingerprint(model_files.net)
    with pytest.raises(SystemExit) as refused:
        load_weights(_tiny_net(channels=(4, 8, 32)), model_files.folder / "model.pt")
    assert re.search(r"do not fit this config's network .*--backbone#", _one_line(refused))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as refused:
        load_weights(_tiny_net(), tmp_path / "broken.pt")
    assert "not a readable state dict" in _one_line(refused)
    with pytest.raises(TypeError, match="PrototypeOODNet"):
        unwrap_network(torch.nn.Conv2d(1, 1, 1))


def test_missing_model_files_are_refused_in_one_line_naming_the_step(model_files, tmp_path):
    with pytest.raises(SystemExit) as refused:
        require_checkpoint(tmp_path / "model.pt")
    assert "configs/train.json" in _one_line(refused)
    with pytest.raises(SystemExit) as refused:
        load_weights(_tiny_net(), tmp_path / "model.pt")
    assert "no trained model" in _one_line(refused)
    assert require_checkpoint(model_files.folder / "model.pt") == str(model_files.folder / "model.pt")
    with pytest.raises(SystemExit) as refused:
        require_detector(tmp_path / "detector.pt", model_files.net)
    assert re.search(r"no default detector .*configs/calibrate\.json", _one_line(refused))
    with pytest.raises(SystemExit) as refused:
        require_calibration(tmp_path / "calibration.json", model_files.net, model_files.detector)
    assert re.search(r"no calibration .*configs/calibrate\.json", _one_line(refused))


def _retrained(f, path):
    net = _tiny_net().eval()
    net.load_state_dict(f.net.state_dict())
    with torch.no_grad():
        next(net.parameters()).add_(1e-3)
    return net, load_detector(f.folder / "detector.pt", net), path


def _refitted(f, path):
    return f.net, _detector(f.net, seed=1).fit(f.train, f.val[:3]), path


def _old_format(f, path):
    path.write_text(json.dumps(f.calibration.weibull.to_dict()))
    return f.net, f.detector, path


def _head_map(f, path):
    Calibration(f.calibration.weibull, "head", f.calibration.fingerprint, "bundle").save(path)
    return f.net, f.detector, path


def _broken(f, path):
    path.write_text("{")
    return f.net, f.detector, path


@pytest.mark.parametrize(
    "case, message",
    [
        (_retrained, "fitted for other weights or another detector"),
        (_refitted, "fitted for other weights or another detector"),
        (_old_format, "bare Weibull fit"),
        (_head_map, "calibrates the 'head' map, this model scores with the 'fused' map"),
        (_broken, "is not valid JSON"),
    ],
)
def test_a_stale_or_foreign_calibration_is_refused_in_one_line(case, message, model_files, tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text((model_files.folder / "calibration.json").read_text())
    net, detector, path = case(model_files, path)
    with pytest.raises(SystemExit) as refused:
        require_calibration(path, net, detector)
    line = _one_line(refused)
    assert message in line and line.endswith("configs/calibrate.json']\"") and "calibrate again" not in line


def test_require_returns_the_detector_and_calibration_of_these_weights(model_files):
    f = model_files
    detector = require_detector(f.folder / "detector.pt", TrainingForward(f.net))
    assert fingerprint(detector.to_state()) == fingerprint(f.detector.to_state())
    calibration = require_calibration(f.folder / "calibration.json", f.net, detector)
    assert calibration.to_dict() == f.calibration.to_dict()
