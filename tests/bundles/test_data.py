"""Data of the bundles (monai_ood.bundle.data): training/validation slices from a user's datalist (the last
volume validates when there is no validation list) or the embedded brain data, and the volumes inference
scores (a folder, a datalist split, or the MNI152 default), with their refusals."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from monai_ood.bundle import find_datalist, inference_items, load_slices
from monai_ood.preprocessing import SlicePreprocessing


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
