"""The nnU-Net integration's parts, in-process and fast: wrapper, trainer pieces, the detector's patches
and tiling, the calibration record, geometry, CLI helpers."""

from __future__ import annotations

import importlib.util
import json
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

if importlib.util.find_spec("nnunetv2") is None:
    if os.environ.get("CI"):
        raise ImportError("nnunetv2 is not installed: `make setup` installs it (the nnunet extra)")
    pytest.skip("nnunetv2 is not installed (pip install 'monai-ood[nnunet]')", allow_module_level=True)

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402

from monai_ood.calibration import Calibration, WeibullCalibrator, fingerprint  # noqa: E402
from monai_ood.integrations.nnunet import (  # noqa: E402
    OutlierChannels,
    calibration_path,
    detector_path,
    export_line,
    find_trainer_class,
    fit_calibration,
    fit_detector,
    load_calibration,
    map_to_input_image,
    map_to_original_array,
    map_values,
    nnUNetPrototypeOODNet,
    nnUNetTrainerPrototypeOOD,
    sample_patches,
    score_case,
    trainer_folder,
)
from monai_ood.integrations.nnunet.detector import deep_supervision_off  # noqa: E402
from monai_ood.integrations.nnunet.trainer import masked_inlier_term  # noqa: E402
from monai_ood.io import same_geometry  # noqa: E402
from monai_ood.losses import OutlierExposureLoss  # noqa: E402
from monai_ood.transforms import OutlierSynthesis  # noqa: E402


def _plain_unet(dims: int = 3, deep_supervision: bool = True) -> PlainConvUNet:
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d
    return PlainConvUNet(
        1, 3, (4, 8, 16), conv, 3, (1, 2, 2), 1, 3, 1,
        conv_bias=True, norm_op=norm, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
        deep_supervision=deep_supervision,
    )  # fmt: skip


def _wrapped(dims: int = 3, head_channels: int = 8) -> nnUNetPrototypeOODNet:
    torch.manual_seed(0)
    return nnUNetPrototypeOODNet(_plain_unet(dims), num_classes=3, head_channels=head_channels).eval()


# ---------------------------------------------------------------------------------------------- network


def test_wrapper_keeps_nnunet_forward_and_deep_supervision():
    net = _wrapped()
    assert net.layer == "encoder.stages.2" and net.feature_channels == 16 and net.num_classes == 3
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        outputs = net(x)
        assert isinstance(outputs, list) and [o.shape[-1] for o in outputs] == [16, 8]
        for ours, plain in zip(outputs, net.backbone(x), strict=True):
            assert torch.equal(ours, plain)
        net.decoder.deep_supervision = False  # what nnUNetTrainer.set_deep_supervision_enabled does
        assert net.backbone.decoder.deep_supervision is False
        assert net(x).shape == (2, 3, 16, 16, 16)
    assert net.encoder is net.backbone.encoder
    keys = net.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"backbone", "head", "prototypes"}


