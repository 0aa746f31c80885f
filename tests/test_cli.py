"""End to end through the command line, as a user runs it: train -> calibrate -> score, tiny sizes."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from monai_ood.cli import main

NET = '{"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}'


def _phantom(rng, shape=(40, 48, 12)):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 1.6) ** 2
    label = np.zeros(shape, np.uint8)
    label[r < 1] = 1
    label[r < 0.5] = 2
    label[((x - 0.3) ** 2 + y**2) < 0.05] = 3
    image = np.choose(label, [0.0, 300.0, 600.0, 150.0]) + rng.normal(0, 10, shape)
    return image.astype(np.float32), label


def _oblique_affine(spacing=(2.0, 2.2, 3.0), origin=(-40.0, 12.5, 30.0)):
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xz", [12, 20], degrees=True).as_matrix() @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    entries = {"training": [], "validation": [], "test": []}
    for split, count in (("training", 2), ("validation", 1), ("test", 1)):
        for k in range(count):
            image, label = _phantom(rng)
            affine = np.diag([2.0, 2.0, 3.0, 1.0])
            nib.save(nib.Nifti1Image(image, affine), root / f"{split}{k}_img.nii.gz")
            nib.save(nib.Nifti1Image(label, affine), root / f"{split}{k}_lbl.nii.gz")
            entries[split].append({"image": f"{split}{k}_img.nii.gz", "label": f"{split}{k}_lbl.nii.gz"})
    (root / "datalist.json").write_text(json.dumps(entries))
    oblique_image, _ = _phantom(rng, (36, 30, 10))
    nib.save(nib.Nifti1Image(oblique_image, _oblique_affine()), root / "oblique.nii.gz")
    return root


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    argv = ["train", "--datalist", str(dataset / "datalist.json"), "--output", str(run), "--epochs", "2"]
    argv += ["--batch-size", "4", "--size", "32", "32", "--spacing", "3", "3", "--network-kwargs", NET]
    argv += ["--head-channels", "8", "--num-workers", "0", "--device", "cpu"]
    assert main(argv) == 0
    return run / "model.pt"


def test_train_writes_a_calibrated_checkpoint(trained):
    from monai_ood.engines.checkpoint import load_model

    loaded = load_model(trained, device="cpu")
    assert loaded.calibrator is not None and loaded.calibrator.shape > 0
    assert loaded.preprocessing.size == (32, 32)


def test_score_writes_maps_on_the_input_geometry(dataset, trained, tmp_path):
    source = dataset / "oblique.nii.gz"
    before = source.read_bytes()
    out = tmp_path / "scores"
    assert main(["score", str(source), "--checkpoint", str(trained), "--output", str(out), "--quiet"]) == 0
    assert source.read_bytes() == before  # the input is untouched
    reference = nib.load(source)
    reference_itk = sitk.ReadImage(str(source))
    for name, kind in (
        ("oblique_seg", "label"),
        ("oblique_score", "map"),
        ("oblique_score_calibrated", "map"),
    ):
        written = nib.load(out / f"{name}.nii.gz")
        np.testing.assert_allclose(written.affine, reference.affine, atol=1e-6)
        assert written.shape == reference.shape
        assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 1
        np.testing.assert_allclose(written.get_qform(), written.get_sform(), atol=1e-5)
        if kind == "map":
            assert written.header.get_intent()[0] == "estimate"
            data = np.asarray(written.dataobj)
            assert float(written.header["cal_max"]) == pytest.approx(float(data.max()), rel=1e-5)
        itk = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        np.testing.assert_allclose(itk.GetSpacing(), reference_itk.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(itk.GetOrigin(), reference_itk.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(itk.GetDirection(), reference_itk.GetDirection(), atol=1e-5)
    calibrated = np.asarray(nib.load(out / "oblique_score_calibrated.nii.gz").dataobj)
    assert calibrated.min() >= 0 and calibrated.max() <= 1
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert rows[0]["level"] == "volume" and float(rows[0]["image_score"]) > 0
    assert sum(row["level"] == "slice" for row in rows) > 1
    table = json.loads((out / "scores.json").read_text())
    assert 0 <= table["volumes"][0]["calibrated_degree"] <= 1
    assert "ood_degree" in rows[0]
    from monai_ood.engines.checkpoint import load_model

    degree = load_model(trained, device="cpu").degree
    volume = table["volumes"][0]
    expected = None if degree is None else pytest.approx(float(degree(volume["image_score"])))
    assert volume["ood_degree"] == expected
    assert (out / "slicer" / "load_in_slicer.py").exists()


def test_score_nrrd_output(dataset, trained, tmp_path):
    out = tmp_path / "nrrd"
    assert (
        main(
            [
                "score",
                str(dataset / "oblique.nii.gz"),
                "--checkpoint",
                str(trained),
                "--output",
                str(out),
                "--format",
                "nrrd",
                "--quiet",
            ]
        )
        == 0
    )
    itk = sitk.ReadImage(str(out / "oblique_score.nrrd"))
    reference = sitk.ReadImage(str(dataset / "oblique.nii.gz"))
    np.testing.assert_allclose(itk.GetDirection(), reference.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(itk.GetOrigin(), reference.GetOrigin(), atol=1e-4)


def test_refusals_are_clear(dataset, trained, tmp_path, capsys):
    out = tmp_path / "scores"
    source = str(dataset / "oblique.nii.gz")
    assert main(["score", source, "--checkpoint", str(trained), "--output", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["score", source, "--checkpoint", str(trained), "--output", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (
        main(["score", source, "--checkpoint", str(trained), "--output", str(out), "--quiet", "--overwrite"])
        == 0
    )

    assert (
        main(["score", str(tmp_path / "missing.nii.gz"), "--checkpoint", str(trained), "--output", str(out)])
        == 2
    )
    assert "missing.nii.gz" in capsys.readouterr().err
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image")
    # an unreadable input fails its own row (exit 1), it does not stop a batch (see test_score_batch.py)
    assert main(["score", str(garbage), "--checkpoint", str(trained), "--output", str(tmp_path / "g")]) == 1
    assert "garbage.nii.gz" in capsys.readouterr().err
    assert (
        main(["score", source, "--checkpoint", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "x")])
        == 2
    )
    assert "nope.pt" in capsys.readouterr().err


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "monai_ood", "score", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--overwrite" in result.stdout and "DICOM" in result.stdout


def test_evaluate_reports_every_category(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [
        "evaluate",
        "--checkpoint",
        str(trained),
        "--output",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(argv + ["--device", "cpu"]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert {"C1", "C2", "C3"} <= set(report["categories"])
    for row in report["ood_sets"].values():
        assert 0 <= row["auroc"] <= 1 and 0 <= row["fpr95"] <= 1 and row["n"] > 0
    assert set(report["dice"]["per_class"]) == {"1", "2", "3"}  # a datalist model has no class names
    # the same report path as on your own folders: the markdown table printed and written
    markdown = (out / "evaluation.md").read_text(encoding="utf-8")
    assert "| OOD set | category |" in markdown and markdown in capsys.readouterr().out
    # the calibrated checkpoint's OOD degree, measured on the InD reference images, with its figure
    from monai_ood.engines.checkpoint import load_model

    degrees = load_model(trained, device="cpu").degree.transform(report["scores"]["ind"])
    rows = {r["threshold"]: r for r in report["degree"]["calibration"]}
    assert rows[0.9]["observed_above"] == pytest.approx((degrees > 0.9).mean())
    assert "OOD degree on the" in markdown
    assert any(p.endswith("checkpoint_degree_calibration.png") for p in report["plots"])
    assert all(Path(p).is_file() for p in report["plots"])
    assert main(argv) == 2  # an existing evaluation.json is refused without --overwrite
    # the embedded benchmark as folders of files, evaluated as your own data: the same InD scores
    from monai_ood.benchmark.export import write_benchmark_folders

    loaded = load_model(trained, device="cpu")
    written = write_benchmark_folders(
        tmp_path / "folders", loaded.preprocessing, cache_dir=tmp_path / "cache", categories=("C1",)
    )
    assert written["ood"] and {row["category"] for row in written["ood"]} == {"C1"}
    own = tmp_path / "own"
    assert (
        main(["evaluate", "--checkpoint", str(trained), "-o", str(own), *written["evaluate_arguments"]]) == 0
    )
    again = json.loads((own / "evaluation.json").read_text())
    # the same images up to the re-windowing of a stored slice (tests/benchmark/test_export.py), so the
    # same ranking of the images, not the same numbers
    from scipy.stats import spearmanr

    names = ["ind", *(row["name"] for row in written["ood"])]
    ours = [v for name in names for v in again["scores"][name]]
    harness = [v for name in names for v in report["scores"][name]]
    assert len(ours) == len(harness) and spearmanr(ours, harness).statistic > 0.9
    for row in written["ood"]:
        if row["n"] >= 5:
            auroc = again["ood_sets"][row["name"]]["auroc"]
            assert auroc == pytest.approx(report["ood_sets"][row["name"]]["auroc"], abs=0.1), row["name"]


def test_score_3d_model_uses_sliding_windows_and_keeps_geometry(dataset, tmp_path):
    """A 3D checkpoint (saved through the API; `train` makes 2D models) scored through the CLI."""
    import numpy as np

    from monai_ood.calibration import WeibullCalibrator
    from monai_ood.engines.checkpoint import build_network, make_model_config, save_model
    from monai_ood.preprocessing import VolumePreprocessing

    config = make_model_config("unet", 3, 1, 4, 8, network_kwargs={"channels": [4, 8, 16], "strides": [2, 2]})
    net = build_network(config)
    calibration = WeibullCalibrator().fit(np.random.default_rng(0).weibull(1.5, 1000) * 20)
    preprocessing = VolumePreprocessing(spacing=(3.0, 3.0, 3.0), roi_size=(16, 16, 16))
    save_model(tmp_path / "model3d.pt", net, config, preprocessing, calibration=calibration)
    source = dataset / "oblique.nii.gz"
    out = tmp_path / "scores3d"
    argv = [
        "score",
        str(source),
        "--checkpoint",
        str(tmp_path / "model3d.pt"),
        "--output",
        str(out),
        "--quiet",
    ]
    assert main(argv + ["--device", "cpu"]) == 0
    reference = nib.load(source)
    for name in ("oblique_seg", "oblique_score", "oblique_score_calibrated"):
        written = nib.load(out / f"{name}.nii.gz")
        assert written.shape == reference.shape
        np.testing.assert_allclose(written.affine, reference.affine, atol=1e-6)
    score = np.asarray(nib.load(out / "oblique_score.nii.gz").dataobj)
    assert np.isfinite(score).all() and score.max() > 0
    assert main(argv + ["--axis", "axial"]) == 2  # slicing applies to 2D models only


def test_short_flags_and_version(dataset, trained, tmp_path, capsys):
    from monai_ood import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"monai-ood {__version__}"
    out = tmp_path / "short"
    source = dataset / "oblique.nii.gz"
    assert main(["score", "-i", str(source), "--checkpoint", str(trained), "-o", str(out), "--quiet"]) == 0
    assert (out / "oblique_score.nii.gz").is_file()
    assert main(["score", "--checkpoint", str(trained), "-o", str(tmp_path / "none"), "--quiet"]) == 2
    assert "no input given" in capsys.readouterr().err


def test_log_lines_are_timestamped_off_a_terminal(tmp_path, monkeypatch):
    """Piped into a log (not a terminal), every line of a command starts with its local time; an error
    is still one line; MONAI_OOD_LOG_TIMESTAMPS=never turns it off."""
    import re
    import time

    monkeypatch.setenv("MONAI_OOD_LOG_TIMESTAMPS", "auto")
    argv = [sys.executable, "-m", "monai_ood", "score", str(tmp_path / "missing.nii.gz")]
    argv += ["--checkpoint", str(tmp_path / "none.pt"), "-o", str(tmp_path / "out")]
    before = time.strftime("%Y-%m-%d %H:%M")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    stamp = re.match(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}):\d{2} monai-ood score: error: ", lines[0])
    assert stamp, lines[0]
    assert before <= stamp.group(1) <= time.strftime("%Y-%m-%d %H:%M")
    monkeypatch.setenv("MONAI_OOD_LOG_TIMESTAMPS", "never")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stderr.startswith("monai-ood score: error: "), done.stderr


def test_timestamped_stream_prefixes_line_starts_only():
    import io
    import re

    from monai_ood.cli import _TimestampedLines

    buffer = io.StringIO()
    stream = _TimestampedLines(buffer)
    stream.write("first line\nsecond ")
    stream.write("half\n\nthird\n")
    lines = buffer.getvalue().split("\n")
    stamp = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} "
    assert re.fullmatch(stamp + "first line", lines[0])
    assert re.fullmatch(stamp + "second half", lines[1])  # one stamp per line, not per write
    assert lines[2] == "" and re.fullmatch(stamp + "third", lines[3])
