"""The bundle-side components of monai_ood.bundle, and the consistency of the bundles' configs and docs."""

from __future__ import annotations

import inspect
import json
import pydoc
import re
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from bundle_helpers import BUNDLES, NAMES
from monai.engines import SupervisedTrainer

import monai_ood.bundle
from monai_ood.bundle import (
    DetectorInferer,
    PrototypeOODTrainingStep,
    ScoreImageStep,
    TrainingForward,
    calibrate_detector,
    find_datalist,
    fit_detector,
    inference_items,
    load_slices,
    load_weights,
    require_calibration,
    require_checkpoint,
    require_detector,
    unwrap_network,
)
from monai_ood.calibration import Calibration, fingerprint
from monai_ood.detectors.fused import FusedDetector
from monai_ood.engines.checkpoint import load_detector
from monai_ood.inference import score_image
from monai_ood.io import read_image
from monai_ood.losses import SegOODLoss
from monai_ood.networks import create_prototype_network
from monai_ood.preprocessing import SlicePreprocessing

TINY_UNET = {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 0}


def _tiny_net(**network_kwargs):
    return create_prototype_network(
        "unet", 2, 1, 4, head_channels=8, network_kwargs={**TINY_UNET, **network_kwargs}
    )


def _items(count: int, seed: int) -> list[dict]:
    """Labelled 32 x 32 slices: blurred noise (the terms need spread) with every class present."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        image = rng.random((32, 32)).astype(np.float32)
        image = (image + np.roll(image, 1, 0) + np.roll(image, 1, 1)) / 3
        label = np.minimum((image * 4).astype(np.int64), 3)
        items.append({"image": image[None], "label": label[None]})
    return items


def _detector(net, seed: int = 0):
    """The default detector with settings that fit in a fraction of a second (no fusion choice, no warps)."""
    return FusedDetector(net, num_classes=4, fusion="sum", warped_copies=0, batch_size=4, seed=seed)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A tiny trained-looking network's models/: model.pt (a plain state dict, as CheckpointSaver writes
    it), detector.pt and calibration.json written by the post-hoc step's functions."""
    torch.manual_seed(0)
    net = _tiny_net().eval()
    folder = tmp_path_factory.mktemp("models")
    torch.save(net.state_dict(), folder / "model.pt")
    train, val = _items(8, 0), _items(4, 1)
    detector = fit_detector(_detector(net), train, val, folder / "detector.pt")
    calibration = calibrate_detector(net, detector, val, folder / "calibration.json", batch_size=3)
    return SimpleNamespace(
        net=net, detector=detector, calibration=calibration, folder=folder, train=train, val=val
    )


# ---------------------------------------------------------------- the post-hoc step


def test_fit_and_calibrate_write_the_cores_records(model_files):
    """detector.pt is the core's detector file, calibration.json the core's record of the detector's map,
    bound to these weights and this detector; its Weibull is scipy's fit of the maps, computed one slice
    at a time."""
    from scipy import stats

    f = model_files
    stored = torch.load(f.folder / "detector.pt", weights_only=True)
    reloaded = load_detector(f.folder / "detector.pt", f.net)
    images = torch.from_numpy(np.stack([item["image"] for item in f.val]))
    for ours, theirs in zip(
        reloaded.segment_and_score(images), f.detector.segment_and_score(images), strict=True
    ):
        if hasattr(ours, "image_score"):
            ours, theirs = (ours.image_score, ours.score_map), (theirs.image_score, theirs.score_map)
        torch.testing.assert_close(ours, theirs)

    record = Calibration.load(f.folder / "calibration.json")
    assert (record.map, record.front_end) == ("fused", "bundle")
    assert (
        record.fingerprint
        == fingerprint(f.net, f.detector.to_state())
        == fingerprint(f.net.state_dict(), stored)
    )
    assert record.metadata == {"validation_images": len(f.val)}
    with torch.no_grad():
        maps = np.concatenate(
            [
                f.detector.segment_and_score(torch.from_numpy(item["image"][None]))[2]
                .double()
                .numpy()
                .ravel()
                for item in f.val
            ]
        )
    shape, _, scale = stats.weibull_min.fit(maps, floc=0)
    assert record.weibull.num_samples == maps.size
    assert record.weibull.shape == pytest.approx(shape, rel=2e-3)
    assert record.weibull.scale == pytest.approx(scale, rel=2e-3)
    # a wrapped network (DDP, TrainingForward) is the same network: the same fingerprint
    wrapped = calibrate_detector(TrainingForward(f.net), f.detector, f.val, f.folder / "again.json")
    assert wrapped.fingerprint == record.fingerprint


