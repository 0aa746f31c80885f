"""``monai-ood fit``: the default detector fitted post hoc on plain MONAI weights or a monai-ood model,
then ``score`` with it; ``train --detector``. Tiny NIfTI volumes through ``--datalist``."""

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_ood.cli import main
from monai_ood.engines.checkpoint import load_model
from monai_ood.inference import score_image
from monai_ood.io import read_image
from monai_ood.networks.presets import PRESETS, encoder_stages
from monai_ood.preprocessing import volume_to_slices

# name: (registry builder kwargs, --network-kwargs, slicing of the datalist, stages as the network names them)
NETWORKS = {
    "segresnet": (
        {"init_filters": 8},
        '{"init_filters": 8}',
        ["--size", "32", "32", "--spacing", "1.5", "1.5"],
        [f"down_layers.{i}" for i in range(5)],  # blocks_down (1, 2, 2, 4, 4): five stages
    ),
    "swinunetr": (
        {"feature_size": 12, "depths": (1, 1, 1, 1)},
        '{"feature_size": 12, "depths": [1, 1, 1, 1]}',
        ["--size", "64", "64", "--spacing", "0.75", "0.75"],  # sides: multiples of 32
        ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10"],
    ),
}
UNET = '{"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}'


def _phantom(rng, shape=(24, 24, 4)):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 1.6) ** 2
    label = np.zeros(shape, np.uint8)
    label[r < 1] = 1
    label[r < 0.5] = 2
    label[((x - 0.3) ** 2 + y**2) < 0.05] = 3
    image = np.choose(label, [0.0, 300.0, 600.0, 150.0]) + rng.normal(0, 10, shape)
    return image.astype(np.float32), label


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One training and one validation volume of four axial slices, and a test volume to score."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    entries = {"training": [], "validation": []}
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    for split in ("training", "validation"):
        image, label = _phantom(rng)
        nib.save(nib.Nifti1Image(image, affine), root / f"{split}_img.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / f"{split}_lbl.nii.gz")
        entries[split].append({"image": f"{split}_img.nii.gz", "label": f"{split}_lbl.nii.gz"})
    (root / "datalist.json").write_text(json.dumps(entries))
    image, _ = _phantom(rng, (20, 26, 5))
    nib.save(nib.Nifti1Image(image, np.diag([2.2, 1.8, 3.0, 1.0])), root / "scan.nii.gz")
    return root


def _plain_weights(name, folder):
    build_kwargs = NETWORKS[name][0]
    torch.manual_seed(0)
    net = PRESETS[name].build(2, 1, 4, **build_kwargs)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    path = folder / f"{name}_weights.pt"
    torch.save(state if name == "segresnet" else {"state_dict": state}, path)  # both layouts are read
    return path, state


def _fit_argv(dataset, checkpoint, *extra):
    datalist = str(dataset / "datalist.json")
    return ["fit", "--checkpoint", str(checkpoint), "--datalist", datalist, "--device", "cpu", *extra]


def _plain_argv(dataset, name, weights, output, *extra):
    _, network_kwargs, slicing, _ = NETWORKS[name]
    argv = _fit_argv(dataset, weights, "--network", name, "--network-kwargs", network_kwargs)
    return argv + ["--num-classes", "4", "--output", str(output), *slicing, *extra]


def _one_error_line(capsys, command="fit"):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"monai-ood {command}: error: ")
    return err


@pytest.fixture(scope="module")
def fit_plain(dataset, tmp_path_factory):
    """``monai-ood fit`` on plain weights, once per network: (weights path, weights, their bytes before,
    the model.pt written)."""
    done = {}

    def run(name):
        if name not in done:
            folder = tmp_path_factory.mktemp(f"fit_{name}")
            weights, state = _plain_weights(name, folder)
            before = weights.read_bytes()
            output = folder / "out" / "model.pt"
            assert main(_plain_argv(dataset, name, weights, output)) == 0
            done[name] = (weights, state, before, output)
        return done[name]

    return run


@pytest.fixture(params=sorted(NETWORKS))
def fitted_plain(request, fit_plain):
    return (request.param, *fit_plain(request.param))


