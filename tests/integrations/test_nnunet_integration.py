"""nnU-Net v2 end to end, as a user runs it: a tiny synthetic raw dataset -> nnUNetv2_plan_and_preprocess ->
nnUNetv2_train -tr <prototype trainer> (found through nnUNet_extTrainer; it fits the default detector and
its calibration at the end) -> prediction with the detector's score maps in the prediction folder's
``ood/`` subfolder -> nnUNetv2_evaluate_folder and nnUNetv2_apply_postprocessing on that prediction folder
(they see the segmentations only) -> nnUNetv2_predict's -num_parts / -part_id and --c on one folder.

The nnU-Net commands run as subprocesses with the nnUNet_* variables of a temporary folder. The planned
network is shrunk (8 base features instead of 32) and the trainer variant runs 2 epochs of 3 iterations,
so the whole module takes about a minute and a half on a 2-core CPU. In CI (``CI`` set) a missing nnU-Net
is an error, not a skip: ``make test`` installs it.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

if importlib.util.find_spec("nnunetv2") is None:
    if os.environ.get("CI"):
        raise ImportError("nnunetv2 is not installed: `make setup` installs it (the nnunet extra)")
    pytest.skip("nnunetv2 is not installed (pip install 'monai-ood[nnunet]')", allow_module_level=True)

from monai_ood.calibration import Calibration, WeibullCalibrator, fingerprint  # noqa: E402
from monai_ood.integrations.nnunet import cli, nnUNetPrototypeOODPredictor  # noqa: E402

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
DATASET_ID = 987
DATASET = f"Dataset{DATASET_ID}_OODToy"
TRAINER = "nnUNetTrainerPrototypeOOD_Smoke"
CONFIG = "3d_fullres"
SUBPROCESS_TIMEOUT = 600


def _blob_case(rng: np.random.Generator, shape, spacing, angle: float):
    """A noisy volume with one bright ball (label 1), a zero slab nnU-Net crops away, and an oblique affine."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    centre = np.array(shape) / 2 + rng.uniform(-3, 3, 3)
    label = (np.linalg.norm(grid - centre, axis=-1) < rng.uniform(5, 8)).astype(np.uint8)
    image = 100 + 20 * rng.standard_normal(shape) + 200 * label
    image[:2] = 0
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = [-10.0, 5.0, 20.0]
    return image.astype(np.float32), label, affine


def _make_raw_dataset(raw: Path) -> Path:
    folder = raw / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    # 6 cases: nnU-Net's 5-fold split gives fold 0 two validation cases; the toy cases are smaller than
    # the patch, so all patches of one case hold the same voxels and the detector's intensity term needs two
    num_training = 6
    for i in range(num_training):
        shape = tuple(int(s) for s in rng.integers(30, 35, 3))
        image, label, affine = _blob_case(rng, shape, (1.0, 1.1 + 0.05 * i, 1.3), 0.0)
        nib.save(nib.Nifti1Image(image, affine), folder / "imagesTr" / f"toy_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / f"toy_{i:03d}.nii.gz")
    # test cases on other grids than the training ones: resampled, cropped and oblique
    grids = [((33, 31, 29), (1.1, 1.25, 1.4), 0.3), ((40, 30, 36), (0.9, 1.0, 1.2), 0.0)]
    for i, (shape, spacing, angle) in enumerate(grids):
        image, label, affine = _blob_case(rng, shape, spacing, angle)
        nib.save(nib.Nifti1Image(image, affine), folder / "imagesTs" / f"test_{i:03d}_0000.nii.gz")
        nib.save(
            nib.Nifti1Image(label, affine), folder / "labelsTs" / f"test_{i:03d}.nii.gz"
        )  # for evaluation
    dataset_json = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "blob": 1},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    return folder


