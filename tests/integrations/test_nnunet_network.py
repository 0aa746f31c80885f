"""The nnU-Net wrapper (monai_ood.integrations.nnunet.network): nnU-Net's forward and deep supervision
kept, the training pass and the recorded features, and a 2D residual-encoder U-Net."""

from __future__ import annotations

import torch
from nnunet_helpers import require_nnunet
from nnunet_helpers import wrapped as _wrapped
from torch import nn

require_nnunet()

from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet  # noqa: E402

from monai_ood.integrations.nnunet import nnUNetPrototypeOODNet  # noqa: E402


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
