import os
import random

import numpy as np
import pytest
import torch
from monai.transforms import Compose, RandAffined
from scipy import stats

from monai_ood.calibration import WeibullCalibrator
from monai_ood.engines.checkpoint import (
    MODEL_FORMAT,
    build_network,
    capture_rng_state,
    load_model,
    load_training_state,
    make_model_config,
    restore_rng_state,
    save_model,
    save_training_state,
    set_calibration,
)
from monai_ood.preprocessing import SlicePreprocessing
from monai_ood.transforms import OutlierSynthesisd

NETWORK_KWARGS = {"channels": (4, 8, 16), "strides": (2, 2), "norm": ("instance", {"affine": True})}


def _config(head_channels=8):
    return make_model_config("unet", 2, 1, 3, head_channels, NETWORK_KWARGS)


def _trained_looking_net(config):
    torch.manual_seed(0)
    net = build_network(config)
    with torch.no_grad():  # weights unlike a fresh initialisation, so a round trip proves something
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval()


def _fitted_calibrator():
    values = stats.weibull_min.rvs(1.5, scale=4.0, size=2000, random_state=0)
    return WeibullCalibrator().fit(values)


def test_model_round_trip(tmp_path):
    config = _config()
    net = _trained_looking_net(config)
    preprocessing = SlicePreprocessing(size=(32, 32))
    path = save_model(
        tmp_path / "model.pt",
        net,
        config,
        preprocessing,
        class_names=["background", "a", "b"],
        metrics={"val_mean_dice": 0.5, "epoch": 3},
    )
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would create it

    loaded = load_model(path, device="cpu")
    assert not loaded.net.training
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x), net(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.net.ood(x).score_map, net.ood(x).score_map, rtol=0, atol=0)
    assert loaded.model_config == config
    assert loaded.model_config["network_kwargs"]["channels"] == [4, 8, 16]  # stored as lists
    assert loaded.preprocessing == preprocessing
    assert loaded.class_names == ["background", "a", "b"]
    assert loaded.metrics == {"val_mean_dice": 0.5, "epoch": 3}
    assert loaded.calibrator is None
    assert loaded.path == path


def test_model_file_loads_with_weights_only(tmp_path):
    config = _config()
    path = save_model(tmp_path / "model.pt", build_network(config), config, SlicePreprocessing())
    data = torch.load(path, map_location="cpu", weights_only=True)
    assert data["format"] == MODEL_FORMAT and data["version"] == 1
    assert set(data) == {
        "format",
        "version",
        "state_dict",
        "model_config",
        "preprocessing",
        "calibration",
        "class_names",
        "metrics",
        "detector",
        "monai_ood_version",
    }
    assert set(data["model_config"]) == {
        "preset",
        "spatial_dims",
        "in_channels",
        "out_channels",
        "head_channels",
        "network_kwargs",
        "wrapper_kwargs",
    }
    assert all(t.device.type == "cpu" for t in data["state_dict"].values())


def test_set_calibration_round_trip(tmp_path):
    config = _config()
    net = _trained_looking_net(config)
    path = save_model(tmp_path / "model.pt", net, config, SlicePreprocessing(), metrics={"epoch": 1})
    calibrator = _fitted_calibrator()
    set_calibration(path, calibrator)
    loaded = load_model(path, device="cpu")
    assert loaded.calibrator.to_dict() == calibrator.to_dict()
    assert loaded.metrics == {"epoch": 1}  # the rest of the checkpoint is kept
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x), net(x), rtol=0, atol=0)
    set_calibration(path, None)
    assert load_model(path, device="cpu").calibrator is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_calibration_of_other_weights_or_another_map_is_not_applied(tmp_path):
    from monai_ood.engines.checkpoint import set_weights

    config = _config()
    net = _trained_looking_net(config)
    path = save_model(
        tmp_path / "model.pt", net, config, SlicePreprocessing(), calibration=_fitted_calibrator()
    )
    loaded = load_model(path, device="cpu")
    assert loaded.calibration.map == "head" and loaded.calibration_error is None
    assert loaded.calibration.front_end == "cli"
    with torch.no_grad():  # retrained (or refitted) weights: the stored Weibull calibrated another map
        next(net.parameters()).view(-1)[0] += 0.5
    set_weights(path, net)
    stale = load_model(path, device="cpu")
    assert stale.calibrator is None and stale.calibration is None
    assert "other weights" in stale.calibration_error and "calibrate again" in stale.calibration_error
    data = torch.load(path, weights_only=True)
    data["calibration"] = _fitted_calibrator().to_dict()  # the bare Weibull dict of earlier versions
    torch.save(data, path)
    old = load_model(path, device="cpu")
    assert old.calibrator is None and "bare Weibull" in old.calibration_error


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(tmp_path / "nope.pt", device="cpu")
    with pytest.raises(FileNotFoundError):
        set_calibration(tmp_path / "nope.pt", _fitted_calibrator())


