"""Every bad input gets one clear line (issue 14): a damaged checkpoint, NaN scores, a --num-classes the
labels do not use, an image too small for the model's grid, late checks made early.

Tiny untrained 2D models saved through the API and tiny NIfTI files: no test trains a network.
"""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import monai_ood.inference
from monai_ood.cli import main
from monai_ood.engines.checkpoint import build_network, load_model, make_model_config, save_model
from monai_ood.inference import score_image
from monai_ood.io import read_image
from monai_ood.preprocessing import SlicePreprocessing

NET = {"channels": [4, 8, 16], "strides": [2, 2]}
PREPROCESSING = SlicePreprocessing(spacing=(3.0, 3.0), size=(32, 32))


def _phantom(rng, shape=(24, 28, 6)):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 1.6) ** 2
    image = np.where(r < 1, 300.0, 0.0) + np.where(r < 0.5, 300.0, 0.0) + rng.normal(0, 10, shape)
    return image.astype(np.float32)


def _save(path, array, spacing=(3.0, 3.0, 3.0)):
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)
    return path


def _one_error_line(capsys, command):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"monai-ood {command}: error: ")
    return err


def _score(*argv):
    return main(["score", *map(str, argv), "--quiet", "--device", "cpu", "--no-slicer-files"])


def _volumes(output):
    return {
        Path(row["input"]).name: row for row in json.loads((output / "scores.json").read_text())["volumes"]
    }


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    config = make_model_config("unet", 2, 1, 4, 8, network_kwargs=NET)
    return config, build_network(config)


@pytest.fixture(scope="module")
def model(network, tmp_path_factory):
    config, net = network
    return save_model(tmp_path_factory.mktemp("model") / "model.pt", net, config, PREPROCESSING)


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("scan") / "scan.nii.gz", _phantom(np.random.default_rng(0)))


# ---------------------------------------------------------------- 1. a checkpoint with NaN/Inf values


def test_checkpoint_with_a_nan_weight_is_refused(network, scan, tmp_path, capsys):
    config, net = network
    damaged = build_network(config)
    damaged.load_state_dict(net.state_dict())
    key = next(k for k, v in damaged.state_dict().items() if v.is_floating_point() and v.ndim > 1)
    with torch.no_grad():
        damaged.state_dict()[key].view(-1)[3] = float("nan")
    path = save_model(tmp_path / "diverged.pt", damaged, config, PREPROCESSING)
    with pytest.raises(ValueError, match="damaged checkpoint") as raised:
        load_model(path, device="cpu")
    message = str(raised.value)
    assert "diverged.pt" in message and key in message and "diverged" in message
    # the command stops before any input is read, in one line
    output = tmp_path / "scores"
    assert _score(scan, "--checkpoint", path, "--output", output) == 2
    err = _one_error_line(capsys, "score")
    assert "diverged.pt" in err and key in err and "NaN or Inf" in err
    assert not (output / "scores.json").exists()


def test_checkpoint_whose_stored_detector_holds_inf_is_refused(model, tmp_path):
    from monai_ood.detectors.fused import DETECTOR_FORMAT, DETECTOR_VERSION

    data = torch.load(model, weights_only=True)
    data["detector"] = {
        "format": DETECTOR_FORMAT,
        "version": DETECTOR_VERSION,
        "terms": [{"kind": "stage_statistics", "config": {}, "state": {"mean": torch.tensor([0.0, 1.0])}}],
        "loc": torch.zeros(1, dtype=torch.float64),
        "scale": torch.tensor([float("inf")], dtype=torch.float64),
        "weibull": torch.ones(1, 2, dtype=torch.float64),
        "map_scale": torch.ones(1, dtype=torch.float64),
    }
    data["detector"]["terms"][0]["state"]["mean"][1] = float("nan")
    path = tmp_path / "bad_detector.pt"
    torch.save(data, path)
    with pytest.raises(ValueError, match="stored detector holds NaN or Inf") as raised:
        load_model(path, device="cpu")
    assert "bad_detector.pt" in str(raised.value)
    assert "detector.terms[0].state.mean" in str(raised.value) and "detector.scale" in str(raised.value)


