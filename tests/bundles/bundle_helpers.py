"""Helpers of the bundle tests: paths, tiny settings, bundle copies, a tiny network and its detector."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = ROOT / "bundles"
SCHEMA = BUNDLES / "schema" / "meta_schema_20240725.json"
NAMES = ("prototype_ood_unet_2d", "prototype_ood_deeplabv3")

# Network overrides that make each bundle's network tiny (valid for train, calibrate and inference).
TINY_NETWORK = {
    "prototype_ood_unet_2d": {
        "backbone#channels": [4, 8, 16],
        "backbone#strides": [2, 2],
        "backbone#num_res_units": 0,
        "network_def#head_channels": 8,
    },
    "prototype_ood_deeplabv3": {
        "backbone#layers": [1, 1, 1, 1],
        "backbone#aspp_channels": 8,
        "network_def#head_channels": 8,
    },
}
# Training overrides: 2 iterations of 2 slices, no worker processes, validation (and so calibration and
# evaluation, which use the validation loader) on the first 4 slices of the split.
TINY_TRAIN = {
    "num_workers": 0,
    "batch_size": 2,
    "max_epochs": 1,
    "train#trainer#epoch_length": 2,
    "validate#dataset#data": "$@validate#data[:4]",
}

# Post-hoc step (calibrate.json): DeepLabV3's two deepest stages have 1024 and 2048 channels, whose
# Gaussians (eigendecompositions of 2048- and 4096-dimensional covariances) take most of a minute on a
# CPU; the tests fit its detector on the two shallower stages (the default reads all four).
TINY_POSTHOC = {
    "prototype_ood_unet_2d": {},
    "prototype_ood_deeplabv3": {"calibrate#detector#layers": ["backbone.layer1", "backbone.layer2"]},
}

# Small slices for every step (train, calibrate, evaluate, inference): 48 x 48 at 4.5 mm.
TINY_SLICES = {"image_size": [48, 48], "pixel_spacing": [4.5, 4.5]}


def data_overrides(cache_dir) -> dict:
    """Training configs: where the embedded brain data at TINY_SLICES are cached (see the fixture)."""
    return {"train#data#cache_dir": str(cache_dir), "validate#data#cache_dir": str(cache_dir)}


def copy_bundle(name: str, destination: Path) -> Path:
    """A copy of a bundle as a user would have it (nothing from earlier runs in models/ or eval/)."""
    target = destination / name
    shutil.copytree(BUNDLES / name, target, ignore=shutil.ignore_patterns("*.pt", "calibration.json", "eval"))
    return target


def slice_preprocessing():
    """The SlicePreprocessing of TINY_SLICES (what train.json and inference.json build from them)."""
    from monai_ood.preprocessing import SlicePreprocessing

    return SlicePreprocessing(spacing=TINY_SLICES["pixel_spacing"], size=TINY_SLICES["image_size"])


def bundle_network(bundle: Path, overrides: dict):
    """The bundle's ``network_def`` (from its inference.json with ``overrides``) with its trained weights,
    read independently of monai_ood.bundle: MONAI's ConfigParser and torch.load."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update(overrides)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    return network.eval(), parser


def write_args(path: Path, *overrides: dict) -> Path:
    merged: dict = {}
    for override in overrides:
        merged.update(override)
    path.write_text(json.dumps(merged), encoding="utf-8")
    return path


# ---------------------------------------------------------------- a tiny network and its default detector
# (test_posthoc, test_scoring and the model_files fixture)

TINY_UNET = {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 0}


def tiny_net(**network_kwargs):
    from monai_ood.networks import create_prototype_network

    return create_prototype_network(
        "unet", 2, 1, 4, head_channels=8, network_kwargs={**TINY_UNET, **network_kwargs}
    )


def labelled_items(count: int, seed: int) -> list[dict]:
    """Labelled 32 x 32 slices: blurred noise (the terms need spread) with every class present."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        image = rng.random((32, 32)).astype(np.float32)
        image = (image + np.roll(image, 1, 0) + np.roll(image, 1, 1)) / 3
        label = np.minimum((image * 4).astype(np.int64), 3)
        items.append({"image": image[None], "label": label[None]})
    return items


def tiny_detector(net, seed: int = 0):
    """The default detector with settings that fit in a fraction of a second (no fusion choice, no warps)."""
    from monai_ood.detectors.fused import FusedDetector

    return FusedDetector(net, num_classes=4, fusion="sum", warped_copies=0, batch_size=4, seed=seed)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ---------------------------------------------------------------- stand-ins for TensorBoard and MLflow
# (tensorboard and mlflow are optional: the tests check what the bundles' configs send them)


class RecordingWriter:
    """A stand-in for TensorBoard's ``SummaryWriter``: keeps every ``add_scalar`` as ``(tag, value, step)``."""

    writers: list[RecordingWriter] = []

    def __init__(self, log_dir=None, **kwargs):
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        RecordingWriter.writers.append(self)

    def add_scalar(self, tag, value, global_step=None, **kwargs):
        self.scalars.append((str(tag), float(value), global_step))

    def flush(self):
        pass

    def close(self):
        pass


class RecordingHandler:
    """A stand-in for MONAI's ``MLFlowHandler`` taking its settings (``DEFAULT_MLFLOW_SETTINGS``): records
    ``output_transform(engine.state.output)`` after every iteration (when ``iteration_log``) and the engine's
    metrics after every epoch, per engine class."""

    records: list[tuple[str, str, object]] = []

    def __init__(self, output_transform=lambda output: None, iteration_log=True, epoch_log=True, **settings):
        self.output_transform = output_transform
        self.iteration_log = iteration_log
        self.epoch_log = epoch_log
        self.settings = settings

    def attach(self, engine):
        from ignite.engine import Events

        name = type(engine).__name__
        if self.iteration_log:
            engine.add_event_handler(
                Events.ITERATION_COMPLETED,
                lambda e: RecordingHandler.records.append(
                    (name, "iteration", self.output_transform(e.state.output))
                ),
            )
        if self.epoch_log:
            engine.add_event_handler(
                Events.EPOCH_COMPLETED,
                lambda e: RecordingHandler.records.append((name, "epoch", dict(e.state.metrics))),
            )


def run_bundle_on_two_ranks(bundle: Path, configs: str, args: Path, timeout: int = 400):
    """``torchrun --standalone --nproc_per_node=2 -m monai.bundle run`` in ``bundle`` (gloo on the CPU),
    with this checkout importable and one thread per rank; asserts it succeeded, returns the result."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
    ]
    command += ["-m", "monai.bundle", "run", "--config_file", configs, "--args_file", str(args)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # light on a shared machine; torchrun would set it anyway
    result = subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result
