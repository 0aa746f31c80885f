"""The consistency of the bundles' files (bundles/*/configs, docs): their layout, configs that agree with
each other and with MONAI's inference properties, every ``_target_`` and monai_ood.bundle component they
name existing, the post-hoc detector settings of ``monai-ood fit``, and the README commands. The
components themselves are tested in test_posthoc.py, test_scoring.py and test_data.py (the training step
in tests/engines/test_step.py)."""

from __future__ import annotations

import inspect
import json
import pydoc
import re

import pytest
from bundle_helpers import BUNDLES, NAMES

import monai_ood.bundle

# ---------------------------------------------------------------- the bundles' files


def _config(name, file):
    return json.loads((BUNDLES / name / "configs" / file).read_text())


@pytest.mark.parametrize("name", NAMES)
def test_bundle_layout_and_config_consistency(name):
    folder = BUNDLES / name
    for path in ("LICENSE", "docs/README.md", "models", "configs/metadata.json", "configs/logging.conf"):
        assert (folder / path).exists(), path
    configs = (
        "train",
        "multi_gpu_train",
        "calibrate",
        "evaluate",
        "multi_gpu_evaluate",
        "inference",
        "mlflow_tracking",
    )
    for config in configs:
        _config(name, f"{config}.json")
    train, inference, metadata = (
        _config(name, "train.json"),
        _config(name, "inference.json"),
        _config(name, "metadata.json"),
    )
    # train.json and inference.json are standalone (as MONAI bundles are): what makes the network and the
    # slices must agree between them.
    for key in (
        "num_classes",
        "slice_axis",
        "pixel_spacing",
        "image_size",
        "percentiles",
        "slice_preprocessing",
        "backbone",
        "network_def",
    ):
        assert train[key] == inference[key], key
    outputs = metadata["network_data_format"]["outputs"]["pred"]
    assert outputs["num_channels"] == train["num_classes"] == len(outputs["channel_def"])
    image = metadata["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == train["image_size"]
    # inference.json has the ids MONAI requires of an inference bundle (monai.bundle.properties)
    from monai.bundle.properties import InferProperties

    required = {
        p["id"] for p in InferProperties.values() if p["required"] and not p["id"].startswith("_meta_")
    }
    assert required <= set(inference), required - set(inference)
    # every _target_ and monai_ood.bundle function the configs name exists
    from monai.bundle import ComponentLocator

    text = "".join((folder / "configs" / f"{c}.json").read_text() for c in configs)
    locator = ComponentLocator()
    for target in re.findall(r'"_target_": "([^"]+)"', text):
        found = pydoc.locate(target) if "." in target else locator.get_component_module_name(target)
        assert found, target
    for function in re.findall(r"monai_ood\.bundle\.(\w+)", text):
        assert hasattr(monai_ood.bundle, function), function


def test_the_bundles_fit_the_detector_monai_ood_fit_fits():
    """calibrate.json's detector has the settings of the command line's post-hoc fit (and its seed)."""
    from monai_ood.engines.posthoc import fit_detector as cli_fit_detector

    defaults = {k: p.default for k, p in inspect.signature(cli_fit_detector).parameters.items()}
    for name in NAMES:
        detector = _config(name, "calibrate.json")["calibrate"]["detector"]
        assert detector["_target_"] == "monai_ood.detectors.fused.FusedDetector"
        assert (
            detector["num_classes"] == "@num_classes"
            and _config(name, "train.json")["seed"] == defaults["seed"]
        )
        for key in ("layers", "fusion", "warped_copies"):
            assert detector[key] == defaults[key], key
        assert _config(name, "calibrate.json")["calibrate"]["batch_size"] == defaults["batch_size"]
        assert _config(name, "inference.json")["batch_size"] == 16  # monai-ood score --batch-size


def test_bundles_differ_only_in_the_backbone():
    for file in ("train.json", "inference.json"):
        unet, deeplab = _config(NAMES[0], file), _config(NAMES[1], file)
        assert unet.keys() == deeplab.keys()
        assert [k for k in unet if unet[k] != deeplab[k]] == ["backbone"]
    for file in (
        "calibrate.json",
        "evaluate.json",
        "multi_gpu_train.json",
        "multi_gpu_evaluate.json",
        "mlflow_tracking.json",
        "logging.conf",
    ):
        assert (BUNDLES / NAMES[0] / "configs" / file).read_text() == (
            BUNDLES / NAMES[1] / "configs" / file
        ).read_text()


@pytest.mark.parametrize("name", NAMES)
def test_readme_commands_name_the_bundles_files(name):
    readme = (BUNDLES / name / "docs" / "README.md").read_text()
    named = set(re.findall(r"configs/[a-z_]+\.json", readme))
    assert {
        "configs/train.json",
        "configs/calibrate.json",
        "configs/inference.json",
        "configs/evaluate.json",
        "configs/multi_gpu_train.json",
        "configs/multi_gpu_evaluate.json",
    } <= named
    for path in named:
        assert (BUNDLES / name / path).is_file(), path
    assert "../schema/meta_schema_20240725.json" in readme