# ---------------------------------------------------------------- 2. non-finite scores at scoring time


@pytest.mark.parametrize("broken", ["image score", "maps"])
def test_non_finite_outputs_fail_the_input_not_the_table(model, scan, tmp_path, monkeypatch, capsys, broken):
    """A network that gives NaN for one input (the three-slice one): that input fails with a clear error,
    the other is scored, and no row or map says nan."""
    real = monai_ood.inference._forward

    def forward(net, detector, batch):
        logits, low, upsampled, image_score = real(net, detector, batch)
        if batch.shape[0] == 3:
            if broken == "image score":
                image_score = torch.full_like(image_score, float("nan"))
            else:
                low, upsampled = low * float("nan"), upsampled * float("nan")
        return logits, low, upsampled, image_score

    monkeypatch.setattr(monai_ood.inference, "_forward", forward)
    odd = _save(tmp_path / "odd.nii.gz", _phantom(np.random.default_rng(1), (24, 28, 3)))
    output = tmp_path / "scores"
    assert _score(scan, odd, "--checkpoint", model, "--output", output) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "odd.nii.gz" in err and "NaN or Inf" in err
    rows = _volumes(output)
    assert rows["scan.nii.gz"]["status"] == "ok" and np.isfinite(rows["scan.nii.gz"]["image_score"])
    assert rows["odd.nii.gz"]["status"] == "failed" and rows["odd.nii.gz"]["image_score"] is None
    assert "model's outputs for this image are NaN or Inf" in rows["odd.nii.gz"]["error"]
    cells = [row["image_score"] for row in csv.DictReader((output / "scores.csv").open())]
    assert all(cell == "" or np.isfinite(float(cell)) for cell in cells)
    constants = []  # the NaN and Infinity tokens Python's json writes for non-finite floats
    json.loads((output / "scores.json").read_text(), parse_constant=constants.append)
    assert constants == []
    assert not list(output.glob("odd_*"))


# ---------------------------------------------------------------- 3. --num-classes against the labels


def _datalist(folder, labels):
    """One training and one validation volume whose labels hold the values ``labels`` (a disc each)."""
    folder.mkdir()
    shape = (16, 16, 3)
    x, y, _ = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    label = np.zeros(shape, np.uint8)
    for value, radius in zip(labels[1:], (0.8, 0.4, 0.2), strict=False):
        label[x**2 + y**2 < radius] = value
    entries = {}
    for split in ("training", "validation"):
        image = (label * 200.0 + np.random.default_rng(0).normal(0, 10, shape)).astype(np.float32)
        _save(folder / f"{split}_img.nii.gz", image, (2.0, 2.0, 3.0))
        _save(folder / f"{split}_lbl.nii.gz", label, (2.0, 2.0, 3.0))
        entries[split] = [{"image": f"{split}_img.nii.gz", "label": f"{split}_lbl.nii.gz"}]
    (folder / "datalist.json").write_text(json.dumps(entries))
    return folder / "datalist.json"


def _train_argv(datalist, output, *extra):
    argv = ["train", "--output", str(output), "--epochs", "1", "--size", "16", "16", "--spacing", "2", "2"]
    argv += ["--network-kwargs", '{"channels": [4, 8], "strides": [2]}', "--head-channels", "4"]
    argv += ["--num-workers", "0", "--device", "cpu", "--detector", "head", "--no-calibrate"]
    return argv + ([] if datalist is None else ["--datalist", str(datalist)]) + list(extra)


