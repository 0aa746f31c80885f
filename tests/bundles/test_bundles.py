"""The MONAI bundles under bundles/, run as a user runs them (tiny networks, 2 training iterations).

* U-Net: ``python -m monai.bundle run`` on the command line, on a user's Decathlon-style folder
  (``--dataset_dir``): train -> calibrate -> inference of the folder's test volume.
* DeepLabV3: the same ``monai.bundle.run`` in-process (what the command line calls) on the embedded brain
  data: train, inference refused without a calibration, inference with ``--save_calibrated false``,
  calibrate, evaluate, inference of a folder of NIfTI files.
* Both: ``verify_metadata`` against the shipped schema with downloads made impossible,
  ``verify_net_in_out`` with the real (full-size) networks, and the multi-GPU config under ``torchrun``
  with 2 CPU processes on gloo (parameters identical across ranks afterwards: DDP synchronised them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
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
    copy_bundle,
    data_overrides,
    write_args,
)

TRAIN_CALIBRATE = ["configs/train.json", "configs/calibrate.json"]
OUTPUTS = ("seg", "score", "score_calibrated")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # light on a shared machine; torchrun would set it anyway
    return env


def _cli(bundle: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=bundle,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _run(bundle: Path, config_file, **overrides) -> None:
    """``monai.bundle.run`` in-process with ``bundle_root`` the bundle's copy (logging configuration left alone)."""
    from monai.bundle import run

    configs = [str(bundle / c) for c in ([config_file] if isinstance(config_file, str) else config_file)]
    run(config_file=configs, logging_file=False, bundle_root=str(bundle), **overrides)


def _check_outputs(output_dir: Path, volume: Path, expected=OUTPUTS, num_classes: int = 4) -> None:
    """Every output exists with the input's exact shape and affine, and holds sensible values."""
    source = nib.load(str(volume))
    stem = volume.name.removesuffix(".nii.gz")
    written = sorted(p.name for p in output_dir.glob("*.nii.gz"))
    assert written == sorted(f"{stem}_{kind}.nii.gz" for kind in expected)
    for kind in expected:
        image = nib.load(str(output_dir / f"{stem}_{kind}.nii.gz"))
        assert image.shape == source.shape, kind
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-4, err_msg=kind)
        data = np.asanyarray(image.dataobj)
        assert np.isfinite(data).all()
        if kind == "seg":
            assert image.get_data_dtype() == np.uint8
            assert set(np.unique(data)) <= set(range(num_classes))
        else:
            assert image.get_data_dtype() == np.float32
            assert data.min() >= 0
            if kind == "score_calibrated":
                assert data.max() <= 1


def test_the_bundle_tools_are_installed():
    """MONAI's bundle command line needs fire, verify_metadata needs jsonschema (both optional in MONAI)."""
    missing = [name for name in ("fire", "jsonschema") if importlib.util.find_spec(name) is None]
    assert not missing, f"install {missing} (pip install fire jsonschema): python -m monai.bundle needs them"


def test_unet_bundle_on_the_command_line_with_a_users_dataset(tmp_path, user_dataset):
    """--dataset_dir: a Decathlon-style folder (training volumes, the test volume scored by inference)."""
    bundle = copy_bundle("prototype_ood_unet_2d", tmp_path)
    tiny = {**TINY_NETWORK["prototype_ood_unet_2d"], **TINY_SLICES, "dataset_dir": str(user_dataset)}
    train_args = write_args(tmp_path / "train_args.json", TINY_TRAIN, tiny)
    infer_args = write_args(tmp_path / "infer_args.json", tiny)

    train = _cli(bundle, "run", "--config_file", "configs/train.json", "--args_file", str(train_args))
    assert (bundle / "models" / "model.pt").is_file()
    assert "val_mean_dice" in train.stdout + train.stderr

    _cli(bundle, "run", "--config_file", str(TRAIN_CALIBRATE), "--args_file", str(train_args))
    calibration = json.loads((bundle / "models" / "calibration.json").read_text())
    assert calibration["type"] == "weibull_min" and calibration["shape"] > 0 and calibration["scale"] > 0

    _cli(bundle, "run", "--config_file", "configs/inference.json", "--args_file", str(infer_args))
    _check_outputs(bundle / "eval", user_dataset / "imagesTs" / "case_a.nii.gz")


