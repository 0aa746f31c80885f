"""Helpers of the nnU-Net integration's unit tests: the nnunetv2 guard, tiny nnU-Net U-Nets (plain and
wrapped), a plan, an initialised trainer on it, and preprocessed cases as nnU-Net stores them.

Imported by the test modules and ``conftest.py`` of this folder (``from nnunet_helpers import ...``);
nothing here imports nnU-Net until it is called, so a module calls :func:`require_nnunet` first.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from torch import nn


def require_nnunet() -> None:
    """Skip the calling test module without nnunetv2 (an error in CI, where ``make setup`` installs it)."""
    if importlib.util.find_spec("nnunetv2") is None:
        if os.environ.get("CI"):
            raise ImportError("nnunetv2 is not installed: `make setup` installs it (the nnunet extra)")
        pytest.skip("nnunetv2 is not installed (pip install 'monai-ood[nnunet]')", allow_module_level=True)


def plain_unet(dims: int = 3, deep_supervision: bool = True):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d
    return PlainConvUNet(
        1, 3, (4, 8, 16), conv, 3, (1, 2, 2), 1, 3, 1,
        conv_bias=True, norm_op=norm, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
        deep_supervision=deep_supervision,
    )  # fmt: skip


def wrapped(dims: int = 3, head_channels: int = 8):
    from monai_ood.integrations.nnunet import nnUNetPrototypeOODNet

    torch.manual_seed(0)
    return nnUNetPrototypeOODNet(plain_unet(dims), num_classes=3, head_channels=head_channels).eval()


def plans(n_stages: int = 3) -> dict:
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


DATASET_JSON = {
    "channel_names": {"0": "MRI"},
    "labels": {"background": 0, "a": 1, "b": 2},
    "numTraining": 2,
    "file_ending": ".nii.gz",
}


def initialised_trainer(trainer_class, root, monkeypatch, fold: int = 0, n_stages: int = 3):
    """A trainer of ``trainer_class`` on :func:`plans`, initialised as ``nnUNetv2_train`` initialises it
    (network, optimiser, loss, logger), on CPU, with the ``nnUNet_*`` folders under ``root``.

    There is no data: one placeholder file in the preprocessed folder tells nnU-Net the dataset format,
    which ``initialize`` reads. Enough for what happens before the first epoch (pretrained weights).
    """
    plan = plans(n_stages)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(root / name))
    data = root / "nnUNet_preprocessed" / plan["dataset_name"] / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True, exist_ok=True)
    (data / "placeholder.b2nd").touch()
    plan["continue_training"] = False  # nnU-Net >= 2.8 reads (and removes) this key
    trainer = trainer_class(plan, "3d_fullres", fold, dict(DATASET_JSON), device=torch.device("cpu"))
    trainer.initialize()
    return trainer


def case(shape, seed=0, foreground=None):
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
