"""A few-iteration variant of nnUNetTrainerPrototypeOOD for the CPU integration test.

The test puts this folder on nnUNet_extTrainer next to the package's own trainer folder, the way a user
adds a trainer variant of their own.
"""

import torch

from monai_ood.integrations.nnunet import nnUNetTrainerPrototypeOOD


class nnUNetTrainerPrototypeOOD_Smoke(nnUNetTrainerPrototypeOOD):  # noqa: N801 (nnU-Net's naming)
    ood_head_channels = 16
    # 32^3 patches: a gentler deformation than the default 7.5 voxels between 7 control points
    ood_outlier_kwargs = {"elastic_max_displacement": 2.0, "swap_patch_size": 8}
    # the default detector on a few patches (4 training cases, 2 validation cases)
    ood_detector_train_patches = 8
    ood_detector_val_patches = 3
    # the automatic fusion choice on three of the core's outlier ops (a global, a local, a geometric one)
    ood_detector_selection_ops = ("gamma", "local_noise", "rotate180")

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):  # noqa: B008
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.num_epochs = 2

    def perform_actual_validation(self, save_probabilities: bool = False):
        # nnU-Net's final validation spawns an export and an evaluation pool (half a minute on 2 cores);
        # the test runs nnU-Net's predictor on the wrapped network in-process instead
        self.print_to_log_file("final validation skipped (test trainer)")
