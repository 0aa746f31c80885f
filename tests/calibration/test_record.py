"""The calibration record every front-end writes and reads (monai_ood.calibration.record)."""

import hashlib
import json

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from monai_ood.calibration import CALIBRATION_VERSION, Calibration, WeibullCalibrator, fingerprint


def _weibull():
    return WeibullCalibrator().fit(np.random.default_rng(0).weibull(1.5, 2000) * 3.0)


def _net(seed=0):
    torch.manual_seed(seed)
    return UNet(2, 1, 2, (4, 8), (2,))


def test_fingerprint_is_the_sha256_of_the_weights_in_order():
    net = _net()
    # independent reference: the same canonical bytes built by hand for a plain tensor dict
    state = {"b": torch.arange(3, dtype=torch.float32), "a": torch.ones(2, 2, dtype=torch.int64)}
    digest = hashlib.sha256()
    digest.update(b"{")
    for key in ("a", "b"):
        tensor = state[key]
        digest.update(repr(key).encode())
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(b"}")
    assert fingerprint(state) == digest.hexdigest()[:16]
    assert fingerprint(net) == fingerprint({k: v.clone() for k, v in net.state_dict().items()})
    assert fingerprint(net) != fingerprint(_net(seed=1))
    changed = _net()
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-6
    assert fingerprint(changed) != fingerprint(net)
    assert fingerprint(net, None) != fingerprint(net, {"format": "x"})
    # batch norm's 0-dim num_batches_tracked (DeepLabV3, SegResNet with batch norm)
    bn = torch.nn.BatchNorm2d(3)
    assert fingerprint(bn) != fingerprint({**bn.state_dict(), "num_batches_tracked": torch.tensor(5)})
    assert fingerprint(torch.tensor(1.0)) != fingerprint(torch.tensor([1.0]))


def test_round_trip_through_a_file_and_checks(tmp_path):
    weibull = _weibull()
    record = Calibration(weibull, "fused", fingerprint(_net()), "bundle", {"images": 4})
    path = record.save(tmp_path / "calibration.json")
    data = json.loads(path.read_text())
    assert data["format"] == "monai-ood-calibration" and data["version"] == CALIBRATION_VERSION
    back = Calibration.load(path, map="fused", fingerprint=fingerprint(_net()))
    assert back.weibull.to_dict() == weibull.to_dict() and back.metadata == {"images": 4}
    values = np.array([0.5, 3.0, 10.0])
    np.testing.assert_allclose(back.transform(values), weibull.transform(values))
    with pytest.raises(ValueError, match="'head' map.*calibrate again"):
        Calibration.load(path, map="head")
    with pytest.raises(ValueError, match="other weights.*calibrate again"):
        Calibration.load(path, fingerprint=fingerprint(_net(seed=1)))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(version=CALIBRATION_VERSION + 1), "format version"),
        (lambda d: d.update(version="1"), "format version"),
        (lambda d: d.update(format="other"), "not a monai-ood calibration"),
        (lambda d: d["weibull"].update(shape=-1.0), "not a valid calibration record"),
        (lambda d: d.pop("fingerprint"), "not a valid calibration record"),
        (lambda d: d.update(front_end="slicer"), "not a valid calibration record"),
    ],
)
def test_other_versions_and_damaged_records_are_one_line_errors(tmp_path, edit, message):
    data = Calibration(_weibull(), "fused", "0" * 16).to_dict()
    edit(data)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        Calibration.load(path)


def test_a_bare_weibull_file_of_the_old_format_says_to_calibrate_again(tmp_path):
    path = tmp_path / "old.json"
    _weibull().save(path)
    with pytest.raises(ValueError, match="bare Weibull.*calibrate again"):
        Calibration.load(path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Calibration.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        Calibration.load(tmp_path / "missing.json")