def test_fit_plain_weights_stores_a_detector_on_the_encoder_stages(fitted_plain):
    name, weights, state, before, output = fitted_plain
    loaded = load_model(output, device="cpu")
    expected_stages = NETWORKS[name][3]
    reference = PRESETS[name].build(2, 1, 4, **NETWORKS[name][0])
    assert encoder_stages(reference) == expected_stages
    assert loaded.detector is not None
    assert loaded.detector.layers == expected_stages
    assert type(loaded.net.backbone) is type(reference)
    stored = loaded.net.backbone.state_dict()
    assert set(stored) == set(state)
    assert all(torch.equal(stored[k], state[k]) for k in state)
    assert loaded.calibrator is not None and loaded.calibrator.num_samples > 0
    assert loaded.model_config["preset"] == name and loaded.model_config["out_channels"] == 4
    assert weights.read_bytes() == before  # the input weights file is untouched


def test_score_with_a_fitted_model(fitted_plain, dataset, tmp_path):
    name, _, _, _, model = fitted_plain
    source = dataset / "scan.nii.gz"
    out = tmp_path / "scores"
    assert main(["score", str(source), "--checkpoint", str(model), "--output", str(out), "--quiet"]) == 0
    for suffix in ("seg", "score", "score_calibrated"):
        written = nib.load(out / f"scan_{suffix}.nii.gz")
        assert written.shape == nib.load(source).shape
        assert np.isfinite(np.asarray(written.dataobj)).all()
    rows = list(csv.DictReader((out / "scores.csv").open()))
    volume = [row for row in rows if row["level"] == "volume"]
    assert len(volume) == 1 and volume[0]["status"] == "ok"
    image_score = float(volume[0]["image_score"])
    assert np.isfinite(image_score)
    # the table's score is the stored detector's: the mean over the slices with signal
    loaded = load_model(model, device="cpu")
    slices, _, _ = volume_to_slices(read_image(source), loaded.preprocessing)
    has_signal = slices.reshape(len(slices), -1).max(1) > 0
    expected = loaded.detector(torch.from_numpy(slices)).image_score.numpy()[has_signal].mean()
    assert image_score == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    head = score_image(loaded.net, read_image(source), loaded.preprocessing)  # without the detector
    assert head.image_score != pytest.approx(image_score, rel=1e-3)


def test_fit_no_calibrate(dataset, tmp_path):
    weights, _ = _plain_weights("segresnet", tmp_path)
    output = tmp_path / "model.pt"
    assert main(_plain_argv(dataset, "segresnet", weights, output, "--no-calibrate")) == 0
    loaded = load_model(output, device="cpu")
    assert loaded.detector is not None and loaded.calibrator is None


@pytest.fixture()
def monai_ood_model(fit_plain, tmp_path):
    """A copy of the fitted, calibrated SegResNet model.pt (refits change it)."""
    path = tmp_path / "source" / "model.pt"
    path.parent.mkdir()
    shutil.copyfile(fit_plain("segresnet")[3], path)
    return path


def _weights(path):
    return load_model(path, device="cpu").net.state_dict()