def _shrink_plans(plans_file: Path) -> None:
    """8 base features instead of nnU-Net's 32: a CPU-sized network with the same stages and patch."""
    plans = json.loads(plans_file.read_text())
    for configuration in plans["configurations"].values():
        arch = configuration.get("architecture", {}).get("arch_kwargs", {})
        if "features_per_stage" in arch:
            arch["features_per_stage"] = [f // 4 for f in arch["features_per_stage"]]
    plans_file.write_text(json.dumps(plans, indent=1))


def _run(command: list[str], env: dict[str, str], log: Path) -> str:
    start = time.perf_counter()
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, encoding="utf-8", timeout=SUBPROCESS_TIMEOUT
    )
    seconds = time.perf_counter() - start
    log.write_text(f"{seconds:.1f} s\n{result.stdout}\n--- stderr ---\n{result.stderr}", encoding="utf-8")
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def _use_nnunet_env(monkeypatch, nnunet) -> None:
    """The nnUNet_* variables of the toy model in this process (nnU-Net reads them when it needs them)."""
    for name, value in nnunet["env"].items():
        if name.startswith("nnUNet_"):
            monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    """The trained toy model: folders, environment and the subprocess logs."""
    root = tmp_path_factory.mktemp("nnunet")
    paths = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    raw_folder = _make_raw_dataset(paths["nnUNet_raw"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update({name: str(path) for name, path in paths.items()})
    env.update(
        nnUNet_extTrainer=os.pathsep.join([str(cli.trainer_folder()), str(HERE / "nnunet_trainers")]),
        nnUNet_def_n_proc="1",  # one export / evaluation worker instead of 8 spawned ones
        nnUNet_compile="0",
        PYTHONUNBUFFERED="1",
    )
    if importlib.util.find_spec("timm") is None:
        # nnU-Net's trainer lookup imports its Primus trainers (timm) before reading nnUNet_extTrainer
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE / "stubs"), env.get("PYTHONPATH")) if p)

    plan = [str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", CONFIG]
    _run([*plan, "-np", "1", "-npfp", "1"], env, root / "plan.log")
    _shrink_plans(paths["nnUNet_preprocessed"] / DATASET / "nnUNetPlans.json")
    train_log = _run(
        [str(BIN / "nnUNetv2_train"), str(DATASET_ID), CONFIG, "0", "-tr", TRAINER, "-device", "cpu"],
        {**env, "nnUNet_n_proc_DA": "0"},  # augmentation in the main process (planning needs it > 0)
        root / "train.log",
    )
    model = paths["nnUNet_results"] / DATASET / f"{TRAINER}__nnUNetPlans__{CONFIG}"
    return {"root": root, "env": env, "raw": raw_folder, "model": model, "train_log": train_log, **paths}


def test_nnunet_trainer_trains_logs_and_calibrates(nnunet):
    fold = nnunet["model"] / "fold_0"
    assert f"Using trainer '{TRAINER}'" in nnunet["train_log"]  # found through nnUNet_extTrainer

    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    weights = checkpoint["network_weights"]
    assert any(k.startswith("head.") for k in weights) and "prototypes.means" in weights
    assert weights["prototypes.means"].shape == (2, 16)  # K = background + blob, c_g = 16
    assert any(k.startswith("backbone.decoder.seg_layers.") for k in weights)  # deep supervision heads kept

    logging = checkpoint["logging"]
    for key in ("train_ood_losses", "val_ood_losses"):
        assert len(logging[key]) == 2 and np.isfinite(logging[key]).all(), (key, logging[key])
    assert len(logging["train_losses"]) == 2
    training_log = next(fold.glob("training_log_*.txt")).read_text()
    assert "train_ood_loss" in training_log and "val_ood_loss" in training_log

    # the default detector beside the checkpoint, its terms on every encoder stage of the plan
    plans = json.loads((nnunet["model"] / "plans.json").read_text())
    n_stages = plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]["n_stages"]
    detector = torch.load(fold / "ood_detector.pt", map_location="cpu", weights_only=True)
    assert detector["format"] == "monai-ood-detector"
    layers = [term["config"]["layer"] for term in detector["terms"] if "layer" in term["config"]]
    assert sorted(set(layers)) == [f"encoder.stages.{i}" for i in range(n_stages)]
    assert detector["num_train"] == 8  # ood_detector_train_patches of the test trainer

    # the calibration record of its map, bound to these weights and this detector
    record = json.loads((fold / "ood_calibration.json").read_text())
    assert (record["format"], record["map"], record["front_end"]) == (
        "monai-ood-calibration",
        "fused",
        "nnunet",
    )
    assert record["fingerprint"] == fingerprint(weights, detector)
    split = json.loads((nnunet["nnUNet_preprocessed"] / DATASET / "splits_final.json").read_text())[0]
    metadata = record["metadata"]
    assert (metadata["fold"], metadata["checkpoint"], metadata["cases"]) == (
        0,
        "checkpoint_final.pth",
        split["val"],
    )
    calibration = Calibration.load(
        fold / "ood_calibration.json", map="fused", fingerprint=record["fingerprint"]
    )
    assert calibration.weibull.shape > 0
    assert "OOD detector on ['encoder.stages.0'" in training_log
    assert "final validation skipped (test trainer)" in training_log  # see monai_ood_test_trainers.py


