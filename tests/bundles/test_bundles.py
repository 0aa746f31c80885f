"""The MONAI bundles under bundles/, run as a user runs them (tiny networks, 2 training iterations).

* U-Net: ``python -m monai.bundle run`` on the command line, on a user's Decathlon-style folder
  (``--dataset_dir``): train -> calibrate (the default detector and its calibration record, checked
  against an independent fit) -> inference of the folder's oblique test volume (maps and score table),
  then a calibration made stale by changed weights, refused in one line.
* DeepLabV3: the same ``monai.bundle.run`` in-process (what the command line calls) on the embedded brain
  data: train, inference refused without the post-hoc step, calibrate, evaluate, inference of a folder of
  NIfTI files, compared with ``monai-ood score`` on a ``model.pt`` made of the bundle's files (the same
  slices reach the network, as in training; the same maps and score table), and an old-format
  calibration refused in one line.
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
    TINY_POSTHOC,
    TINY_SLICES,
    TINY_TRAIN,
    bundle_network,
    copy_bundle,
    data_overrides,
    run_bundle_on_two_ranks,
    slice_preprocessing,
    write_args,
)

TRAIN_CALIBRATE = ["configs/train.json", "configs/calibrate.json"]
OUTPUTS = ("seg", "score", "score_calibrated")
# the row fields of the score table of monai-ood score (monai_ood.io.tables.SCORE_FIELDS, spelled out)
SCORE_COLUMNS = "input,status,error,level,slice,position_mm,has_signal,foreground_fraction,image_score,ood_degree,calibrated_degree"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # light on a shared machine; torchrun would set it anyway
    return env


def _cli(bundle: Path, *args: str, timeout: int = 300, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=bundle,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if ok:
        assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _run(bundle: Path, config_file, **overrides) -> None:
    """``monai.bundle.run`` in-process with ``bundle_root`` the bundle's copy (logging configuration left alone)."""
    from monai.bundle import run

    configs = [str(bundle / c) for c in ([config_file] if isinstance(config_file, str) else config_file)]
    run(config_file=configs, logging_file=False, bundle_root=str(bundle), **overrides)


