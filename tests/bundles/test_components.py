"""The bundle-side components of monai_ood.bundle, and the consistency of the bundles' configs and docs."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import BUNDLES, NAMES
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    ResizeWithPadOrCropd,
    Spacingd,
)

from monai_ood.bundle import (
    CalibrateOODScored,
    NormalizeSlicesd,
    PrototypeOODInferer,
    PrototypeOODTrainingStep,
    ScoreMapInferer,
    SplitOODOutputd,
    TrainingForward,
    WeibullCalibrationHandler,
    find_datalist,
    flag,
    inference_items,
    load_slices,
    require_calibration,
    require_checkpoint,
    slice_axcodes,
    unwrap_network,
)
from monai_ood.calibration import WeibullCalibrator
from monai_ood.losses import SegOODLoss
from monai_ood.networks import create_prototype_network
from monai_ood.preprocessing import SlicePreprocessing, normalize_intensity


def _tiny_net():
    return create_prototype_network(
        "unet",
        2,
        1,
        4,
        head_channels=8,
        network_kwargs={"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 0},
    )


# ---------------------------------------------------------------- slices: inference matches training


def test_inference_slicing_reproduces_the_training_slices():
    """MONAI's LoadImaged -> Orientationd(slice_axcodes) -> Spacingd -> crop/pad -> NormalizeSlicesd gives
    the slices the model was trained on (monai_ood.preprocessing, SimpleITK): same orientation and framing
    (up to the half-pixel difference of the two grids' centring)."""
    from monai_ood.benchmark.pool import load_mni152_t1
    from monai_ood.data import mni152_2009a_paths
    from monai_ood.preprocessing import volume_to_slices

    preprocessing = SlicePreprocessing()
    pipeline = Compose(
        [
            LoadImaged("image", image_only=True),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes=slice_axcodes("axial"), labels=None),
            Spacingd("image", pixdim=[*preprocessing.spacing, -1.0]),
            ResizeWithPadOrCropd("image", spatial_size=[*preprocessing.size, -1]),
            NormalizeSlicesd("image", percentiles=preprocessing.percentiles),
        ]
    )
    ours = pipeline({"image": str(mni152_2009a_paths()["t1"])})["image"]
    reference, _, _ = volume_to_slices(load_mni152_t1(), preprocessing)
    ours = np.moveaxis(ours[0].numpy(), -1, 0)  # (slices, rows, columns)
    assert ours.shape == reference[:, 0].shape
    for k in (60, 90, 120):
        assert np.corrcoef(ours[k].ravel(), reference[k, 0].ravel())[0, 1] > 0.97


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_inference_slicing_puts_a_marker_where_training_slicing_does(axis, tmp_path):
    """An off-centre marker in a volume stored with flipped, anisotropic axes lands on the same
    (slice, row, column) through MONAI's transforms as through the SimpleITK slicing of training."""
    import SimpleITK as sitk

    from monai_ood.preprocessing import slicing_grid, to_grid

    data = np.zeros((40, 36, 24), np.float32)
    data[5:10, 25:31, 14:18] = 100.0
    affine = np.diag([-2.0, 2.5, 3.0, 1.0])
    affine[:3, 3] = [40.0, -45.0, -36.0]
    path = tmp_path / "marker.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))

    preprocessing = SlicePreprocessing(axis=axis, spacing=(2.0, 2.0), size=(64, 64))
    image = sitk.ReadImage(str(path))
    reference = sitk.GetArrayFromImage(to_grid(image, slicing_grid(image, preprocessing)))  # (S, rows, cols)
    pipeline = Compose(
        [
            LoadImaged("image", image_only=True),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes=slice_axcodes(axis), labels=None),
            Spacingd("image", pixdim=[*preprocessing.spacing, -1.0]),
            ResizeWithPadOrCropd("image", spatial_size=[*preprocessing.size, -1]),
        ]
    )
    ours = np.moveaxis(pipeline({"image": str(path)})["image"][0].numpy(), -1, 0)
    assert ours.shape == reference.shape

    def centre(volume):
        return np.array([c.mean() for c in np.nonzero(volume > 50)])

    np.testing.assert_allclose(centre(ours), centre(reference), atol=1.0)


