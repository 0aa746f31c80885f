"""The nnU-Net trainer's pieces (monai_ood.integrations.nnunet.trainer), in-process: the network nnU-Net's
predictor builds, the masked inlier term, the outlier channels and their split, and the mixin on
another trainer variant. Training end to end is in test_nnunet_integration.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from nnunet_helpers import plans as _plans
from nnunet_helpers import require_nnunet

require_nnunet()

from dynamic_network_architectures.architectures.unet import PlainConvUNet  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402

from monai_ood.integrations.nnunet import (  # noqa: E402
    OutlierChannels,
    nnUNetPrototypeOODNet,
    nnUNetTrainerPrototypeOOD,
)
from monai_ood.integrations.nnunet.trainer import masked_inlier_term  # noqa: E402
from monai_ood.losses import OutlierExposureLoss  # noqa: E402
from monai_ood.transforms import OutlierSynthesis  # noqa: E402


def test_build_network_architecture_is_what_the_predictor_calls():
    plans_manager = PlansManager(_plans())
    configuration = plans_manager.get_configuration("3d_fullres")

    class Small(nnUNetTrainerPrototypeOOD):
        ood_head_channels = 12

    net = Small.build_network_architecture(plans_manager, configuration, 1, 3, enable_deep_supervision=False)
    assert isinstance(net, nnUNetPrototypeOODNet) and isinstance(net.backbone, PlainConvUNet)
    assert net.num_dims == 12 and net.num_classes == 3 and net.layer == "encoder.stages.2"
    assert net.decoder.deep_supervision is False


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