def test_wrapper_training_pass_and_recorded_features():
    net = _wrapped()
    x, outliers = torch.randn(2, 1, 16, 16, 16), torch.randn(3, 1, 16, 16, 16)
    logits, distances, outlier_distances = net(x, outliers, with_ood=True)
    assert [t.shape for t in logits] == [(2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]
    assert distances.shape == (2, 3, 4, 4, 4) and outlier_distances.shape == (3, 3, 4, 4, 4)
    assert net(x, with_ood=True)[2] is None
    with torch.no_grad(), net.recording_features() as recorded:
        net(x)
    assert len(recorded) == 1 and torch.allclose(recorded[0], net.encode(x))
    with torch.no_grad():
        net(x)
    assert len(recorded) == 1  # the hook is gone after the block


def test_wrapper_on_a_2d_residual_encoder_unet():
    backbone = ResidualEncoderUNet(
        1, 3, (4, 8, 16), nn.Conv2d, 3, (1, 2, 2), 1, 2, 1,
        conv_bias=True, norm_op=nn.InstanceNorm2d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
        deep_supervision=True,
    )  # fmt: skip
    net = nnUNetPrototypeOODNet(backbone, num_classes=2, head_channels=8).eval()
    assert net.layer == "encoder.stages.2" and net.spatial_dims == 2 and net.feature_channels == 16
    ood = net.ood(torch.randn(1, 1, 32, 32))
    assert ood.score_map.shape == (1, 1, 8, 8) and ood.score_map_upsampled.shape == (1, 1, 32, 32)


def _plans(n_stages: int = 3) -> dict:
    arch = {
        "n_stages": n_stages,
        "features_per_stage": [4 * 2**i for i in range(n_stages)],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * n_stages,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
        "n_conv_per_stage": [1] * n_stages,
        "n_conv_per_stage_decoder": [1] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [16, 16, 16],
        "spacing": [1.0, 1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": arch,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset001_Unit",
        "plans_name": "nnUNetPlans",
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": configuration},
        "label_manager": "LabelManager",
    }


def test_build_network_architecture_is_what_the_predictor_calls():
    plans_manager = PlansManager(_plans())
    configuration = plans_manager.get_configuration("3d_fullres")

    class Small(nnUNetTrainerPrototypeOOD):
        ood_head_channels = 12

    net = Small.build_network_architecture(plans_manager, configuration, 1, 3, enable_deep_supervision=False)
    assert isinstance(net, nnUNetPrototypeOODNet) and isinstance(net.backbone, PlainConvUNet)
    assert net.num_dims == 12 and net.num_classes == 3 and net.layer == "encoder.stages.2"
    assert net.decoder.deep_supervision is False


# ---------------------------------------------------------------------------------------------- trainer pieces


def test_masked_inlier_term_matches_the_loss_and_drops_ignored_cells():
    torch.manual_seed(0)
    distances = torch.rand(2, 3, 4, 4, 4) * 20
    labels = torch.randint(0, 3, (2, 1, 16, 16, 16))
    reference = OutlierExposureLoss(8).inlier_term(distances, labels)
    assert torch.allclose(masked_inlier_term(distances, labels, ignore_label=3, num_dims=8), reference)
    ignored = labels.clone()
    ignored[1] = 3  # the whole second image carries the ignore label: only the first one counts
    alone = OutlierExposureLoss(8).inlier_term(distances[:1], labels[:1])
    assert torch.allclose(masked_inlier_term(distances, ignored, ignore_label=3, num_dims=8), alone)
    everything = torch.full_like(labels, 3)
    assert masked_inlier_term(distances.requires_grad_(), everything, 3, 8).item() == 0.0


def test_outlier_channels_appends_an_outlier_and_reseeds_per_process():
    transform = OutlierChannels(OutlierSynthesis(ops=("rotate180",)))
    image = torch.rand(2, 8, 8, 8)
    out = transform(image=image.clone(), segmentation=torch.zeros(1, 8, 8, 8))
    assert out["image"].shape == (4, 8, 8, 8) and torch.equal(out["image"][:2], image)
    assert torch.equal(out["image"][2:], torch.flip(image, dims=(1, 2)))
    assert transform._seeded_in == os.getpid()

    jigsaw = OutlierChannels(OutlierSynthesis(ops=("patch_permute",)))
    results = []
    for _ in range(2):
        jigsaw._seeded_in = -1  # as in a freshly forked worker
        np.random.seed(123)  # nnU-Net's workers seed NumPy; the synthesis follows it
        results.append(jigsaw(image=image.clone())["image"])
    assert torch.equal(results[0], results[1])


def test_split_outliers():
    trainer = nnUNetTrainerPrototypeOOD.__new__(nnUNetTrainerPrototypeOOD)
    trainer.num_input_channels = 2
    data = torch.rand(3, 4, 8, 8, 8)
    images, outliers = trainer.split_outliers(data)
    assert torch.equal(images, data[:, :2]) and torch.equal(outliers, data[:, 2:])
    assert trainer.split_outliers(data[:, :2])[1] is None
    with pytest.raises(ValueError, match="input channels"):
        trainer.split_outliers(data[:, :3])


# ---------------------------------------------------------------------------------------------- detector patches


def _case(shape, seed=0, foreground=None):
    """A preprocessed case as nnU-Net stores it: z-scored data, seg with -1 outside the non-zero mask."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((1, *shape)).astype(np.float32)
    seg = np.zeros((1, *shape), dtype=np.int8)
    seg[:, :1] = -1
    locations = {}
    if foreground is not None:
        seg[(0, *foreground)] = 1
        locations[1] = np.array([[0, *foreground]])
    return data, seg, {"class_locations": locations}


def test_patches_are_spread_over_the_cases_seeded_and_of_the_patch_size():
    cases = {f"c{i}": _case((20, 18, 24), seed=i) for i in range(3)}
    loaded = []

    def load(key):
        loaded.append(key)
        return cases[key]

    patches = sample_patches(list(cases), load, (16, 16, 16), 7, seed=3)
    assert sorted(loaded) == sorted(cases)  # every case read once
    assert len(patches) == 7 and [p["case"] for p in patches].count(patches[0]["case"]) == 3  # 3 + 2 + 2
    for patch in patches:
        assert patch["image"].shape == (1, 16, 16, 16) and patch["image"].dtype == np.float32
        assert patch["label"].shape == (1, 16, 16, 16) and patch["label"].dtype == np.int64
        assert patch["label"].min() >= 0  # nnU-Net's -1 outside the mask is background, as in its training
        # the crop is a window of the case: find it by its values (independent of the sampler's offsets)
        data = cases[patch["case"]][0]
        value = patch["image"][0, 0, 0, 0]
        where = np.argwhere(data[0] == value)
        assert len(where) == 1
        z, y, x = where[0]
        assert np.array_equal(patch["image"][0], data[0, z : z + 16, y : y + 16, x : x + 16])
    again = sample_patches(list(cases), cases.__getitem__, (16, 16, 16), 7, seed=3)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(patches, again, strict=True))
    other = sample_patches(list(cases), cases.__getitem__, (16, 16, 16), 7, seed=4)
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(patches, other, strict=True))


def test_small_cases_are_padded_at_varying_offsets_and_foreground_is_oversampled():
    data, seg, properties = _case((10, 12, 16), foreground=(7, 3, 12))
    patches = sample_patches(["small"], lambda key: (data, seg, properties), (16, 16, 16), 9, seed=0)
    offsets = set()
    for i, patch in enumerate(patches):
        inside = np.argwhere(patch["image"][0] != 0)
        assert len(inside) == data[0].size  # the whole case, padded with 0 around it
        lower = tuple(inside.min(axis=0))
        offsets.add(lower)
        assert np.array_equal(
            patch["image"][0][tuple(slice(lo, lo + n) for lo, n in zip(lower, (10, 12, 16), strict=True))],
            data[0],
        )
        if i % 3 == 2:  # every third patch holds a voxel of a foreground class
            assert (patch["label"] == 1).sum() == 1
    assert len(offsets) > 1  # random placement: the detector's validation scores have a spread


def test_patch_labels_mark_the_ignore_label_unlabelled():
    data, seg, properties = _case((16, 16, 16))
    seg[0, 4:8] = 2  # the ignore label of a dataset with labels 0, 1 and ignore = 2
    seg[0, 8:10] = 1
    (patch,) = sample_patches(["c"], lambda key: (data, seg, properties), (16, 16, 16), 1, ignore_label=2)
    expected = np.where(seg == 2, -1, np.maximum(seg, 0))
    assert np.array_equal(patch["label"], expected)


def test_2d_patches_of_a_3d_case_are_slices():
    data, seg, properties = _case((5, 20, 24))
    patches = sample_patches(["c"], lambda key: (data, seg, properties), (16, 16), 4, seed=1)
    for patch in patches:
        assert patch["image"].shape == (1, 16, 16) and patch["label"].shape == (1, 16, 16)
        z = [k for k in range(5) if np.isin(patch["image"][0, 0, 0], data[0, k]).any()]
        assert len(z) == 1


def test_sample_patches_refuses_nothing_to_sample():
    with pytest.raises(ValueError, match="no cases"):
        sample_patches([], lambda key: None, (16, 16, 16), 4)
    with pytest.raises(ValueError, match="count"):
        sample_patches(["a"], lambda key: None, (16, 16, 16), 0)


# ---------------------------------------------------------------------------------------------- detector and tiling


@pytest.fixture(scope="module")
def fitted():
    """The wrapped network (deep supervision on, as trained) and its default detector fitted on patches."""
    net = _wrapped()
    cases = {f"c{i}": _case((18, 20, 22), seed=i, foreground=(9, 10, 11)) for i in range(4)}
    train = sample_patches(["c0", "c1", "c2"], cases.__getitem__, (16, 16, 16), 6, seed=0)
    val = sample_patches(["c3"], cases.__getitem__, (16, 16, 16), 4, seed=1)
    detector = fit_detector(net, train, val, num_classes=3, fusion="sum")
    return net, detector, cases


def test_the_detector_reads_the_registry_stages_with_deep_supervision_off(fitted):
    net, detector, _ = fitted
    assert detector.layers == ["encoder.stages.0", "encoder.stages.1", "encoder.stages.2"]
    assert net.decoder.deep_supervision is True  # restored after the fit
    with deep_supervision_off(net):
        assert net.decoder.deep_supervision is False
        logits, _, _ = detector.segment_and_score(torch.randn(1, 1, 16, 16, 16))
        with torch.no_grad():
            reference = net.backbone(torch.randn(1, 1, 16, 16, 16))
    assert net.decoder.deep_supervision is True
    assert logits.shape == reference.shape == (1, 3, 16, 16, 16)


def test_score_case_covers_the_case_whatever_its_size(fitted):
    _, detector, _ = fitted
    # nnU-Net's tiling at step 0.5 of a 16-voxel patch: ceil((n - 16) / 8) + 1 tiles per axis
    for shape, tiles in [((20, 16, 34), 2 * 1 * 4), ((10, 16, 16), 1)]:
        case = score_case(detector, torch.randn(1, *shape), (16, 16, 16), 0.5)
        assert case.score_map.shape == shape and case.score_map.dtype == torch.float32
        assert torch.isfinite(case.score_map).all() and case.score_map.min() >= 0
        assert case.tile_scores.shape == (tiles,) and torch.isfinite(case.tile_scores).all()
    data = torch.randn(1, 16, 16, 16)  # one tile: exactly the detector's own map and score
    expected = detector.predict(data[None])
    case = score_case(detector, data, (16, 16, 16))
    assert torch.allclose(case.score_map, expected.score_map[0, 0], atol=1e-5)
    assert case.image_score == pytest.approx(float(expected.image_score[0]), rel=1e-6)


def test_the_image_score_is_the_mean_of_the_tiles_scores(fitted):
    _, detector, _ = fitted
    data = torch.randn(1, 16, 16, 32)  # tiles start at 0, 8 and 16 along the last axis
    tiles = torch.stack([data[:, :, :, s : s + 16] for s in (0, 8, 16)])
    expected = detector.predict(tiles).image_score.double()
    case = score_case(detector, data, (16, 16, 16), 0.5)
    assert torch.allclose(case.tile_scores, expected, rtol=1e-5)
    assert case.image_score == pytest.approx(float(expected.mean()), rel=1e-5)


def test_2d_configuration_scores_3d_cases_slice_by_slice():
    torch.manual_seed(0)
    net = nnUNetPrototypeOODNet(_plain_unet(dims=2), num_classes=3, head_channels=8)
    rng = np.random.default_rng(0)
    items = [{"image": rng.standard_normal((1, 16, 16)).astype(np.float32), "label": None} for _ in range(6)]
    detector = fit_detector(net, items[:4], items[4:], num_classes=3, fusion="sum")
    data = torch.randn(1, 3, 20, 16)
    case = score_case(detector, data, (16, 16), 0.5)
    assert case.score_map.shape == (3, 20, 16) and case.tile_scores.shape == (3 * 2,)
    assert torch.allclose(case.score_map[1], score_case(detector, data[:, 1], (16, 16), 0.5).score_map)


def test_calibration_values_leave_out_padding(fitted):
    _, detector, _ = fitted
    values = list(map_values(detector, torch.randn(1, 8, 16, 16), (16, 16, 16)))
    # one tile padded from 8 to 16 along the first axis; the map is at stage 0, the full patch: half real
    assert len(values) == 1 and values[0].numel() == 8 * 16 * 16


def test_file_names_beside_the_checkpoint():
    assert calibration_path("fold_0").name == "ood_calibration.json"
    assert calibration_path("fold_0", "checkpoint_best.pth").name == "ood_calibration_checkpoint_best.json"
    assert detector_path("fold_0").name == "ood_detector.pt"
    assert detector_path("fold_0", "checkpoint_best.pth").name == "ood_detector_checkpoint_best.pt"


# ---------------------------------------------------------------------------------------------- calibration record


def test_the_calibration_record_is_bound_to_weights_and_detector(fitted, tmp_path):
    net, detector, cases = fitted
    calibration = fit_calibration(detector, net, [cases["c3"][0]], (16, 16, 16), 0.5, {"fold": 0})
    path = calibration.save(tmp_path / "ood_calibration.json")
    record = json.loads(path.read_text())
    assert (record["map"], record["front_end"], record["metadata"]) == ("fused", "nnunet", {"fold": 0})
    assert record["fingerprint"] == fingerprint(net.state_dict(), detector.to_state())
    # the values it was fitted on: the detector's maps of the case's tiles, recomputed here
    values = torch.cat(list(map_values(detector, cases["c3"][0], (16, 16, 16))))
    reference = WeibullCalibrator().fit(values)
    assert calibration.weibull.shape == pytest.approx(reference.shape)
    loaded = load_calibration(path, net.state_dict(), detector)
    assert isinstance(loaded, Calibration) and loaded.weibull.scale == pytest.approx(
        calibration.weibull.scale
    )
    assert load_calibration(tmp_path / "missing.json", net, detector) is None


def test_a_stale_calibration_is_refused_in_one_line(fitted, tmp_path):
    net, detector, cases = fitted
    path = fit_calibration(detector, net, [cases["c3"][0]], (16, 16, 16)).save(tmp_path / "cal.json")
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    weights["backbone.encoder.stages.0.0.convs.0.conv.weight"] += 1e-3  # a retrained fold
    with pytest.raises(ValueError) as error:
        load_calibration(path, weights, detector, remedy="calibrate again with: CMD")
    message = str(error.value)
    assert (
        "\n" not in message and "other weights" in message and message.endswith("(calibrate again with: CMD)")
    )
    refit = fit_detector(net, detector_items(cases, 0), detector_items(cases, 1), num_classes=3, fusion="max")
    with pytest.raises(ValueError, match="another detector"):  # same weights, another detector
        load_calibration(path, net, refit)


def detector_items(cases, seed):
    return sample_patches(sorted(cases), cases.__getitem__, (16, 16, 16), 4, seed=seed)


def test_an_old_format_calibration_is_refused_in_one_line(fitted, tmp_path):
    net, detector, _ = fitted
    path = tmp_path / "ood_calibration.json"  # what monai-ood wrote before the record: a bare Weibull fit
    WeibullCalibrator().fit(np.random.default_rng(0).weibull(2.0, 500)).save(path)
    with pytest.raises(ValueError) as error:
        load_calibration(path, net, detector, remedy="CMD")
    assert "\n" not in str(error.value) and "bare Weibull fit" in str(error.value)


# ---------------------------------------------------------------------------------------------- geometry


class _Plans:
    transpose_forward = [2, 0, 1]
    transpose_backward = [1, 2, 0]


class _Configuration:
    spacing = [2.0, 1.0, 1.0]

    @staticmethod
    def resampling_fn_probabilities(data, new_shape, current_spacing, new_spacing):
        from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

        return resample_data_or_seg_to_shape(
            data, new_shape, current_spacing, new_spacing, is_seg=False, order=1
        )


def test_map_back_to_the_original_grid_undoes_resampling_crop_and_transpose():
    properties = {
        "spacing": [1.0, 1.0, 1.0],  # of the original (transposed: the same)
        "shape_before_cropping": (12, 10, 8),  # in the transposed order (2, 0, 1) of a (10, 8, 12) input
        "bbox_used_for_cropping": [[2, 10], [0, 10], [1, 7]],
        "shape_after_cropping_and_before_resampling": (8, 10, 6),
    }
    preprocessed = torch.full((4, 10, 6), 3.0)  # resampled to spacing 2 along the first axis
    original = map_to_original_array(preprocessed, properties, _Plans(), _Configuration())
    assert original.shape == (10, 8, 12) and original.dtype == np.float32
    back = original.transpose(_Plans.transpose_forward)
    assert np.allclose(back[2:10, 0:10, 1:7], 3.0) and back.sum() == pytest.approx(3.0 * 8 * 10 * 6)


@pytest.mark.parametrize(
    "reader", ["SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO", "NibabelIOWithReorient"]
)
def test_maps_land_on_the_input_grid_for_every_reader(tmp_path, reader):
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    # an oblique, axis-permuted, anisotropic input, so that reorienting readers really reorient
    affine = np.array([[0.0, 0.0, -1.5, 30.0], [0.9, 0.3, 0.0, -12.0], [-0.3, 0.9, 0.0, 4.0], [0, 0, 0, 1]])
    data = np.random.default_rng(0).random((7, 9, 11)).astype(np.float32)
    path = tmp_path / "case_0000.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    reader_writer = recursive_find_reader_writer_by_name(reader)
    array, properties = reader_writer().read_images([str(path)])

    image = map_to_input_image(array[0], properties, reader_writer)  # a "map" equal to the image itself
    source = sitk.ReadImage(str(path))
    assert same_geometry(image, source, atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source), atol=1e-6)


def test_unsupported_reader_is_named():
    with pytest.raises(NotImplementedError, match="Tiff3DIO"):
        map_to_input_image(np.zeros((1, 4, 4)), {}, "Tiff3DIO")


# ---------------------------------------------------------------------------------------------- discovery and CLI


def test_trainer_folder_is_what_nnunet_discovers():
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folder = str(trainer_folder())
    found = recursive_find_python_class(
        folder, "nnUNetTrainerPrototypeOOD", None, base_folder=folder, cleanup_imports_from_base_folder=True
    )
    assert found is nnUNetTrainerPrototypeOOD  # the package's class, not a second copy
    assert find_trainer_class("nnUNetTrainerPrototypeOOD") is nnUNetTrainerPrototypeOOD


def test_export_line_keeps_other_trainer_folders():
    ours = str(trainer_folder())
    assert export_line(current="") == f"export nnUNet_extTrainer={ours}"
    assert (
        export_line(current=f"/my/trainers{os.pathsep}{ours}")
        == f"export nnUNet_extTrainer=/my/trainers{os.pathsep}{ours}"
    )
    assert export_line(current="/my/trainers") == f"export nnUNet_extTrainer={ours}{os.pathsep}/my/trainers"
    assert export_line("fish", current="").startswith("set -gx nnUNet_extTrainer ")
    assert export_line("powershell", current="") == f'$env:nnUNet_extTrainer = "{ours}"'
    with pytest.raises(ValueError, match="shell"):
        export_line("tcsh")


def test_env_command_runs_without_loading_nnunet(capsys):
    import subprocess
    import sys

    code = (
        "import sys; from monai_ood.integrations.nnunet.cli import main; main(['env']); "
        "print(any(m.startswith('nnunetv2') for m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line, loaded = result.stdout.strip().splitlines()
    assert line.startswith("export nnUNet_extTrainer=") and str(trainer_folder()) in line
    assert loaded == "False"


def test_mixin_puts_the_head_on_another_trainer_variant():
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
        nnUNetTrainerNoMirroring,
    )

    from monai_ood.integrations.nnunet import PrototypeOODTrainerMixin

    class NoMirroringOOD(PrototypeOODTrainerMixin, nnUNetTrainerNoMirroring):
        ood_head_channels = 8

    plans_manager = PlansManager(_plans())
    net = NoMirroringOOD.build_network_architecture(
        plans_manager, plans_manager.get_configuration("3d_fullres"), 1, 2
    )
    assert isinstance(net, nnUNetPrototypeOODNet) and net.num_dims == 8
    variant = nnUNetTrainerNoMirroring.configure_rotation_dummyDA_mirroring_and_inital_patch_size
    assert NoMirroringOOD.configure_rotation_dummyDA_mirroring_and_inital_patch_size is variant