def test_train_refuses_a_class_absent_from_every_label(tmp_path, capsys):
    datalist = _datalist(tmp_path / "binary", labels=[0, 1])
    output = tmp_path / "run"
    assert main(_train_argv(datalist, output, "--num-classes", "3")) == 2
    err = _one_error_line(capsys, "train")
    assert (
        "--num-classes 3" in err and "[2]" in err and "--num-classes 2" in err and "cannot be learned" in err
    )
    assert not output.exists()  # refused before anything was built or written


def test_train_refuses_label_values_beyond_num_classes(tmp_path, capsys):
    datalist = _datalist(tmp_path / "three", labels=[0, 1, 2])
    assert main(_train_argv(datalist, tmp_path / "run", "--num-classes", "2")) == 2
    err = _one_error_line(capsys, "train")
    assert "training_lbl.nii.gz" in err and "[2]" in err and "[0, 2)" in err


def test_train_builds_exactly_num_classes(tmp_path, monkeypatch):
    """--num-classes that the labels use is the model's class count (no longer guessed from the labels)."""
    import monai_ood.engines.training

    seen = {}

    def train(train_items, val_items, config, *args, **kwargs):
        seen["num_classes"] = config.num_classes
        raise KeyboardInterrupt  # stop here: only the configuration matters

    monkeypatch.setattr(monai_ood.engines.training, "train", train)
    datalist = _datalist(tmp_path / "binary", labels=[0, 1])
    assert main(_train_argv(datalist, tmp_path / "run", "--num-classes", "2")) == 130
    assert seen == {"num_classes": 2}


# ---------------------------------------------------------------- 4. no contrast: constant, or too small


def test_no_contrast_messages_say_why(model, tmp_path, monkeypatch):
    loaded = load_model(model, device="cpu")

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran on an image that cannot be scored")

    rng = np.random.default_rng(0)
    tiny = read_image(
        _save(tmp_path / "tiny.nii.gz", rng.normal(100, 30, (3, 3, 3)).astype(np.float32), (1, 1, 1))
    )
    constant = read_image(_save(tmp_path / "constant.nii.gz", np.full((20, 20, 4), 7.0, np.float32)))
    with monkeypatch.context() as patch:
        patch.setattr(monai_ood.inference, "score_slices", no_network)
        with pytest.raises(ValueError) as raised:
            score_image(loaded.net, tiny, loaded.preprocessing)
        message = str(raised.value)
        assert "constant" not in message and "has contrast" in message
        assert (
            "3x3x3 voxels of 1x1x1 mm" in message
            and "3x3 mm" in message
            and "at most 1 of the 1024" in message
        )
        with pytest.raises(ValueError, match=r"no contrast anywhere \(constant intensities"):
            score_image(loaded.net, constant, loaded.preprocessing)
    # small, but large enough to keep its contrast on the model's grid: scored
    small = read_image(_save(tmp_path / "small.nii.gz", _phantom(rng, (12, 12, 3)), (1, 1, 1)))
    assert np.isfinite(score_image(loaded.net, small, loaded.preprocessing).image_score)


def test_no_contrast_through_the_command(model, tmp_path, capsys):
    tiny = _save(
        tmp_path / "tiny.nii.gz",
        np.random.default_rng(0).normal(0, 1, (3, 3, 3)).astype(np.float32),
        (1, 1, 1),
    )
    output = tmp_path / "scores"
    assert _score(tiny, "--checkpoint", model, "--output", output) == 1
    assert "Traceback" not in capsys.readouterr().err
    error = _volumes(output)["tiny.nii.gz"]["error"]
    assert "none is left after resampling onto the model's grid" in error and "constant" not in error


# ---------------------------------------------------------------- 5. late checks made early


def test_train_refuses_num_classes_for_the_embedded_data_before_loading_it(tmp_path, monkeypatch, capsys):
    import monai_ood.benchmark.pool

    def no_data(*args, **kwargs):
        raise AssertionError("the embedded data was built before the class count was checked")

    monkeypatch.setattr(monai_ood.benchmark.pool, "load_brain_dataset", no_data)
    assert main(_train_argv(None, tmp_path / "run", "--num-classes", "3")) == 2
    err = _one_error_line(capsys, "train")
    assert "--num-classes 3" in err and "4 classes" in err and "white matter" in err and "--datalist" in err