@pytest.mark.parametrize("name", NAMES)
def test_inference_preprocessing_round_trip_puts_outputs_where_the_input_was(name, tmp_path):
    """The preprocessing of inference.json, then Invertd as in its post-processing: an output computed on
    the slices (here the preprocessed image itself) lands back on the input's voxels."""
    from monai.bundle import ConfigParser
    from monai.transforms import Invertd

    data = np.zeros((40, 36, 24), np.float32)
    data[5:15, 20:30, 14:18] = 100.0  # 3% of its slices: above their 99th percentile, windowed to 1
    affine = np.diag([-2.0, 2.5, 3.0, 1.0])
    affine[:3, 3] = [40.0, -45.0, -36.0]
    path = tmp_path / "marker.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / name / "configs" / "inference.json"))
    preprocessing = parser.get_parsed_content("preprocessing")
    item = preprocessing({"image": str(path)})
    assert tuple(item["image"].shape[1:3]) == tuple(parser["image_size"])
    item["pred"] = item["image"].clone()
    inverted = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(item)["pred"]
    assert tuple(inverted.shape[1:]) == data.shape
    np.testing.assert_allclose(inverted.affine.numpy(), affine, atol=1e-5)
    marker = np.array([c.mean() for c in np.nonzero(data > 50)])
    found = np.array([c.mean() for c in np.nonzero(inverted[0].numpy() > 0.5)])
    np.testing.assert_allclose(found, marker, atol=1.0)


def test_slice_axcodes():
    assert (slice_axcodes("axial"), slice_axcodes("coronal"), slice_axcodes("sagittal")) == (
        "PLS",
        "ILP",
        "IPL",
    )
    with pytest.raises(ValueError):
        slice_axcodes("oblique")


def test_normalize_slicesd_windows_each_slice_and_keeps_metadata():
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(1, 8, 6, 3)).astype(np.float32) * np.array([1.0, 10.0, 100.0], dtype=np.float32)
    volume[..., 2] = 5.0  # a constant slice becomes zeros
    image = MetaTensor(torch.from_numpy(volume), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])))
    out = NormalizeSlicesd("image", percentiles=(1, 99))({"image": image})["image"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, image.affine)
    expected = np.moveaxis(normalize_intensity(np.moveaxis(volume[0], -1, 0), (1, 99)), 0, -1)
    np.testing.assert_allclose(out[0].numpy(), expected)
    assert float(out[0, ..., 2].abs().max()) == 0.0


def test_split_and_calibrate_keep_metadata(tmp_path):
    pred = MetaTensor(torch.rand(5, 4, 4), affine=torch.diag(torch.tensor([2.0, 2.0, 1.0])))
    data = SplitOODOutputd("pred", "ood_score")({"pred": pred})
    assert data["pred"].shape == (4, 4, 4) and data["ood_score"].shape == (1, 4, 4)
    assert torch.equal(data["ood_score"][0], pred[4]) and torch.equal(data["ood_score"].affine, pred.affine)
    with pytest.raises(ValueError, match="last channel"):
        SplitOODOutputd("pred")({"pred": torch.rand(1, 4, 4)})

    path = tmp_path / "calibration.json"
    with pytest.raises(FileNotFoundError, match="calibrate.json"):
        CalibrateOODScored("ood_score", calibration_file=path)
    calibrator = WeibullCalibrator().fit(np.random.default_rng(0).weibull(2.0, 1000) * 3)
    calibrator.save(path)
    out = CalibrateOODScored("ood_score", calibration_file=path)(data)
    assert isinstance(out["ood_score_calibrated"], MetaTensor)
    torch.testing.assert_close(out["ood_score_calibrated"], calibrator.transform(data["ood_score"]))


