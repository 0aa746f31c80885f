"""The nnU-Net detector's patches and fit (monai_ood.integrations.nnunet.detector): patches spread over the
cases, seeded and of the patch size, small cases padded, foreground oversampled, the ignore label,
2D patches of 3D cases, the registry's stages read with deep supervision off, and the file names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunet_helpers import case as _case
from nnunet_helpers import require_nnunet

require_nnunet()

from monai_ood.integrations.nnunet import calibration_path, detector_path, sample_patches  # noqa: E402
from monai_ood.integrations.nnunet.detector import deep_supervision_off  # noqa: E402


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


def test_file_names_beside_the_checkpoint():
    assert calibration_path("fold_0").name == "ood_calibration.json"
    assert calibration_path("fold_0", "checkpoint_best.pth").name == "ood_calibration_checkpoint_best.json"
    assert detector_path("fold_0").name == "ood_detector.pt"
    assert detector_path("fold_0", "checkpoint_best.pth").name == "ood_detector_checkpoint_best.pt"
