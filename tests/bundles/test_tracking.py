"""monai_ood.bundle.tracking: the TensorBoard switch and the evaluation record (``save_metrics``)."""

from __future__ import annotations

import json
import logging
import sys
from types import SimpleNamespace

import pytest
import torch

from monai_ood.bundle import save_metrics, tensorboard_available, tracking


def _engine(metrics, details=None, num_images=3):
    state = SimpleNamespace(metrics=metrics, metric_details=details or {})
    return SimpleNamespace(state=state, data_loader=SimpleNamespace(dataset=list(range(num_images))))


def test_tensorboard_available_follows_the_package(monkeypatch, caplog):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: object())
    assert tensorboard_available() is True
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="monai_ood.bundle.tracking"):
        assert tensorboard_available() is False
    assert "pip install tensorboard" in caplog.text


def test_save_metrics_writes_the_mean_and_per_class_dice(tmp_path, monkeypatch):
    # per-image, per-class Dice as MONAI's MeanDice keeps it: NaN where a class is absent from the label
    details = torch.tensor([[0.5, 0.8, 0.9], [float("nan"), 0.6, 0.7], [0.7, 1.0, 0.8]])
    engine = _engine({"val_mean_dice": torch.tensor(0.75), "note": "text"}, {"val_mean_dice": details})
    monkeypatch.setattr(
        sys, "argv", ["/x/monai/bundle/__main__.py", "run", "--config_file", "['a.json','b.json']"]
    )
    path = tmp_path / "deep" / "results.json"
    record = save_metrics(engine, path, ["csf", "grey_matter", "white_matter"], "test")
    assert json.loads(path.read_text()) == record
    assert record["metrics"] == {
        "val_mean_dice": 0.75,
        "val_dice_csf": 0.6,
        "val_dice_grey_matter": 0.8,
        "val_dice_white_matter": 0.8,
    }
    assert (record["split"], record["num_images"]) == ("test", 3)
    assert record["command"] == "python -m monai.bundle run --config_file \"['a.json','b.json']\""
    assert {"monai-ood", "monai", "torch", "numpy"} <= set(record["versions"])
    assert not list(path.parent.glob(".*.tmp"))


def test_save_metrics_names_classes_by_index_when_the_names_do_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest"])  # not the bundle command line: no command recorded
    engine = _engine({"val_mean_dice": 0.5}, {"val_mean_dice": torch.tensor([[0.4, 0.6]])})
    record = save_metrics(engine, tmp_path / "r.json", ["csf", "grey_matter", "white_matter"])
    assert record["metrics"] == {"val_mean_dice": 0.5, "val_dice_class_1": 0.4, "val_dice_class_2": 0.6}
    assert record["command"] is None and record["split"] is None


@pytest.mark.parametrize(
    ("argument", "typed"),
    [
        ("configs/train.json", "configs/train.json"),
        (
            "['configs/train.json','configs/evaluate.json']",
            "\"['configs/train.json','configs/evaluate.json']\"",
        ),
        ("$torch.device('cpu')", "'$torch.device('\"'\"'cpu'\"'\"')'"),
    ],
)
def test_the_command_is_recorded_as_a_shell_reads_it(argument, typed):
    import shlex

    assert tracking._quote(argument) == typed
    assert shlex.split(tracking._quote(argument)) == [argument]