def _cases(inputs: Path) -> list[str]:
    return sorted(p.name[: -len("_0000.nii.gz")] for p in inputs.glob("*_0000.nii.gz"))


def _table(output: Path) -> list[dict]:
    with open(output / "ood" / "ood_scores.csv", encoding="utf-8") as table:
        return list(csv.DictReader(table))


def _check_outputs(output: Path, inputs: Path) -> list[dict]:
    cases = _cases(inputs)
    assert cases
    # nnU-Net's folder holds its segmentations only; the maps and the table are in ood/
    assert sorted(p.name for p in output.glob("*.nii.gz")) == [f"{case}.nii.gz" for case in cases]
    assert not list(output.glob("*_score*")) and not (output / "ood_scores.csv").exists()
    for case in cases:
        source = nib.load(inputs / f"{case}_0000.nii.gz")
        segmentation = nib.load(output / f"{case}.nii.gz")
        assert segmentation.shape == source.shape
        np.testing.assert_allclose(segmentation.affine, source.affine, atol=1e-5)
        for suffix in ("_score", "_score_calibrated"):
            score_map = nib.load(output / "ood" / f"{case}{suffix}.nii.gz")
            assert score_map.shape == source.shape, suffix
            assert np.array_equal(score_map.affine, source.affine), suffix  # the input's affine, bit for bit
            values = np.asarray(score_map.dataobj)
            assert values.dtype == np.float32 and np.isfinite(values).all() and values.min() >= 0
            if suffix == "_score_calibrated":
                assert values.max() <= 1
            assert values.max() > 0
    rows = _table(output)
    assert [r["case"] for r in rows] == cases
    for row in rows:
        assert np.isfinite(float(row["image_score"])) and 0 <= float(row["calibrated_degree"]) <= 1
        assert Path(row["score_map"]) == output / "ood" / f"{row['case']}_score.nii.gz"
    assert json.loads((output / "ood" / "ood_scores.json").read_text())[0]["case"] == cases[0]
    return rows