class _NotAllowed:
    pass


@pytest.mark.parametrize(
    "content,match",
    [
        ({"weight": torch.zeros(2)}, "format is None"),  # a plain state dict
        ({"format": "something-else", "version": 1}, "format is 'something-else'"),
        ({"format": MODEL_FORMAT, "version": 99}, "version 99"),
        ("text", "not a monai-ood checkpoint"),  # not a torch file at all
        (_NotAllowed(), "not a monai-ood checkpoint"),  # a pickle weights_only refuses
    ],
)
def test_wrong_format_names_the_file(tmp_path, content, match):
    path = tmp_path / "other.pt"
    if content == "text":
        path.write_text("hello")
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=match) as info:
        load_model(path, device="cpu")
    assert "other.pt" in str(info.value)


def test_training_state_is_not_a_model(tmp_path):
    path = save_training_state(tmp_path / "last.pt", {"epoch": 1})
    with pytest.raises(ValueError, match="training state"):
        load_model(path, device="cpu")
    with pytest.raises(ValueError, match="model checkpoint"):
        load_training_state(
            save_model(tmp_path / "model.pt", build_network(_config()), _config(), SlicePreprocessing())
        )


def test_state_dict_mismatch_lists_keys(tmp_path):
    config = _config(head_channels=8)
    path = save_model(tmp_path / "model.pt", build_network(config), config, SlicePreprocessing())
    data = torch.load(path, weights_only=True)
    data["model_config"]["head_channels"] = 16
    first = next(iter(data["state_dict"]))
    data["state_dict"]["extra.weight"] = data["state_dict"].pop(first)
    torch.save(data, path)
    with pytest.raises(ValueError) as info:
        load_model(path, device="cpu")
    message = str(info.value)
    assert "model.pt" in message
    assert f"missing keys: {first}" in message
    assert "unexpected keys: extra.weight" in message
    assert "shape mismatches: head." in message


def test_save_model_validates(tmp_path):
    config = _config()
    with pytest.raises(ValueError, match="class_names"):
        save_model(
            tmp_path / "m.pt", build_network(config), config, SlicePreprocessing(), class_names=["a", "b"]
        )
    with pytest.raises(ValueError, match="missing"):
        save_model(tmp_path / "m.pt", build_network(config), {"preset": "unet"}, SlicePreprocessing())


def _pipeline():
    return Compose(
        [
            RandAffined(keys="image", prob=1.0, rotate_range=(0.3,), translate_range=(3, 3)),
            OutlierSynthesisd(keys="image", ops=("gamma", "swap")),
        ]
    )


def _draws(pipeline):
    data = pipeline({"image": torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))})["image"]
    return random.random(), np.random.rand(), torch.rand(1).item(), data


def test_rng_state_replays_and_loads_with_weights_only(tmp_path):
    pipeline = _pipeline().set_random_state(seed=3)
    _draws(pipeline)  # move every generator away from its seed
    state = capture_rng_state(pipeline)
    first = _draws(pipeline)
    save_training_state(tmp_path / "last.pt", {"rng": state, "epoch": 1})
    loaded = torch.load(tmp_path / "last.pt", weights_only=True)

    # a freshly built pipeline (as in a resumed process) replays the draws
    other = _pipeline().set_random_state(seed=99)
    restore_rng_state(loaded["rng"], other)
    second = _draws(other)
    assert first[:3] == second[:3]
    torch.testing.assert_close(first[3], second[3], rtol=0, atol=0)
    # Compose, RandAffined, RandAffine, RandAffineGrid, OutlierSynthesisd, OutlierSynthesis
    assert len(loaded["rng"]["transforms"]) == 6


def test_rng_state_rejects_a_different_pipeline():
    state = capture_rng_state(_pipeline())
    with pytest.raises(ValueError, match="pipeline changed"):
        restore_rng_state(state, Compose([OutlierSynthesisd(keys="image")]))