def test_fit_detector_refuses_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as refused:
        fit_detector(_detector(_tiny_net()), _items(4, 0), _items(1, 1), tmp_path / "detector.pt")
    assert "at least 2 validation images" in _one_line(refused)
    assert not (tmp_path / "detector.pt").exists()


def test_load_weights(model_files, tmp_path):
    fresh = load_weights(TrainingForward(_tiny_net()), model_files.folder / "model.pt").network
    for key, value in model_files.net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # MONAI's CheckpointSaver with several objects stores {"model": state dict}
    torch.save({"model": model_files.net.state_dict()}, tmp_path / "model.pt")
    assert fingerprint(load_weights(_tiny_net(), tmp_path / "model.pt")) == fingerprint(model_files.net)
    with pytest.raises(SystemExit) as refused:
        load_weights(_tiny_net(channels=(4, 8, 32)), model_files.folder / "model.pt")
    assert re.search(r"do not fit this config's network .*--backbone#", _one_line(refused))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as refused:
        load_weights(_tiny_net(), tmp_path / "broken.pt")
    assert "not a readable state dict" in _one_line(refused)
    with pytest.raises(TypeError, match="PrototypeOODNet"):
        unwrap_network(torch.nn.Conv2d(1, 1, 1))


def test_missing_model_files_are_refused_in_one_line_naming_the_step(model_files, tmp_path):
    with pytest.raises(SystemExit) as refused:
        require_checkpoint(tmp_path / "model.pt")
    assert "configs/train.json" in _one_line(refused)
    with pytest.raises(SystemExit) as refused:
        load_weights(_tiny_net(), tmp_path / "model.pt")
    assert "no trained model" in _one_line(refused)
    assert require_checkpoint(model_files.folder / "model.pt") == str(model_files.folder / "model.pt")
    with pytest.raises(SystemExit) as refused:
        require_detector(tmp_path / "detector.pt", model_files.net)
    assert re.search(r"no default detector .*configs/calibrate\.json", _one_line(refused))
    with pytest.raises(SystemExit) as refused:
        require_calibration(tmp_path / "calibration.json", model_files.net, model_files.detector)
    assert re.search(r"no calibration .*configs/calibrate\.json", _one_line(refused))


def _retrained(f, path):
    net = _tiny_net().eval()
    net.load_state_dict(f.net.state_dict())
    with torch.no_grad():
        next(net.parameters()).add_(1e-3)
    return net, load_detector(f.folder / "detector.pt", net), path


def _refitted(f, path):
    return f.net, _detector(f.net, seed=1).fit(f.train, f.val[:3]), path


def _old_format(f, path):
    path.write_text(json.dumps(f.calibration.weibull.to_dict()))
    return f.net, f.detector, path


def _head_map(f, path):
    Calibration(f.calibration.weibull, "head", f.calibration.fingerprint, "bundle").save(path)
    return f.net, f.detector, path


def _broken(f, path):
    path.write_text("{")
    return f.net, f.detector, path