@pytest.fixture(scope="module")
def predicted(nnunet):
    """``python -m monai_ood.integrations.nnunet predict`` (run in-process here: its nnU-Net worker processes
    are spawned all the same) with nnU-Net's default, parallel path: preprocessing and export workers."""
    output = nnunet["root"] / "predicted"
    model = ["-d", str(DATASET_ID), "-c", CONFIG, "-tr", TRAINER, "-f", "0"]
    folders = ["-i", str(nnunet["raw"] / "imagesTs"), "-o", str(output)]
    options = ["-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(printed):
        _use_nnunet_env(monkeypatch, nnunet)
        assert cli.main(["predict", *folders, *model, *options]) == 0
    return {"folder": output, "printed": printed.getvalue()}


def test_predict_command_writes_maps_at_input_geometry(nnunet, predicted):
    rows = _check_outputs(predicted["folder"], nnunet["raw"] / "imagesTs")
    assert all(f"{row['case']}: image score" in predicted["printed"] for row in rows)


def test_nnunet_evaluation_and_postprocessing_see_only_the_segmentations(nnunet, predicted):
    """nnU-Net's own tools take every ``*.nii.gz`` of a prediction folder for a case: on our folder they
    must find the segmentations, each with its reference, and nothing else (the maps are in ood/)."""
    folder, env = predicted["folder"], nnunet["env"]
    cases = _cases(nnunet["raw"] / "imagesTs")
    labels = nnunet["raw"] / "labelsTs"
    # without --chill nnU-Net also insists on a prediction for every reference case
    evaluate = [str(BIN / "nnUNetv2_evaluate_folder"), str(labels), str(folder), "-np", "1"]
    evaluate += ["-djfile", str(folder / "dataset.json"), "-pfile", str(folder / "plans.json")]
    _run(evaluate, env, nnunet["root"] / "evaluate.log")
    summary = json.loads((folder / "summary.json").read_text())
    per_case = summary["metric_per_case"]
    assert sorted(Path(c["prediction_file"]).name for c in per_case) == [f"{c}.nii.gz" for c in cases]
    assert sorted(Path(c["reference_file"]).name for c in per_case) == [f"{c}.nii.gz" for c in cases]
    dice = [c["metrics"]["1"]["Dice"] for c in per_case]
    assert all(np.isfinite(d) and 0 <= d <= 1 for d in dice), dice

    # nnU-Net's postprocessing, with a postprocessing.pkl as nnUNetv2_find_best_configuration writes it
    from batchgenerators.utilities.file_and_folder_operations import save_pickle
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation,
    )

    pkl = nnunet["root"] / "postprocessing.pkl"
    save_pickle(([remove_all_but_largest_component_from_segmentation], [{"labels_or_regions": [1]}]), pkl)
    postprocessed = nnunet["root"] / "postprocessed"
    apply = [str(BIN / "nnUNetv2_apply_postprocessing"), "-i", str(folder), "-o", str(postprocessed)]
    _run([*apply, "-pp_pkl_file", str(pkl), "-np", "1"], env, nnunet["root"] / "postprocess.log")
    assert sorted(p.name for p in postprocessed.iterdir()) == [f"{c}.nii.gz" for c in cases]
    for case in cases:  # each file is our segmentation, postprocessed
        ours, theirs = nib.load(folder / f"{case}.nii.gz"), nib.load(postprocessed / f"{case}.nii.gz")
        expected = remove_all_but_largest_component_from_segmentation(np.asarray(ours.dataobj), [1])
        assert theirs.shape == ours.shape and np.array_equal(np.asarray(theirs.dataobj), expected)