def _same_weights(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_refit_in_place(monai_ood_model, dataset):
    before = _weights(monai_ood_model)
    assert load_model(monai_ood_model, device="cpu").detector.layers == NETWORKS["segresnet"][3]
    layers = ["down_layers.0", "down_layers.1"]
    assert main(_fit_argv(dataset, monai_ood_model, "--layers", *layers, "--no-calibrate")) == 0
    loaded = load_model(monai_ood_model, device="cpu")
    assert loaded.detector.layers == layers
    assert loaded.calibrator is None  # the old calibration was of the previous detector's map
    assert _same_weights(loaded.net.state_dict(), before)
    assert main(_fit_argv(dataset, monai_ood_model, "--fusion", "max")) == 0
    loaded = load_model(monai_ood_model, device="cpu")
    assert loaded.detector.fusion_ == "max" and loaded.detector.layers == NETWORKS["segresnet"][3]
    assert loaded.calibrator is not None


def test_refit_to_another_output(monai_ood_model, dataset, tmp_path, capsys):
    before = monai_ood_model.read_bytes()
    output = tmp_path / "model.pt"  # an existing folder (a new one: see the next test)
    argv = _fit_argv(dataset, monai_ood_model, "--layers", "down_layers.1", "--output", str(output))
    assert main(argv) == 0
    assert monai_ood_model.read_bytes() == before  # the source is unchanged
    loaded = load_model(output, device="cpu")
    assert loaded.detector.layers == ["down_layers.1"] and loaded.calibrator is not None
    assert _same_weights(loaded.net.state_dict(), _weights(monai_ood_model))
    assert load_model(monai_ood_model, device="cpu").detector.layers == NETWORKS["segresnet"][3]

    written = output.read_bytes()
    capsys.readouterr()
    assert main(argv) == 2  # an existing --output is refused
    assert "--overwrite" in _one_error_line(capsys)
    assert output.read_bytes() == written
    argv = _fit_argv(dataset, monai_ood_model, "--layers", "down_layers.0", "--output", str(output))
    assert main([*argv, "--overwrite", "--no-calibrate"]) == 0
    loaded = load_model(output, device="cpu")
    assert loaded.detector.layers == ["down_layers.0"] and loaded.calibrator is None
    assert monai_ood_model.read_bytes() == before


def test_refit_to_an_output_in_a_new_folder(monai_ood_model, dataset, tmp_path):
    before = monai_ood_model.read_bytes()
    output = tmp_path / "new" / "folder" / "model.pt"
    argv = _fit_argv(dataset, monai_ood_model, "--no-calibrate", "--output", str(output))
    assert main(argv) == 0
    assert load_model(output, device="cpu").detector is not None
    assert monai_ood_model.read_bytes() == before


def test_plain_weights_refusals(dataset, tmp_path, capsys):
    weights, _ = _plain_weights("segresnet", tmp_path)
    output = tmp_path / "model.pt"
    output.write_bytes(b"already here")
    capsys.readouterr()
    assert main(_plain_argv(dataset, "segresnet", weights, output)) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert output.read_bytes() == b"already here"

    assert main(_fit_argv(dataset, weights, "--output", str(tmp_path / "a.pt"))) == 2  # no --network
    assert "--network" in _one_error_line(capsys)
    assert not (tmp_path / "a.pt").exists()

    argv = _fit_argv(dataset, weights, "--network", "segresnet", "--network-kwargs", '{"init_filters": 8}')
    assert main(argv) == 2  # plain weights need an --output: the input is never overwritten
    assert "--output" in _one_error_line(capsys)


@pytest.mark.parametrize(
    "network,kwargs",
    [("unet", UNET), ("segresnet", '{"init_filters": 16}')],
    ids=["another-architecture", "other-widths"],
)
def test_weights_that_do_not_fit_the_architecture(dataset, tmp_path, capsys, network, kwargs):
    weights, _ = _plain_weights("segresnet", tmp_path)
    before = weights.read_bytes()
    output = tmp_path / "out" / "model.pt"
    argv = _fit_argv(dataset, weights, "--network", network, "--network-kwargs", kwargs)
    capsys.readouterr()
    assert main([*argv, "--num-classes", "4", "--output", str(output)]) == 2
    err = _one_error_line(capsys)
    assert "do not fit" in err and network in err and "segresnet_weights.pt" in err
    assert not output.exists()
    assert weights.read_bytes() == before


def test_not_a_checkpoint(dataset, tmp_path, capsys):
    junk = tmp_path / "notes.pt"
    junk.write_text("these are not weights")
    capsys.readouterr()
    assert main(_fit_argv(dataset, junk, "--network", "segresnet", "--output", str(tmp_path / "m.pt"))) == 2
    assert "notes.pt" in _one_error_line(capsys)
    assert main(_fit_argv(dataset, tmp_path / "missing.pt", "--output", str(tmp_path / "m.pt"))) == 2
    assert "missing.pt" in _one_error_line(capsys)
    no_tensors = tmp_path / "config.pt"
    torch.save({"epochs": 3, "name": "run"}, no_tensors)
    assert (
        main(_fit_argv(dataset, no_tensors, "--network", "segresnet", "--output", str(tmp_path / "m.pt")))
        == 2
    )
    assert "no network weights" in _one_error_line(capsys)
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("detector", ["head", "fused", None])
def test_train_detector_choice(dataset, tmp_path, detector):
    argv = ["train", "--datalist", str(dataset / "datalist.json"), "--output", str(tmp_path / "run")]
    argv += ["--epochs", "1", "--batch-size", "4", "--size", "32", "32", "--spacing", "1.5", "1.5"]
    argv += ["--network-kwargs", UNET, "--head-channels", "4", "--num-workers", "0", "--device", "cpu"]
    assert main(argv + ([] if detector is None else ["--detector", detector])) == 0
    loaded = load_model(tmp_path / "run" / "model.pt", device="cpu")
    if detector == "head":
        assert loaded.detector is None
    else:  # the default
        stages = ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule"]
        assert loaded.detector is not None and loaded.detector.layers == stages
    assert loaded.calibrator is not None


def test_network_flag_on_a_monai_ood_model_is_refused(monai_ood_model, dataset, capsys):
    before = monai_ood_model.read_bytes()
    argv = _fit_argv(dataset, monai_ood_model, "--network", "unet")
    assert main(argv) == 2
    assert "--network is only for plain weights" in _one_error_line(capsys)
    assert monai_ood_model.read_bytes() == before
