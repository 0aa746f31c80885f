"""The default detector in model.pt (monai_ood.engines.posthoc.fit_detector): fit_detector stores it and
drops the stale calibration, score_slices uses it, and it is stored and read back with weights_only
(calibrating on its map is tested in test_calibration.py)."""

import numpy as np
import pytest
import torch
from engine_helpers import UNET_STAGES
from engine_helpers import random_items as _items
from engine_helpers import save_tiny_model as _save_tiny_model

from monai_ood.calibration import WeibullCalibrator
from monai_ood.detectors import FusedDetector
from monai_ood.engines.checkpoint import load_model
from monai_ood.engines.posthoc import fit_detector
from monai_ood.inference import score_slices


def test_fit_detector_stores_the_fitted_detector(fitted):
    path, detector, weights = fitted[:3]
    loaded = load_model(path, device="cpu")
    assert isinstance(loaded.detector, FusedDetector)
    assert loaded.detector.layers == UNET_STAGES  # the registry's encoder stages of the UNet
    assert loaded.detector.term_names == detector.term_names
    assert loaded.detector.fusion_ == detector.fusion_
    x = torch.from_numpy(np.stack([item["image"] for item in _items(3, seed=7)]))
    stored, in_memory = loaded.detector(x), detector(x)
    torch.testing.assert_close(stored.image_score, in_memory.image_score, rtol=0, atol=0)
    torch.testing.assert_close(stored.score_map, in_memory.score_map, rtol=0, atol=0)
    assert stored.score_map.shape == (3, 1, 32, 32)
    assert torch.isfinite(stored.image_score).all()
    assert len(set(stored.image_score.tolist())) == 3  # a score per image, not a constant
    # fitting reads the network, it does not change it
    state = loaded.net.state_dict()
    assert set(state) == set(weights)
    assert all(torch.equal(state[k], weights[k]) for k in weights)


def test_fit_detector_drops_the_stored_calibration(fitted):
    assert fitted[5] is None  # set_detector dropped it: it calibrated the previous map


def test_fit_detector_passes_layers_and_fusion(tmp_path):
    path = tmp_path / "model.pt"
    _save_tiny_model(path)
    detector = fit_detector(
        path, _items(4, seed=1), _items(3, seed=2), layers=["model.0"], fusion="hazard", device="cpu"
    )
    loaded = load_model(path, device="cpu")
    assert detector.layers == loaded.detector.layers == ["model.0"]
    assert detector.fusion_ == loaded.detector.fusion_ == "hazard"


@pytest.mark.parametrize(
    "which,shape,message",
    [
        ("train", (2, 32, 32), "train_items are 2D with 2 channel"),
        ("val", (2, 32, 32), "val_items are 2D with 2 channel"),
        ("train", (1, 16, 16, 16), "train_items are 3D with 1 channel"),
    ],
)
def test_fit_detector_rejects_items_that_do_not_fit_the_model(tmp_path, which, shape, message):
    path = tmp_path / "model.pt"
    _save_tiny_model(path)
    before = path.read_bytes()
    good = _items(3, seed=1)
    bad = [{"image": np.random.default_rng(0).random(shape, dtype=np.float32)} for _ in range(3)]
    train, val = (bad, good) if which == "train" else (good, bad)
    with pytest.raises(ValueError, match=message) as info:
        fit_detector(path, train, val, device="cpu")
    assert "model.pt" in str(info.value)  # names the checkpoint too
    assert path.read_bytes() == before  # nothing stored


def test_score_slices_uses_the_detector(fitted):
    path, val = fitted[0], fitted[4]
    loaded = load_model(path, device="cpu")
    detector = loaded.detector
    calibrator = WeibullCalibrator().fit(
        detector.segment_and_score(torch.from_numpy(np.stack([i["image"] for i in val])))[2].numpy().ravel()
    )
    slices = np.stack([item["image"] for item in _items(5, seed=9)])
    out = score_slices(loaded.net, slices, calibrator, batch_size=2, detector=detector)
    x = torch.from_numpy(slices)
    reference = detector(x)
    np.testing.assert_allclose(out["image_score"], reference.image_score.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["score_map"], reference.score_map[:, 0].numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        expected_segmentation = loaded.net(x).argmax(1).numpy()
    np.testing.assert_array_equal(out["segmentation"], expected_segmentation)
    low = detector.segment_and_score(x)[2]
    np.testing.assert_allclose(
        out["calibrated_degree"], calibrator.transform(low).flatten(1).mean(1).numpy(), rtol=1e-5, atol=1e-6
    )
    # without the detector, the head scores (and the two differ, so the check above means something)
    head = score_slices(loaded.net, slices, None, batch_size=2)
    with torch.no_grad():
        head_scores = loaded.net.forward_with_ood(x)[1].image_score.numpy()
    np.testing.assert_allclose(head["image_score"], head_scores, rtol=1e-5, atol=1e-6)
    assert not np.allclose(head["image_score"], out["image_score"])


def test_checkpoint_with_detector_loads_with_weights_only(fitted):
    path = fitted[0]
    data = torch.load(path, map_location="cpu", weights_only=True)
    assert data["detector"]["format"] == "monai-ood-detector"
    rebuilt = FusedDetector.from_state(load_model(path, device="cpu").net, data["detector"])
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(rebuilt(x).image_score, fitted[1](x).image_score, rtol=0, atol=0)


def test_a_detector_file_round_trips_and_a_foreign_one_is_refused(fitted, tmp_path):
    from monai_ood.calibration import fingerprint
    from monai_ood.engines.checkpoint import detector_from_state, load_detector, save_detector

    path, detector = fitted[:2]
    net = load_model(path, device="cpu").net
    file = save_detector(tmp_path / "detector.pt", detector)
    rebuilt = load_detector(file, net)
    x = torch.from_numpy(np.stack([item["image"] for item in _items(2, seed=9)]))
    torch.testing.assert_close(rebuilt(x).image_score, detector(x).image_score, rtol=0, atol=0)
    # the fingerprint a calibration is bound to is the same from the file and from memory
    assert fingerprint(net, torch.load(file, weights_only=True)) == fingerprint(net, detector.to_state())
    state = detector.to_state()
    with pytest.raises(ValueError, match="'mystery' is not one monai-ood can rebuild.*fused"):
        detector_from_state(net, {**state, "name": "mystery"})
    state["loc"] = state["loc"].clone().fill_(float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_detector(tmp_path / "nan.pt", net)
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a 'monai-ood-detector' checkpoint"):
        load_detector(tmp_path / "foreign.pt", net)