def _one_line_refusal(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def _check_outputs(output_dir: Path, volumes, num_classes: int = 4) -> list[dict]:
    """Every map exists with its input's exact shape and affine and holds sensible values; the score table
    has one ok volume row per input with finite scores (and the slice rows of each): returns the rows."""
    stems = [volume.name.removesuffix(".nii.gz") for volume in volumes]
    written = sorted(p.name for p in output_dir.glob("*.nii.gz"))
    assert written == sorted(f"{stem}_{kind}.nii.gz" for stem in stems for kind in OUTPUTS)
    for volume, stem in zip(volumes, stems, strict=True):
        source = nib.load(str(volume))
        for kind in OUTPUTS:
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
    assert (output_dir / "scores.csv").read_text().splitlines()[0] == SCORE_COLUMNS
    table = json.loads((output_dir / "scores.json").read_text())
    rows = table["volumes"]
    assert [Path(row["input"]).resolve() for row in rows] == [Path(v).resolve() for v in volumes]
    for row, stem in zip(rows, stems, strict=True):
        assert row["status"] == "ok" and row["error"] is None
        assert np.isfinite(row["image_score"]) and 0.0 <= row["calibrated_degree"] <= 1.0
        assert Path(row["calibrated_map"]).name == f"{stem}_score_calibrated.nii.gz"
        slices = [s for s in table["slices"] if s["input"] == row["input"]]
        assert slices and all(
            np.isfinite(s["image_score"]) and 0 <= s["calibrated_degree"] <= 1 for s in slices
        )
        # the volume's scores are the means over its slices with signal (monai_ood.inference)
        signal = [s for s in slices if s["has_signal"]]
        assert row["image_score"] == pytest.approx(np.mean([s["image_score"] for s in signal]), rel=1e-5)
        assert row["calibrated_degree"] == pytest.approx(
            np.mean([s["calibrated_degree"] for s in signal]), rel=1e-5
        )
    return rows


def _check_posthoc(bundle: Path, overrides: dict, val_items) -> None:
    """models/detector.pt and models/calibration.json against an independent reading: the detector loads
    onto the trained network, the record calibrates its "fused" map, is bound to the fingerprint of these
    weights and this detector, and its Weibull is scipy's fit of the detector's maps on the validation
    slices."""
    from scipy import stats

    from monai_ood.calibration import fingerprint
    from monai_ood.engines.checkpoint import load_detector

    network, _ = bundle_network(bundle, overrides)
    detector = load_detector(bundle / "models" / "detector.pt", network)
    record = json.loads((bundle / "models" / "calibration.json").read_text())
    assert (record["format"], record["version"]) == ("monai-ood-calibration", 1)
    assert (record["map"], record["front_end"]) == ("fused", "bundle")
    assert record["fingerprint"] == fingerprint(network, detector.to_state())
    with torch.no_grad():
        images = torch.from_numpy(np.stack([item["image"] for item in val_items]))
        maps = detector.segment_and_score(images)[2].double().numpy().ravel()
    shape, _, scale = stats.weibull_min.fit(maps, floc=0)
    weibull = record["weibull"]
    assert weibull["num_samples"] == maps.size
    assert weibull["shape"] == pytest.approx(shape, rel=2e-3) and weibull["scale"] == pytest.approx(
        scale, rel=2e-3
    )


def test_the_bundle_tools_are_installed():
    """MONAI's bundle command line needs fire, verify_metadata needs jsonschema (both optional in MONAI)."""
    missing = [name for name in ("fire", "jsonschema") if importlib.util.find_spec(name) is None]
    assert not missing, f"install {missing} (pip install fire jsonschema): python -m monai.bundle needs them"


def test_unet_bundle_on_the_command_line_with_a_users_dataset(tmp_path, user_dataset):
    """--dataset_dir: a Decathlon-style folder (training volumes, the test volume scored by inference)."""
    from monai_ood.bundle import load_slices

    name = "prototype_ood_unet_2d"
    bundle = copy_bundle(name, tmp_path)
    tiny = {**TINY_NETWORK[name], **TINY_SLICES, "dataset_dir": str(user_dataset)}
    train_args = write_args(tmp_path / "train_args.json", TINY_TRAIN, tiny, TINY_POSTHOC[name])
    infer_args = write_args(tmp_path / "infer_args.json", tiny)

    train = _cli(bundle, "run", "--config_file", "configs/train.json", "--args_file", str(train_args))
    assert (bundle / "models" / "model.pt").is_file()
    assert "val_mean_dice" in train.stdout + train.stderr

    _cli(bundle, "run", "--config_file", str(TRAIN_CALIBRATE), "--args_file", str(train_args))
    # the validation slices: the held-out training volume, the first 4 (TINY_TRAIN)
    val_items = load_slices("validation", user_dataset / "dataset.json", slice_preprocessing(), 4)[:4]
    _check_posthoc(bundle, TINY_NETWORK[name], val_items)

    _cli(bundle, "run", "--config_file", "configs/inference.json", "--args_file", str(infer_args))
    _check_outputs(bundle / "eval", [user_dataset / "imagesTs" / "case_a.nii.gz"])

    # The weights change after calibrating (e.g. trained again): inference refuses, in one line, before
    # writing anything.
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 0.01
    torch.save(state, bundle / "models" / "model.pt")
    before = {p.name: p.stat().st_mtime_ns for p in (bundle / "eval").iterdir()}
    refused = _cli(
        bundle, "run", "--config_file", "configs/inference.json", "--args_file", str(infer_args), ok=False
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: .*fitted for other weights or another detector.*configs/calibrate\.json.*", last
    )
    assert {p.name: p.stat().st_mtime_ns for p in (bundle / "eval").iterdir()} == before


def _capture_network_inputs(network_type, size):
    """Record every input batch of a ``network_type`` forward (spatial size ``size``) in the process."""
    captured: list[np.ndarray] = []

    def hook(module, args):
        if isinstance(module, network_type) and tuple(args[0].shape[2:]) == tuple(size):
            captured.append(args[0].detach().cpu().numpy())

    return captured, torch.nn.modules.module.register_module_forward_pre_hook(hook)


def _cli_checkpoint(bundle: Path, overrides: dict, path: Path) -> Path:
    """A model.pt of monai-ood's command line made of the bundle's files: the preset network with the
    bundle's weights (a strict load), its detector and its calibration record."""
    from monai_ood.calibration import Calibration
    from monai_ood.engines.checkpoint import build_network, load_detector, make_model_config, save_model

    trained, parser = bundle_network(bundle, overrides)
    backbone = parser.get("backbone")
    preset = {"monai.networks.nets.UNet": "unet", "monai_ood.networks.deeplabv3.DeepLabV3": "deeplabv3"}
    kwargs = {
        k: v
        for k, v in backbone.items()
        if k not in ("_target_", "spatial_dims", "in_channels", "out_channels")
    }
    config = make_model_config(
        preset[backbone["_target_"]],
        2,
        1,
        parser.get("num_classes"),
        parser.get("network_def#head_channels"),
        kwargs,
    )
    net = build_network(config)
    net.load_state_dict(trained.state_dict())
    save_model(
        path,
        net,
        config,
        slice_preprocessing(),
        calibration=Calibration.load(bundle / "models" / "calibration.json"),
        detector=load_detector(bundle / "models" / "detector.pt", net),
    )
    return path


def test_deeplabv3_bundle_in_process(tmp_path, oblique_volume, brain_cache):
    from monai_ood import cli
    from monai_ood.bundle import load_slices
    from monai_ood.engines.checkpoint import load_model
    from monai_ood.networks import DeepLabV3

    name = "prototype_ood_deeplabv3"
    bundle = copy_bundle(name, tmp_path)
    tiny = {**TINY_NETWORK[name], **TINY_SLICES}
    training = {**TINY_TRAIN, **data_overrides(brain_cache)}
    volumes = str(oblique_volume.parent)

    _run(bundle, "configs/train.json", **training, **tiny)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("head.") for k in state) and any(k.startswith("prototypes.") for k in state)

    # No post-hoc step yet: inference stops before reading any image, saying what to run.
    with pytest.raises(SystemExit) as refused:
        _run(bundle, "configs/inference.json", dataset_dir=volumes, **tiny)
    assert re.search(r"no default detector at .*configs/calibrate\.json", _one_line_refusal(refused))
    assert not (bundle / "eval").exists()

    _run(bundle, TRAIN_CALIBRATE, **training, **tiny, **TINY_POSTHOC[name])
    val_items = load_slices("validation", preprocessing=slice_preprocessing(), cache_dir=brain_cache)[:4]
    _check_posthoc(bundle, TINY_NETWORK[name], val_items)
    _run(bundle, ["configs/train.json", "configs/evaluate.json"], **training, **tiny)
    metrics = (bundle / "eval" / "metrics.csv").read_text()
    assert re.match(r"val_mean_dice,\d", metrics)
    # ... and its record (what docs/evaluate_results.json and metadata's eval_metrics are copied from):
    # the same mean Dice, the Dice of each class on the 4 test slices evaluated (TINY_TRAIN)
    results = json.loads((bundle / "eval" / "evaluate_results.json").read_text())
    assert results["split"] == "test" and results["num_images"] == 4
    mean_dice = float(metrics.split(",")[1].split()[0])
    assert results["metrics"]["val_mean_dice"] == pytest.approx(mean_dice, abs=5e-5)
    assert set(results["metrics"]) == {
        "val_mean_dice",
        "val_dice_csf",
        "val_dice_grey_matter",
        "val_dice_white_matter",
    }

    captured, handle = _capture_network_inputs(DeepLabV3, TINY_SLICES["image_size"])
    try:
        _run(bundle, "configs/inference.json", dataset_dir=volumes, **tiny)
        bundle_slices = np.concatenate(captured)
        captured.clear()
        # monai-ood score on the same weights, detector and calibration (its own checks accept the record)
        checkpoint = _cli_checkpoint(bundle, TINY_NETWORK[name], tmp_path / "cli" / "model.pt")
        assert load_model(checkpoint, device="cpu").calibration_error is None
        argv = ["score", volumes, "--checkpoint", str(checkpoint), "--output", str(tmp_path / "cli" / "out")]
        assert cli.main([*argv, "--no-slicer-files", "--quiet", "--device", "cpu"]) == 0
        cli_slices = np.concatenate(captured)
    finally:
        handle.remove()
    (bundle_row,) = _check_outputs(bundle / "eval", [oblique_volume])

    # One grid path: the oblique, anisotropic volume reaches the network as the same slices through the
    # bundle, the command line and training (a datalist of it, with an empty label).
    labels = tmp_path / "label.nii.gz"
    source = nib.load(str(oblique_volume))
    nib.save(nib.Nifti1Image(np.zeros(source.shape, np.uint8), source.affine), str(labels))
    datalist = tmp_path / "datalist.json"
    entry = {"image": str(oblique_volume), "label": str(labels)}
    datalist.write_text(json.dumps({"training": [entry], "validation": [entry]}))
    training_slices = np.stack(
        [item["image"] for item in load_slices("training", datalist, slice_preprocessing())]
    )
    assert bundle_slices.shape == cli_slices.shape == training_slices.shape
    np.testing.assert_array_equal(bundle_slices, cli_slices)
    np.testing.assert_allclose(bundle_slices, training_slices, atol=1e-5)

    # ... and the bundle writes what monai-ood score writes: the same maps and the same table.
    stem = oblique_volume.name.removesuffix(".nii.gz")
    for kind in OUTPUTS:
        ours = nib.load(str(bundle / "eval" / f"{stem}_{kind}.nii.gz"))
        theirs = nib.load(str(tmp_path / "cli" / "out" / f"{stem}_{kind}.nii.gz"))
        np.testing.assert_array_equal(ours.affine, theirs.affine)
        np.testing.assert_allclose(
            np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj), rtol=1e-5, atol=1e-6
        )
    ours, theirs = (
        json.loads((folder / "scores.json").read_text())
        for folder in (bundle / "eval", tmp_path / "cli" / "out")
    )
    (cli_row,) = theirs["volumes"]
    assert bundle_row["status"] == cli_row["status"] == "ok"
    for key in ("image_score", "calibrated_degree"):
        assert bundle_row[key] == pytest.approx(cli_row[key], rel=1e-6), key
    assert len(ours["slices"]) == len(theirs["slices"])
    for mine, reference in zip(ours["slices"], theirs["slices"], strict=True):
        assert mine.keys() == reference.keys()
        for key in mine.keys() - {"input"}:
            expected = reference[key]
            assert mine[key] == (
                pytest.approx(expected, rel=1e-6) if isinstance(expected, float) else expected
            ), key

    # A calibration of the format before the record (a bare Weibull fit) is refused in one line.
    record = json.loads((bundle / "models" / "calibration.json").read_text())
    (bundle / "models" / "calibration.json").write_text(json.dumps(record["weibull"]))
    with pytest.raises(SystemExit) as refused:
        _run(bundle, "configs/inference.json", dataset_dir=volumes, **tiny)
    assert "bare Weibull fit" in _one_line_refusal(refused)


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
    run_bundle_on_two_ranks(bundle, "['configs/train.json','configs/multi_gpu_train.json']", args)
    assert (bundle / "models" / "model.pt").is_file()
    ranks = [torch.load(bundle / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between the ranks"