def test_evaluate_refuses_before_any_work(model, tmp_path, monkeypatch, capsys):
    import monai_ood.evaluation

    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation ran before the output was checked")

    monkeypatch.setattr(monai_ood.evaluation, "evaluate_checkpoint", no_work)

    def evaluate(output, *extra):
        return main(
            ["evaluate", "--checkpoint", str(model), "--output", str(output), "--device", "cpu", *extra]
        )

    done = tmp_path / "done"
    done.mkdir()
    (done / "evaluation.json").write_text("{}")
    assert evaluate(done) == 2
    assert "evaluation.json exists" in _one_error_line(capsys, "evaluate")
    a_file = tmp_path / "report.txt"
    a_file.write_text("not a folder")
    assert evaluate(a_file) == 2
    assert "report.txt" in _one_error_line(capsys, "evaluate")
    assert evaluate(a_file / "eval") == 2  # a folder that cannot be made
    assert "report.txt" in _one_error_line(capsys, "evaluate")
    plots = tmp_path / "plots_file"
    plots.mkdir()
    (plots / "plots").write_text("not a folder")
    assert evaluate(plots, "--overwrite") == 2
    assert "plots" in _one_error_line(capsys, "evaluate")


def test_multichannel_inputs_are_refused_before_the_network(
    model, network, scan, tmp_path, monkeypatch, capsys
):
    rng = np.random.default_rng(2)
    vector = sitk.GetImageFromArray(np.stack([_phantom(rng).T] * 2, axis=-1), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "two.nrrd"))
    stacked = np.stack([_phantom(rng), _phantom(rng)], axis=-1)[:, :, :, None, :]  # NIfTI's 5th axis
    nifti = nib.Nifti1Image(stacked, np.diag([3.0, 3.0, 3.0, 1.0]))
    nifti.header.set_intent("vector")
    nib.save(nifti, tmp_path / "pair.nii.gz")
    real, batches = monai_ood.inference._forward, []

    def forward(net, detector, batch):
        batches.append(batch.shape[0])
        return real(net, detector, batch)

    monkeypatch.setattr(monai_ood.inference, "_forward", forward)
    output = tmp_path / "scores"
    assert (
        _score(
            tmp_path / "two.nrrd", tmp_path / "pair.nii.gz", scan, "--checkpoint", model, "--output", output
        )
        == 1
    )
    assert "Traceback" not in capsys.readouterr().err
    rows = _volumes(output)
    for name in ("two.nrrd", "pair.nii.gz"):
        assert rows[name]["status"] == "failed"
        assert name in rows[name]["error"] and "2 channels" in rows[name]["error"]
        assert "the model takes 1" in rows[name]["error"]
    assert rows["scan.nii.gz"]["status"] == "ok"
    assert batches == [6]  # the network ran on the good input only
    # the library call refuses it too (e.g. a DICOM series, whose header is not read up front)
    with pytest.raises(ValueError, match="2 channels"):
        score_image(network[1], sitk.ReadImage(str(tmp_path / "two.nrrd")), PREPROCESSING)


def test_score_output_that_is_a_file_is_refused_before_any_work(model, scan, tmp_path, capsys):
    output = tmp_path / "scores"
    output.write_text("not a folder")
    assert _score(scan, "--checkpoint", model, "--output", output) == 2
    line = _one_error_line(capsys, "score")
    assert str(output) in line and "file" in line
    assert output.read_text() == "not a folder"  # untouched


def test_empty_image_is_refused(tmp_path):
    import nibabel as nib

    from monai_ood.io import read_image

    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((0, 4, 4), np.float32), np.eye(4)), str(path))
    with pytest.raises(ValueError, match="cannot read .*empty.nii.gz.* as an image"):
        read_image(path)
