"""Fixtures of the bundle tests (their helpers are in ``bundle_helpers.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest


@pytest.fixture(scope="session")
def brain_cache(tmp_path_factory) -> Path:
    """The embedded brain slices at TINY_SLICES, built once into a session folder (the user's cache is
    left alone, and the torchrun ranks find it built)."""
    from bundle_helpers import TINY_SLICES

    from monai_ood.data import load_brain_dataset
    from monai_ood.preprocessing import SlicePreprocessing

    folder = tmp_path_factory.mktemp("brain_cache")
    preprocessing = SlicePreprocessing(spacing=TINY_SLICES["pixel_spacing"], size=TINY_SLICES["image_size"])
    load_brain_dataset(cache_dir=folder, preprocessing=preprocessing)
    return folder


@pytest.fixture(scope="session")
def oblique_volume(tmp_path_factory) -> Path:
    """A 6-slice, anisotropic (3 x 3 x 5 mm), obliquely rotated (8 degrees) NIfTI cut from the MNI152 T1."""
    from monai_ood.data import mni152_2009a_paths

    source = nib.load(str(mni152_2009a_paths()["t1"]))
    data = np.asanyarray(source.dataobj).astype(np.float32)[::3, ::3, 80:110:5]
    theta = np.deg2rad(8.0)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([3.0, 3.0, 5.0])
    affine[:3, 3] = [-98.0, -134.0, 8.0]
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    folder = tmp_path_factory.mktemp("volumes")
    path = folder / "case_a.nii.gz"
    nib.save(image, str(path))
    return path


@pytest.fixture(scope="session")
def user_dataset(tmp_path_factory, oblique_volume) -> Path:
    """A user's Decathlon-style folder: dataset.json with 2 labelled training volumes (stacks of 6
    embedded brain slices with their labels; no "validation" list, so one is held out) and the oblique
    volume as "test"."""
    import shutil

    from monai_ood.data import load_brain_dataset

    train = load_brain_dataset()["train"]
    # array (rows, columns, slices) = towards posterior, patient left, superior: RAS axes -y, -x, +z
    affine = np.array([[0.0, -2.0, 0.0, 96.0], [-2.0, 0.0, 0.0, 112.0], [0.0, 0.0, 2.0, 0.0], [0, 0, 0, 1]])
    folder = tmp_path_factory.mktemp("user_dataset")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir()
    training = []
    for name, items in (("a", train[20:26]), ("b", train[50:56])):
        image = np.stack([item["image"][0] for item in items], axis=-1)
        label = np.stack([item["label"][0] for item in items], axis=-1).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, affine), str(folder / "imagesTr" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(folder / "labelsTr" / f"{name}.nii.gz"))
        training.append({"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"})
    shutil.copy(oblique_volume, folder / "imagesTs" / oblique_volume.name)
    datalist = {"training": training, "test": [f"imagesTs/{oblique_volume.name}"]}
    (folder / "dataset.json").write_text(json.dumps(datalist), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def model_files(tmp_path_factory):
    """A tiny trained-looking network's models/: model.pt (a plain state dict, as CheckpointSaver writes
    it), detector.pt and calibration.json written by the post-hoc step's functions (read by
    test_posthoc.py and test_scoring.py)."""
    import torch
    from bundle_helpers import labelled_items, tiny_detector, tiny_net

    from monai_ood.bundle import calibrate_detector, fit_detector

    torch.manual_seed(0)
    net = tiny_net().eval()
    folder = tmp_path_factory.mktemp("models")
    torch.save(net.state_dict(), folder / "model.pt")
    train, val = labelled_items(8, 0), labelled_items(4, 1)
    detector = fit_detector(tiny_detector(net), train, val, folder / "detector.pt")
    calibration = calibrate_detector(net, detector, val, folder / "calibration.json", batch_size=3)
    return SimpleNamespace(
        net=net, detector=detector, calibration=calibration, folder=folder, train=train, val=val
    )
