"""Training (monai_ood.engines.training.train) on tiny 2D items: best and last checkpoints, resume to the
same weights, overwrite, up-front checks of the items, the training transforms, TrainingConfig and its
head configurations, and every lever and head option reaching the trained (and refitted) network."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from engine_helpers import CLASS_NAMES, PREPROCESSING
from engine_helpers import training_config as _config
from engine_helpers import training_items as _items

from monai_ood.engines import TrainingConfig, calibrate, load_model, train
from monai_ood.engines.checkpoint import load_training_state
from monai_ood.engines.training import training_transforms
from monai_ood.preprocessing import SlicePreprocessing

# 32x32 images are too small for the elastic outlier's default control grid; TorchIO warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:The maximum displacement is larger:RuntimeWarning")


def _without_timing(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def test_training_writes_best_and_last_checkpoints(run):
    output, result = run
    assert result.best_checkpoint == output / "model.pt" and result.best_checkpoint.is_file()
    assert result.last_checkpoint == output / "last.pt" and result.last_checkpoint.is_file()
    assert [r["epoch"] for r in result.history] == [1, 2]
    for record in result.history:
        assert 0.0 <= record["val_mean_dice"] <= 1.0
        assert len(record["val_dice_per_class"]) == len(CLASS_NAMES) - 1  # background excluded
        assert math.isfinite(record["train_loss"]) and math.isfinite(record["train_ood_loss"])
    # the learning rate follows the warm-restart cosine with fractional epochs: below the start value
    assert result.history[0]["lr"] < 1e-3
    assert json.loads((output / "history.json").read_text()) == result.history

    loaded = load_model(result.best_checkpoint, device="cpu")
    best = max(result.history, key=lambda r: r["val_mean_dice"])
    assert loaded.metrics["val_mean_dice"] == best["val_mean_dice"]
    assert loaded.metrics["epoch"] == best["epoch"]
    assert loaded.class_names == CLASS_NAMES
    assert loaded.preprocessing == PREPROCESSING
    assert loaded.model_config["out_channels"] == 3 and loaded.model_config["head_channels"] == 8

    state = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["iteration"] == 6
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda", "transforms"}
    assert len(state["rng"]["transforms"]) > 0
    if best["epoch"] == 2:  # then model.pt holds the final weights too
        for key, value in state["model"].items():
            assert torch.equal(value, loaded.net.state_dict()[key])


def test_resume_gives_the_same_weights(run, data, tmp_path, monkeypatch, capsys):
    _, uninterrupted = run
    train_items, val_items = data
    # on a terminal a progress bar is shown; it must not change what is computed
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(train_items, val_items, _config(max_epochs=1), tmp_path, PREPROCESSING, class_names=CLASS_NAMES)
    monkeypatch.undo()
    assert "train" in capsys.readouterr().err

    # a fresh start into a folder holding a run is refused...
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        train(
            train_items,
            val_items,
            _config(),
            tmp_path,
            PREPROCESSING,
            class_names=CLASS_NAMES,
            progress=False,
        )
    # ...as is resuming with settings that change what is computed
    with pytest.raises(ValueError, match="learning_rate"):
        train(
            train_items,
            val_items,
            _config(learning_rate=1e-2),
            tmp_path,
            PREPROCESSING,
            class_names=CLASS_NAMES,
            resume=True,
            progress=False,
        )

    resumed = train(
        train_items,
        val_items,
        _config(),
        tmp_path,
        PREPROCESSING,
        class_names=CLASS_NAMES,
        resume=True,
        progress=False,
    )
    assert _without_timing(resumed.history) == _without_timing(uninterrupted.history)
    expected = load_training_state(uninterrupted.last_checkpoint)
    got = load_training_state(resumed.last_checkpoint)
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), key
    assert got["optimizer"]["param_groups"][0]["lr"] == expected["optimizer"]["param_groups"][0]["lr"]

    # resuming a finished run does nothing more
    again = train(
        train_items,
        val_items,
        _config(),
        tmp_path,
        PREPROCESSING,
        class_names=CLASS_NAMES,
        resume=True,
        progress=False,
    )
    assert _without_timing(again.history) == _without_timing(resumed.history)


def test_overwrite_starts_afresh(data, tmp_path):
    train_items, val_items = data
    (tmp_path / "notes.txt").write_text("not ours")
    # no validation runs (val_interval > max_epochs): model.pt holds the final weights, and says so
    config = _config(max_epochs=1, val_interval=2, outlier_batch_size=0)
    with pytest.warns(UserWarning, match="no validation ran"):
        train(train_items, val_items, config, tmp_path, PREPROCESSING, progress=False)
    with pytest.warns(UserWarning, match="no validation ran"):
        result = train(
            train_items, val_items, config, tmp_path, PREPROCESSING, overwrite=True, progress=False
        )
    assert len(result.history) == 1 and "val_mean_dice" not in result.history[0]
    assert load_model(result.best_checkpoint, device="cpu").metrics["val_mean_dice"] is None
    assert (tmp_path / "notes.txt").read_text() == "not ours"  # only the run's own files are replaced


def _bad(kind):
    items = _items(3, seed=2)
    if kind == "label out of range":
        items[1]["label"][0, 0, 0] = 3
    elif kind == "negative label":
        items[2]["label"][0, 0, 0] = -1
    elif kind == "nan image":
        items[1]["image"][0, 5, 5] = np.nan
    elif kind == "inf image":
        items[0]["image"][0, 5, 5] = np.inf
    elif kind == "label shape":
        items[1]["label"] = items[1]["label"][:, :16]
    elif kind == "fractional label":
        items[1]["label"] = items[1]["label"].astype(np.float32) + 0.5
    elif kind == "missing label":
        del items[0]["label"]
    elif kind == "mixed shapes":
        items[2] = _items(1, seed=3)[0]
        items[2] = {k: np.pad(v, ((0, 0), (0, 8), (0, 0))) for k, v in items[2].items()}
    elif kind == "2d image without channel":
        items[0]["image"] = items[0]["image"][0]
    return items


@pytest.mark.parametrize(
    "kind,match",
    [
        ("label out of range", r"train_items\[1\]\['label'\] must lie in \[0, 2\].*got values in \[0, 3\]"),
        ("negative label", r"train_items\[2\]\['label'\] must lie in \[0, 2\]"),
        ("nan image", r"train_items\[1\]\['image'\] contains 1 NaN/Inf"),
        ("inf image", r"train_items\[0\]\['image'\] contains 1 NaN/Inf"),
        ("label shape", r"train_items\[1\]\['label'\] must have shape"),
        ("fractional label", r"integer class indices"),
        ("missing label", r"train_items\[0\] must be a dict with keys"),
        ("mixed shapes", r"share one spatial shape"),
        ("2d image without channel", r"\(C, H, W\)"),
    ],
)
def test_invalid_items_are_rejected_up_front(kind, match, data, tmp_path):
    _, val_items = data
    with pytest.raises(ValueError, match=match):
        train(_bad(kind), val_items, _config(), tmp_path / "out", PREPROCESSING, class_names=CLASS_NAMES)
    assert not (tmp_path / "out").exists()  # nothing was written


def test_invalid_validation_items_and_sizes(data, tmp_path):
    train_items, val_items = data
    bad_val = [dict(item) for item in val_items]
    bad_val[0] = {"image": val_items[0]["image"], "label": val_items[0]["label"] * 2}
    with pytest.raises(ValueError, match=r"val_items\[0\]\['label'\] must lie in \[0, 2\]"):
        train(train_items, bad_val, _config(), tmp_path, PREPROCESSING, class_names=CLASS_NAMES)
    with pytest.raises(ValueError, match="val_items is empty"):
        train(train_items, [], _config(), tmp_path, PREPROCESSING)
    with pytest.raises(ValueError, match="num_classes"):
        train(
            train_items, val_items, _config(num_classes=4), tmp_path, PREPROCESSING, class_names=CLASS_NAMES
        )
    odd = [{k: v[:, :30, :30] for k, v in item.items()} for item in train_items]
    with pytest.raises(ValueError, match=r"cannot process images of spatial shape \(30, 30\)"):
        train(odd, [odd[0]], _config(), tmp_path / "odd", SlicePreprocessing(size=(30, 30)))
    assert not (tmp_path / "odd").exists()
    with pytest.raises(ValueError, match="exclude each other"):
        train(train_items, val_items, _config(), tmp_path, PREPROCESSING, resume=True, overwrite=True)


def test_outlier_is_made_from_the_augmented_image():
    config = _config(outlier_ops=("vflip",))
    transforms = training_transforms(config, spatial_dims=2).set_random_state(seed=1)
    item = _items(1, seed=4)[0]
    out = transforms(item)
    assert set(out) == {"image", "label", "outlier"}
    assert type(out["image"]) is torch.Tensor  # plain tensors: cheap to collate
    assert not torch.equal(out["image"], torch.from_numpy(item["image"]))  # augmented
    torch.testing.assert_close(out["outlier"], torch.flip(out["image"], dims=(1,)), rtol=0, atol=0)
    # nearest interpolation keeps the label a class-index map
    assert set(out["label"].unique().tolist()) <= {0.0, 1.0, 2.0}

    no_outliers = training_transforms(_config(outlier_batch_size=0), spatial_dims=2)
    assert set(no_outliers(item)) == {"image", "label"}


def test_config_round_trip_and_validation():
    config = _config(outlier_ops=["gamma", "swap"])
    d = config.to_dict()
    assert d["network_kwargs"]["channels"] == [4, 8, 16] and d["outlier_ops"] == ["gamma", "swap"]
    json.dumps(d)
    assert TrainingConfig.from_dict(d).to_dict() == d
    with pytest.raises(ValueError, match="unknown TrainingConfig keys"):
        TrainingConfig.from_dict({**d, "epochs": 3})
    for bad in (
        {"batch_size": 0},
        {"outlier_batch_size": 9, "batch_size": 8},
        {"learning_rate": 0.0},
        {"lambda_out": -1.0},
        {"rotate_degrees": 200},
        {"max_epochs": 1.5},
        {"preset": "unett"},
    ):
        with pytest.raises(ValueError):
            TrainingConfig(**bad)
    assert (
        TrainingConfig().outliers_per_step == 8
        and TrainingConfig(outlier_batch_size=2).outliers_per_step == 2
    )


def test_head_configs_fill_unset_levers_and_validate():
    from monai_ood.engines.training import HEAD_CONFIGS

    paper = TrainingConfig(head_config="paper")
    assert {k: getattr(paper, k) for k in HEAD_CONFIGS["paper"]} == HEAD_CONFIGS["paper"]
    default = TrainingConfig()
    assert default.head_config == "default" and default.refit and default.wrapper_kwargs["gaussian_term"]
    mixed = TrainingConfig(head_config="paper", global_head=True)
    assert mixed.global_head is True and mixed.extra_layers == 0
    assert TrainingConfig.from_dict(mixed.to_dict()) == mixed
    for bad in (
        {"head_config": "best"},
        {"aggregation": "median"},
        {"select_by": "auroc"},
        {"extra_layers": -1},
    ):
        with pytest.raises(ValueError):
            TrainingConfig(**bad)


def test_every_lever_trains_refits_and_calibrates_its_terms(data, tmp_path):
    train_items, val_items = data
    config = _config(head_config="all", outlier_ops=("rotate180", "local_shuffle", "blob"))
    result = train(
        train_items, val_items, config, tmp_path / "run", SlicePreprocessing(size=(32, 32)), progress=False
    )
    loaded = load_model(result.best_checkpoint, device="cpu")
    net = loaded.net
    assert net.term_names[-2:] == ["global", "gaussian"] and bool(net.gaussian_fitted)
    # select_by="last": model.pt holds the last epoch's weights (the Gaussian is fitted after training)
    last = load_training_state(result.last_checkpoint)["model"]
    for key, value in last.items():
        if not key.startswith("gaussian_"):
            torch.testing.assert_close(net.state_dict()[key], value)
    assert loaded.metrics["selected_by"] == "last"
    before = net.term_weibull.clone()
    calibrate(result.best_checkpoint, val_items, device="cpu")
    after = load_model(result.best_checkpoint, device="cpu").net
    assert not torch.equal(before, after.term_weibull)  # the hazards were fitted on the validation images
    scores = after.ood(torch.from_numpy(np.stack([i["image"] for i in val_items]))).image_score
    assert torch.isfinite(scores).all()


def test_default_head_refits_prototypes_on_the_training_features(data, tmp_path):
    train_items, val_items = data
    result = train(
        train_items,
        val_items,
        _config(head_config="default"),
        tmp_path / "run",
        SlicePreprocessing(size=(32, 32)),
        progress=False,
    )
    net = load_model(result.best_checkpoint, device="cpu").net
    assert net.term_names[-1] == "gaussian" and bool(net.gaussian_fitted) and not net.extra_layers
    # the refitted background prototype is the mean embedding of the background feature cells
    from monai_ood.losses import labels_to_feature_grid

    images = torch.from_numpy(np.stack([i["image"] for i in train_items]))
    labels = torch.from_numpy(np.stack([i["label"] for i in train_items]))
    with torch.no_grad():
        v = net.head(net.encode(images)).double()
    grid = labels_to_feature_grid(labels, 3, v.shape[2:])
    background = v.movedim(1, -1)[grid == 0].mean(0)
    torch.testing.assert_close(net.prototypes.means[0].double(), background, rtol=1e-4, atol=1e-5)


def test_default_head_is_refitted_even_when_no_validation_ran(data, tmp_path):
    train_items, val_items = data
    config = _config(head_config="default", max_epochs=1, val_interval=2)
    with pytest.warns(UserWarning, match="no validation ran"):
        result = train(train_items, val_items, config, tmp_path, PREPROCESSING, progress=False)
    assert bool(load_model(result.best_checkpoint, device="cpu").net.gaussian_fitted)


def test_resume_of_a_finished_run_redoes_a_refit_that_crashed(data, tmp_path, monkeypatch):
    import monai_ood.engines.calibration as calibration

    train_items, val_items = data
    config = _config(head_config="default", max_epochs=1)
    real_refit = calibration.refit

    def crash(*args, **kwargs):
        raise RuntimeError("killed during the refit")

    monkeypatch.setattr(calibration, "refit", crash)
    with pytest.raises(RuntimeError, match="killed"):
        train(train_items, val_items, config, tmp_path, PREPROCESSING, progress=False)
    before = load_model(tmp_path / "model.pt", device="cpu")
    assert not bool(before.net.gaussian_fitted) and "refitted" not in before.metrics
    calls = []
    monkeypatch.setattr(calibration, "refit", lambda *a, **k: calls.append(1) or real_refit(*a, **k))
    train(train_items, val_items, config, tmp_path, PREPROCESSING, resume=True, progress=False)
    after = load_model(tmp_path / "model.pt", device="cpu")
    assert calls == [1] and bool(after.net.gaussian_fitted) and after.metrics["refitted"] is True
    train(train_items, val_items, config, tmp_path, PREPROCESSING, resume=True, progress=False)
    assert calls == [1]  # a finished refit is not run again


def test_every_head_option_reaches_the_trained_network(data, tmp_path):
    train_items, val_items = data
    head_kwargs = {"quantile": 0.5, "outlier_norm": "batch", "head_act": "RELU", "global_grid": 3}
    config = _config(head_config="paper", max_epochs=1, head_kwargs=head_kwargs, aggregation="quantile")
    assert TrainingConfig.from_dict(config.to_dict()).head_kwargs == head_kwargs
    result = train(train_items, val_items, config, tmp_path, PREPROCESSING, progress=False)
    net = load_model(result.best_checkpoint, device="cpu").net
    assert (net.quantile, net.outlier_norm, net.global_grid) == (0.5, "batch", 3)
    assert any(isinstance(m, torch.nn.ReLU) for m in net.head.modules())
    assert not any(isinstance(m, torch.nn.PReLU) for m in net.head.modules())
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['quantil'\].*'quantile'"):
        _config(head_kwargs={"quantil": 0.5})
    with pytest.raises(ValueError, match="have their own settings"):
        _config(head_kwargs={"aggregation": "mean"})