def test_sequential_prediction_and_calibrate_command_in_process(nnunet, predicted, monkeypatch, capsys):
    _use_nnunet_env(monkeypatch, nnunet)

    # calibration for another checkpoint, stored beside it under its own name
    calibrate = ["calibrate", str(DATASET_ID), CONFIG, "0", "-tr", TRAINER, "-chk", "checkpoint_best.pth"]
    assert cli.main([*calibrate, "-device", "cpu"]) == 0
    fold = nnunet["model"] / "fold_0"
    best = Calibration.load(fold / "ood_calibration_checkpoint_best.json")
    assert best.metadata["checkpoint"] == "checkpoint_best.pth" and best.front_end == "nnunet"
    weights = torch.load(fold / "checkpoint_best.pth", map_location="cpu", weights_only=False)[
        "network_weights"
    ]
    detector = torch.load(fold / "ood_detector_checkpoint_best.pt", map_location="cpu", weights_only=True)
    assert best.fingerprint == fingerprint(weights, detector)
    printed = capsys.readouterr().out
    assert "ood_calibration_checkpoint_best.json" in printed and "ood_detector_checkpoint_best.pt" in printed

    # nnU-Net's sequential path (-npp 0 -nps 0): no worker processes; same maps as the parallel path
    output = nnunet["root"] / "predicted_sequential"
    predict = [
        "predict",
        "-i",
        str(nnunet["raw"] / "imagesTs"),
        "-o",
        str(output),
        "-m",
        str(nnunet["model"]),
    ]
    sequential = ["-npp", "0", "-nps", "0", "--disable_tta", "--disable_progress_bar"]
    assert cli.main([*predict, "-f", "0", "-device", "cpu", *sequential]) == 0
    _check_outputs(output, nnunet["raw"] / "imagesTs")
    # without a calibration there is no A_xi, and nothing pretends otherwise
    predictor = nnUNetPrototypeOODPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(nnunet["model"]), (0,))
    assert predictor.calibrations[0] is not None
    predictor.calibrations = [None]
    maps = predictor.predict_ood_maps(torch.randn(1, 20, 24, 36))
    assert maps["calibrated"] is None and maps["score"].shape == (20, 24, 36)
    assert np.isfinite(maps["image_score"])

    # the parallel path's maps (its segmentation mirrored, the maps never are)
    parallel = predicted["folder"] / "ood"
    for path in (output / "ood").glob("*_score*.nii.gz"):
        ours, theirs = nib.load(path).dataobj, nib.load(parallel / path.name).dataobj
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)


def test_parts_and_continue_fill_one_folder_and_one_table(nnunet, monkeypatch, capsys):
    """-num_parts / -part_id split the cases over calls into one folder and one table; --c then skips a
    case only when its segmentation, both maps and its table row are there (sequential path, CPU)."""
    _use_nnunet_env(monkeypatch, nnunet)
    inputs, output = nnunet["raw"] / "imagesTs", nnunet["root"] / "predicted_in_parts"
    cases = _cases(inputs)
    assert len(cases) == 2
    predict = ["predict", "-i", str(inputs), "-o", str(output), "-m", str(nnunet["model"]), "-f", "0"]
    predict += ["-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta", "--disable_progress_bar"]

    with pytest.raises(SystemExit) as refused:
        cli.main([*predict, "-num_parts", "2", "-part_id", "2"])
    assert "-part_id must lie in 0..1" in str(refused.value.code)

    on_device = []  # what the predictor is told (nnU-Net turns it off on CPU by itself)
    init = nnUNetPrototypeOODPredictor.__init__

    def spy(self, *args, **kwargs):
        on_device.append(kwargs["perform_everything_on_device"])
        init(self, *args, **kwargs)

    monkeypatch.setattr(nnUNetPrototypeOODPredictor, "__init__", spy)
    assert cli.main([*predict, "-num_parts", "2", "-part_id", "1", "--not_on_device"]) == 0
    assert on_device == [False]
    assert sorted(p.name for p in output.glob("*.nii.gz")) == [f"{cases[1]}.nii.gz"]  # cases[1::2]
    assert [row["case"] for row in _table(output)] == [cases[1]]
    assert cli.main([*predict, "-num_parts", "2", "-part_id", "0"]) == 0
    assert on_device == [False, True]
    _check_outputs(output, inputs)  # both parts' cases, one table
    capsys.readouterr()

    def written() -> dict[str, float]:
        files = [*output.glob("*.nii.gz"), *(output / "ood").glob("*.nii.gz")]
        return {p.name: p.stat().st_mtime_ns for p in files}

    before = written()
    assert cli.main([*predict, "--c"]) == 0
    assert "2 of 2 cases have their segmentation, OOD maps and table row already" in capsys.readouterr().out
    assert written() == before
    (output / "ood" / f"{cases[0]}_score_calibrated.nii.gz").unlink()  # as if stopped before A_xi
    assert cli.main([*predict, "--continue_prediction"]) == 0
    printed = capsys.readouterr().out
    assert "1 of 2 cases" in printed and f"{cases[0]}: image score" in printed
    assert f"{cases[1]}: image score" not in printed
    after = written()
    assert all(after[name] == time for name, time in before.items() if name.startswith(cases[1]))
    assert after[f"{cases[0]}.nii.gz"] != before[f"{cases[0]}.nii.gz"]
    _check_outputs(output, inputs)