# ---------------------------------------------------------------- inferers and the training step


def test_inferers_return_logits_with_the_score_map():
    net = _tiny_net().eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        logits, ood = net.forward_with_ood(x)
        combined = PrototypeOODInferer()(x, net)
        assert combined.shape == (2, 5, 32, 32)
        torch.testing.assert_close(combined[:, :4], logits)
        torch.testing.assert_close(combined[:, 4:], ood.score_map_upsampled)
        torch.testing.assert_close(ScoreMapInferer()(x, TrainingForward(net)), ood.score_map)
        assert ScoreMapInferer(upsample=True)(x, net).shape == (2, 1, 32, 32)
    with pytest.raises(TypeError, match="PrototypeOODNet"):
        unwrap_network(torch.nn.Conv2d(1, 1, 1))


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


def test_weibull_calibration_handler_fits_and_saves(tmp_path):
    from monai.engines import SupervisedEvaluator

    net = _tiny_net().eval()
    data = [{"image": torch.rand(2, 1, 32, 32), "label": torch.zeros(2, 1, 32, 32)} for _ in range(3)]
    path = tmp_path / "models" / "calibration.json"
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        network=net,
        inferer=ScoreMapInferer(),
        val_handlers=[WeibullCalibrationHandler(path)],
        decollate=False,
    )
    evaluator.run()
    fitted = WeibullCalibrator.load(path)
    with torch.no_grad():
        maps = torch.cat([net.ood(d["image"]).score_map.flatten() for d in data])
    expected = WeibullCalibrator().fit(maps)
    assert fitted.num_samples == maps.numel() == 3 * 2 * 8 * 8
    assert fitted.shape == pytest.approx(expected.shape) and fitted.scale == pytest.approx(expected.scale)
    assert evaluator.state.calibrator.scale == pytest.approx(fitted.scale)


def test_require_messages(tmp_path):
    with pytest.raises(SystemExit, match="no trained model[\\s\\S]*configs/train.json"):
        require_checkpoint(tmp_path / "models" / "model.pt")
    with pytest.raises(SystemExit, match="no Weibull calibration[\\s\\S]*save_calibrated false"):
        require_calibration(tmp_path / "models" / "calibration.json")
    (tmp_path / "model.pt").write_bytes(b"x")
    assert require_checkpoint(tmp_path / "model.pt") == str(tmp_path / "model.pt")


def test_flag():
    assert [flag(v) for v in (True, False, 1, 0, "true", "False", " yes ", "off")] == [
        True,
        False,
        True,
        False,
        True,
        False,
        True,
        False,
    ]
    for bad in ("maybe", 2, None):
        with pytest.raises(ValueError):
            flag(bad)


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


# ---------------------------------------------------------------- the bundles' files


def _config(name, file):
    return json.loads((BUNDLES / name / "configs" / file).read_text())


@pytest.mark.parametrize("name", NAMES)
def test_bundle_layout_and_config_consistency(name):
    folder = BUNDLES / name
    for path in ("LICENSE", "docs/README.md", "models", "configs/metadata.json", "configs/logging.conf"):
        assert (folder / path).exists(), path
    for config in ("train", "train_multigpu", "calibrate", "evaluate", "inference"):
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
        "backbone",
        "network_def",
    ):
        assert train[key] == inference[key], key
    outputs = metadata["network_data_format"]["outputs"]["pred"]
    assert outputs["num_channels"] == train["num_classes"] == len(outputs["channel_def"])
    image = metadata["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == train["image_size"]
    # _target_ of monai_ood components use dotted paths (short names resolve only for imported modules)
    text = "".join(
        (folder / "configs" / f).read_text() for f in ("train.json", "inference.json", "calibrate.json")
    )
    for target in re.findall(r'"_target_": "([^"]+)"', text):
        assert "." in target or not target.lower().startswith(("prototype", "weibull", "score", "split")), (
            target
        )


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