def test_deeplabv3_bundle_in_process(tmp_path, oblique_volume, brain_cache):
    bundle = copy_bundle("prototype_ood_deeplabv3", tmp_path)
    tiny = {**TINY_NETWORK["prototype_ood_deeplabv3"], **TINY_SLICES}
    training = {**TINY_TRAIN, **data_overrides(brain_cache)}
    volumes = str(oblique_volume.parent)

    _run(bundle, "configs/train.json", **training, **tiny)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("head.") for k in state) and any(k.startswith("prototypes.") for k in state)

    # No calibration yet: inference stops before reading any image, saying what to run.
    with pytest.raises(SystemExit, match=r"no Weibull calibration[\s\S]*configs/calibrate.json"):
        _run(bundle, "configs/inference.json", dataset_dir=volumes, **tiny)
    assert not (bundle / "eval").exists()
    # ... unless told not to write A_xi (the command line gives the string "false").
    _run(bundle, "configs/inference.json", dataset_dir=volumes, save_calibrated="false", **tiny)
    _check_outputs(bundle / "eval", oblique_volume, expected=("seg", "score"))

    _run(bundle, TRAIN_CALIBRATE, **training, **tiny)
    assert (bundle / "models" / "calibration.json").is_file()
    _run(bundle, ["configs/train.json", "configs/evaluate.json"], **training, **tiny)
    metrics = (bundle / "eval" / "metrics.csv").read_text()
    assert re.match(r"val_mean_dice,\d", metrics)

    for old in (bundle / "eval").glob("*.nii.gz"):
        old.unlink()
    _run(bundle, "configs/inference.json", dataset_dir=volumes, **tiny)
    _check_outputs(bundle / "eval", oblique_volume)


@pytest.mark.parametrize("name", NAMES)
def test_verify_metadata_offline(name, monkeypatch):
    import monai.apps.utils
    from monai.bundle import verify_metadata

    def no_download(*args, **kwargs):
        raise AssertionError("verify_metadata tried to download the schema")

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", no_download)
    verify_metadata(meta_file=str(BUNDLES / name / "configs" / "metadata.json"), filepath=str(SCHEMA))


def test_verify_metadata_rejects_incomplete_metadata(tmp_path):
    from monai.bundle import verify_metadata

    metadata = json.loads((BUNDLES / NAMES[0] / "configs" / "metadata.json").read_text())
    del metadata["numpy_version"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="numpy_version"):
        verify_metadata(meta_file=str(broken), filepath=str(SCHEMA))


@pytest.mark.parametrize("name", NAMES)
def test_verify_net_in_out(name):
    from monai.bundle import verify_net_in_out

    configs = BUNDLES / name / "configs"
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.json"),
        device="cpu",
    )


@pytest.mark.parametrize("name", NAMES)
def test_multigpu_training_with_torchrun_on_gloo(name, tmp_path, brain_cache):
    bundle = copy_bundle(name, tmp_path)
    # After training, every rank saves its parameters: DDP must have kept them identical.
    finalize = {
        "finalize": [
            "$torch.save({k: v.detach().cpu() for k, v in @network_def.named_parameters()}, "
            "@bundle_root + '/rank' + str(dist.get_rank()) + '.pt')",
            "$dist.is_initialized() and dist.destroy_process_group()",
        ]
    }
    args = write_args(
        tmp_path / "args.json",
        TINY_TRAIN,
        TINY_NETWORK[name],
        TINY_SLICES,
        data_overrides(brain_cache),
        finalize,
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','configs/train_multigpu.json']",
        "--args_file",
        str(args),
    ]
    result = subprocess.run(command, cwd=bundle, env=_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert (bundle / "models" / "model.pt").is_file()
    ranks = [torch.load(bundle / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between the ranks"