def test_nnunet_predictor_segments_with_the_wrapped_network(nnunet, monkeypatch):
    """nnU-Net's own predictor (what nnUNetv2_predict runs) finds the trainer through nnUNet_extTrainer,
    rebuilds the wrapper with it, loads the checkpoint and segments: the head does not get in its way."""
    _use_nnunet_env(monkeypatch, nnunet)
    stub = importlib.util.find_spec("timm") is None
    if stub:
        monkeypatch.syspath_prepend(str(HERE / "stubs"))
    try:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        from monai_ood.integrations.nnunet import nnUNetPrototypeOODNet

        predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(nnunet["model"]), (0,), "checkpoint_final.pth")
        assert isinstance(predictor.network, nnUNetPrototypeOODNet)
        output = nnunet["root"] / "predicted_by_nnunet"
        output.mkdir()  # nnU-Net's sequential prediction does not create it
        predictor.predict_from_files_sequential(str(nnunet["raw"] / "imagesTs"), str(output))
    finally:
        if stub:  # the stand-in must not outlive this test
            for module in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
                del sys.modules[module]
    for source in (nnunet["raw"] / "imagesTs").glob("*_0000.nii.gz"):
        segmentation = nib.load(output / source.name.replace("_0000.nii.gz", ".nii.gz"))
        assert segmentation.shape == nib.load(source).shape
        assert not (output / source.name.replace("_0000.nii.gz", "_score.nii.gz")).exists()
        assert not (output / "ood").exists()


def test_predict_refuses_stale_old_or_missing_ood_files_in_one_line(nnunet, monkeypatch, tmp_path):
    """A re-trained fold (other weights), a calibration of an older monai-ood and a missing detector each
    stop ``predict`` before any work with one line that names the command fitting them again."""
    _use_nnunet_env(monkeypatch, nnunet)
    model = tmp_path / "model"
    shutil.copytree(nnunet["model"], model, ignore=shutil.ignore_patterns("*checkpoint_best*", "validation"))
    fold = model / "fold_0"
    shutil.copy(nnunet["model"] / "fold_0" / "checkpoint_best.pth", fold)  # without its detector
    checkpoint_file = fold / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    key = next(k for k in checkpoint["network_weights"] if k.endswith("conv.weight"))
    checkpoint["network_weights"][key] += 1e-3  # as if the fold had been trained again
    torch.save(checkpoint, checkpoint_file)
    predict = [
        "predict",
        "-i",
        str(nnunet["raw"] / "imagesTs"),
        "-o",
        str(tmp_path / "out"),
        "-m",
        str(model),
    ]
    predict += ["-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar"]
    command = f"python -m monai_ood.integrations.nnunet calibrate {DATASET} {CONFIG} 0 -tr {TRAINER}"

    def refusal_of(arguments: list[str], remedy: str) -> str:
        with pytest.raises(SystemExit) as stop:
            cli.main(arguments)
        message = str(stop.value.code)
        assert "\n" not in message and remedy in message, message
        return message

    def refusal() -> str:
        return refusal_of(predict, command)

    best = refusal_of(
        [*predict, "-chk", "checkpoint_best.pth"], f"{command} -p nnUNetPlans -chk checkpoint_best.pth"
    )
    assert "no default detector (ood_detector_checkpoint_best.pt)" in best
    assert "other weights" in refusal()
    WeibullCalibrator().fit(np.random.default_rng(0).weibull(2.0, 100)).save(fold / "ood_calibration.json")
    assert "bare Weibull fit" in refusal()
    (fold / "ood_detector.pt").unlink()
    assert "no default detector" in refusal()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.nii.gz"))