@pytest.mark.parametrize(
    "case, message",
    [
        (_retrained, "fitted for other weights or another detector"),
        (_refitted, "fitted for other weights or another detector"),
        (_old_format, "bare Weibull fit"),
        (_head_map, "calibrates the 'head' map, this model scores with the 'fused' map"),
        (_broken, "is not valid JSON"),
    ],
)
def test_a_stale_or_foreign_calibration_is_refused_in_one_line(case, message, model_files, tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text((model_files.folder / "calibration.json").read_text())
    net, detector, path = case(model_files, path)
    with pytest.raises(SystemExit) as refused:
        require_calibration(path, net, detector)
    line = _one_line(refused)
    assert message in line and line.endswith("configs/calibrate.json']\"") and "calibrate again" not in line


def test_require_returns_the_detector_and_calibration_of_these_weights(model_files):
    f = model_files
    detector = require_detector(f.folder / "detector.pt", TrainingForward(f.net))
    assert fingerprint(detector.to_state()) == fingerprint(f.detector.to_state())
    calibration = require_calibration(f.folder / "calibration.json", f.net, detector)
    assert calibration.to_dict() == f.calibration.to_dict()


# ---------------------------------------------------------------- inference


def test_score_image_step_writes_what_score_image_gives(model_files, oblique_volume, tmp_path):
    """Maps, table rows (volume and slices) of one scored input are those of the core's score_image; an
    input that cannot be read gets a failed row and no maps, the others are scored; finish() says so in
    one line; a second run replaces the rows of the inputs it scores and keeps the others."""
    f = model_files
    preprocessing = SlicePreprocessing(spacing=(4.5, 4.5), size=(48, 48))
    inferer = DetectorInferer(preprocessing, f.detector, f.calibration, batch_size=4)
    engine = SimpleNamespace(inferer=inferer, network=TrainingForward(f.net))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    step = ScoreImageStep(out)
    # the batch as MONAI's DataLoader collates two datalist items
    good, bad = step(engine, {"image": [str(oblique_volume), str(broken)]})

    reference = score_image(
        f.net, read_image(oblique_volume), preprocessing, f.calibration.weibull, 4, f.detector
    )
    assert good["status"] == "ok" and good["image_score"] == pytest.approx(reference.image_score, rel=1e-6)
    assert good["calibrated_degree"] == pytest.approx(reference.calibrated_degree, rel=1e-6)
    for key, postfix in (
        ("segmentation", "seg"),
        ("score_map", "score"),
        ("calibrated_map", "score_calibrated"),
    ):
        assert good[key] == str(out / f"case_a_{postfix}.nii.gz")
        written = sitk.GetArrayFromImage(read_image(good[key]))
        np.testing.assert_allclose(
            written, sitk.GetArrayFromImage(getattr(reference, key)), rtol=1e-6, atol=1e-6
        )
    assert bad["status"] == "failed" and bad["error"] and bad["segmentation"] is None
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "case_a_seg.nii.gz",
            "case_a_score.nii.gz",
            "case_a_score_calibrated.nii.gz",
            "scores.csv",
            "scores.json",
        ]
    )
    table = json.loads((out / "scores.json").read_text())
    assert [row["status"] for row in table["volumes"]] == ["ok", "failed"]
    assert [{k: v for k, v in row.items() if k != "input"} for row in table["slices"]] == reference.slices
    with pytest.raises(SystemExit) as refused:
        step.finish()
    assert re.search(r"1 of 2 inputs failed .*scores\.csv.*broken\.nii\.gz", _one_line(refused))

    again = ScoreImageStep(out)
    again(engine, {"image": str(oblique_volume)})
    assert again.finish() == again.rows
    table = json.loads((out / "scores.json").read_text())
    assert [row["input"] for row in table["volumes"]] == [str(oblique_volume), str(broken)]
    assert len(table["slices"]) == len(reference.slices)


def test_detector_inferer_checks_its_arguments(model_files):
    from monai_ood.preprocessing import VolumePreprocessing

    with pytest.raises(ValueError, match="SlicePreprocessing"):
        DetectorInferer(VolumePreprocessing(), model_files.detector)
    with pytest.raises(ValueError, match="batch_size"):
        DetectorInferer(SlicePreprocessing(), model_files.detector, batch_size=0)
    with pytest.raises(ValueError, match="nifti"):
        ScoreImageStep("out", output_format="png")


# ---------------------------------------------------------------- the training step


def _trainer(network, net, outliers_per_step=None):
    batch = {
        "image": torch.rand(2, 1, 32, 32),
        "label": torch.randint(0, 4, (2, 1, 32, 32)).float(),
        "outlier": torch.rand(2, 1, 32, 32),
    }
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch, batch],
        network=network,
        optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3),
        loss_function=SegOODLoss(net.num_dims),
        iteration_update=PrototypeOODTrainingStep(outliers_per_step),
        decollate=False,
    )
    return trainer


def test_training_step_updates_the_network_with_both_losses():
    net = _tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = _trainer(net, net)
    trainer.run()
    output = trainer.state.output
    assert {"loss", "seg_loss", "ood_loss", "pred"} <= set(output)
    assert output["pred"].shape == (2, 4, 32, 32) and float(output["ood_loss"]) > 0
    for prefix in ("backbone.", "head.", "prototypes."):
        assert any(not torch.equal(v, before[k]) for k, v in net.state_dict().items() if k.startswith(prefix))


