"""The paper's detector (monai_ood.detectors.prototype): the image score and upsampled map of the
prototype head, against the mean and bilinear upsampling of ``A(x) = min_k D_M`` computed in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

from monai_ood.detectors import DETECTORS
from monai_ood.detectors.prototype import PrototypeDetector
from monai_ood.networks import create_prototype_network


def test_prototype_detector_scores_are_the_heads_mean_distance_map():
    torch.manual_seed(0)
    kwargs = {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 0}
    net = create_prototype_network("unet", 2, 1, 3, head_channels=8, network_kwargs=kwargs).train()
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    detector = PrototypeDetector(net)
    assert DETECTORS["prototype"] is PrototypeDetector
    assert not detector.requires_fit and detector.is_fitted  # the head was trained with the network
    out = detector.predict(images)
    assert all(m.training for m in net.modules())  # the network's training flags are left alone

    with torch.no_grad():  # the distances of a full pass, reduced here independently of the detector
        distances = net.eval().forward_with_ood(images)[1].distances.double().numpy()
    low = distances.min(axis=1, keepdims=True)  # (B, 1, 8, 8) feature grid
    assert out.image_score.shape == (3,) and out.score_map.shape == (3, 1, 32, 32)
    np.testing.assert_allclose(out.image_score.numpy(), low.reshape(3, -1).mean(axis=1), rtol=1e-5)
    expected = F.interpolate(torch.from_numpy(low), size=(32, 32), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(out.score_map.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="PrototypeOODNet"):
        PrototypeDetector(UNet(2, 1, 3, channels=(4, 8), strides=(2,)))