def test_training_step_through_training_forward_and_its_errors():
    net = _tiny_net()
    _trainer(TrainingForward(net), net).run()  # what DDP wraps
    with pytest.raises(TypeError, match="TrainingForward"):
        _trainer(torch.nn.DataParallel(net), net).run()
    with pytest.raises(ValueError, match="outliers_per_step"):
        PrototypeOODTrainingStep(-1)
    trainer = _trainer(net, net)
    trainer.data_loader = [{"image": torch.rand(2, 1, 32, 32), "label": torch.zeros(2, 1, 32, 32)}]
    with pytest.raises(KeyError, match="OutlierSynthesisd"):
        trainer.run()


# ---------------------------------------------------------------- data


def _write_volume(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0]) if affine is None else affine), str(path))


@pytest.fixture
def user_dataset(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    training = []
    for i in range(3):
        image = rng.random((30, 30, 3)).astype(np.float32)
        label = (image > 0.5).astype(np.uint8)
        _write_volume(tmp_path / "imagesTr" / f"c{i}.nii.gz", image)
        _write_volume(tmp_path / "labelsTr" / f"c{i}.nii.gz", label)
        training.append({"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps({"training": training, "test": ["imagesTr/c0.nii.gz"]}))
    return tmp_path


def test_load_slices_from_a_datalist_without_validation(user_dataset):
    preprocessing = SlicePreprocessing(spacing=(4.0, 4.0), size=(32, 32))
    datalist = find_datalist(user_dataset)
    train = load_slices("training", datalist, preprocessing, num_classes=2)
    val = load_slices("validation", datalist, preprocessing, num_classes=2)
    assert len(train) == 2 * 3 and len(val) == 3  # 3 slices per volume; the last volume validates
    assert train[0]["image"].shape == (1, 32, 32) and train[0]["label"].dtype == np.int64
    assert set(train[0]) == {"image", "label"}
    with pytest.raises(ValueError, match="values must be in"):
        load_slices("training", datalist, preprocessing, num_classes=1)
    with pytest.raises(ValueError, match="need labels"):
        load_slices("test", datalist, preprocessing)
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        find_datalist(user_dataset / "imagesTr")
    assert find_datalist(None) is None


def test_load_slices_embedded_brain_data():
    train = load_slices("training")
    assert len(train) > 50 and train[0]["image"].shape == (1, 112, 96)
    assert int(max(item["label"].max() for item in train)) == 3


def test_inference_items(user_dataset, tmp_path_factory):
    assert inference_items(user_dataset) == [{"image": str(user_dataset / "imagesTr" / "c0.nii.gz")}]
    folder = tmp_path_factory.mktemp("niftis")
    _write_volume(folder / "b.nii", np.zeros((4, 4, 2), np.float32))
    _write_volume(folder / "a.nii.gz", np.zeros((4, 4, 2), np.float32))
    (folder / "notes.txt").write_text("not an image")
    assert [item["image"] for item in inference_items(folder)] == [
        str(folder / "a.nii.gz"),
        str(folder / "b.nii"),
    ]
    assert len(inference_items(datalist=user_dataset / "dataset.json", split="training")) == 3
    assert inference_items()[0]["image"].endswith("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    with pytest.raises(ValueError, match="no NIfTI"):
        inference_items(tmp_path_factory.mktemp("empty"))
    # two volumes whose outputs would overwrite each other's
    (folder / "c").mkdir()
    _write_volume(folder / "c" / "a.nii", np.zeros((4, 4, 2), np.float32))
    (folder / "list.json").write_text(json.dumps({"test": ["a.nii.gz", "c/a.nii"]}))
    with pytest.raises(ValueError, match="outputs of the same name"):
        inference_items(datalist=folder / "list.json")


# ---------------------------------------------------------------- the bundles' files


def _config(name, file):
    return json.loads((BUNDLES / name / "configs" / file).read_text())


@pytest.mark.parametrize("name", NAMES)
def test_bundle_layout_and_config_consistency(name):
    folder = BUNDLES / name
    for path in ("LICENSE", "docs/README.md", "models", "configs/metadata.json", "configs/logging.conf"):
        assert (folder / path).exists(), path
    configs = ("train", "train_multigpu", "calibrate", "evaluate", "inference")
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
    for file in ("calibrate.json", "evaluate.json", "train_multigpu.json", "logging.conf"):
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
        "configs/train_multigpu.json",
    } <= named
    for path in named:
        assert (BUNDLES / name / path).is_file(), path
    assert "../schema/meta_schema_20240725.json" in readme
