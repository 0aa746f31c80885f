import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from monai_ood.networks import PRESETS, PrototypeOODNet, create_prototype_network, feature_layer_for

# (preset, spatial_dims, input spatial size, expected feature-grid size, network kwargs)
CASES = [
    ("unet", 2, (64, 48), (4, 3), {}),
    ("unet", 3, (32, 32, 16), (2, 2, 1), {}),
    ("basic_unet", 2, (64, 48), (4, 3), {"features": (8, 8, 16, 16, 32, 8)}),
    ("basic_unet", 3, (32, 32, 16), (2, 2, 1), {"features": (8, 8, 16, 16, 32, 8)}),
    ("dynunet", 2, (64, 48), (4, 3), {}),
    ("dynunet", 3, (32, 32, 16), (2, 2, 1), {}),
    ("segresnet", 2, (64, 48), (4, 3), {}),
    ("segresnet", 3, (32, 32, 16), (2, 2, 1), {}),
    ("deeplabv3", 2, (64, 48), (4, 3), {}),
    ("deeplabv3", 3, (32, 32, 16), (2, 2, 1), {}),
]


@pytest.mark.parametrize("preset,spatial_dims,size,feature_size,kwargs", CASES)
def test_preset_shapes_and_state_dict(preset, spatial_dims, size, feature_size, kwargs):
    torch.manual_seed(0)
    num_classes, head_channels = 3, 8
    net = create_prototype_network(preset, spatial_dims, 1, num_classes, head_channels, network_kwargs=kwargs)
    net.eval()
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        logits = net(x)
        logits2, ood = net.forward_with_ood(x)
        encoder_only = net.ood(x)
    assert logits.shape == (2, num_classes, *size)
    torch.testing.assert_close(logits, logits2)
    assert ood.distances.shape == (2, num_classes, *feature_size)
    assert ood.score_map.shape == (2, 1, *feature_size)
    assert ood.score_map_upsampled.shape == (2, 1, *size)
    assert ood.image_score.shape == (2,)
    torch.testing.assert_close(ood.score_map, ood.distances.min(1, keepdim=True).values)
    torch.testing.assert_close(ood.image_score, ood.score_map.flatten(1).mean(1))
    torch.testing.assert_close(encoder_only.score_map, ood.score_map)

    # the wrapped backbone keeps the unwrapped network's architecture and keys: a plain checkpoint loads
    plain = PRESETS[preset].build(spatial_dims, 1, num_classes, **kwargs).eval()
    assert list(net.backbone.state_dict()) == list(plain.state_dict())
    assert set(net.state_dict()) == {f"backbone.{k}" for k in plain.state_dict()} | {
        f"head.{k}" for k in net.head.state_dict()
    } | {f"prototypes.{k}" for k in net.prototypes.state_dict()}
    net.backbone.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x))


def _small_unet():
    return UNet(2, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def test_auto_layer_and_encoder_only_pass_skips_decoder():
    unet = _small_unet()
    net = PrototypeOODNet(unet, num_classes=3, head_channels=4)
    assert net.layer == feature_layer_for(unet) == "model.1.submodule.1.submodule"
    assert net.feature_channels == 16 and net.spatial_dims == 2
    calls = []
    final = unet.model[2]  # the outermost up-sampling block: decoder
    final.register_forward_hook(lambda *args: calls.append(1))
    features = net.encode(torch.rand(1, 1, 16, 16))
    assert features.shape == (1, 16, 4, 4) and calls == []
    net(torch.rand(1, 1, 16, 16))
    assert calls == [1]


def test_no_hook_stays_on_the_network():
    import copy
    import pickle

    net = PrototypeOODNet(_small_unet(), num_classes=3, head_channels=4, extra_layers=["model.0"])
    x = torch.rand(2, 1, 16, 16)
    logits, ood = net.forward_with_ood(x)
    net.ood(x)
    hooks = [m for m in net.modules() if m._forward_hooks]
    assert hooks == []  # capture hooks live for one call only
    torch.testing.assert_close(net(x), net.backbone(x))
    twin = copy.deepcopy(net)  # a copy scores by itself, with nothing pointing back at the original
    torch.testing.assert_close(twin.forward_with_ood(x)[1].image_score, ood.image_score)
    torch.testing.assert_close(pickle.loads(pickle.dumps(net)).ood(x).score_map, net.ood(x).score_map)


def test_layer_errors():
    with pytest.raises(ValueError, match="no module named 'nope'"):
        PrototypeOODNet(_small_unet(), num_classes=3, layer="nope")
    with pytest.raises(ValueError, match="pass layer="):
        PrototypeOODNet(nn.Sequential(nn.Conv2d(1, 2, 3)), num_classes=2)
    net = PrototypeOODNet(nn.Sequential(nn.Conv2d(1, 5, 3), nn.ReLU(), nn.Conv2d(5, 2, 1)), 2, layer="0")
    assert net.feature_channels == 5
    with pytest.raises(ValueError, match="expected input"):
        net.ood(torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="did you mean|Unsupported option"):
        create_prototype_network("unnet", 2, 1, 2)


class _BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.decoder = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.decoder(self.encoder(x))


@pytest.mark.parametrize("mode", ["running", "batch"])
def test_outliers_never_update_batchnorm_running_stats(mode):
    torch.manual_seed(0)
    net = PrototypeOODNet(_BatchNormNet(), num_classes=2, layer="encoder", head_channels=4, outlier_norm=mode)
    net.train()
    bn = net.backbone.encoder[1]
    net.forward_train(torch.rand(4, 1, 8, 8))  # InD updates the running stats
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    outliers = torch.rand(4, 1, 8, 8) * 10 + 5
    out = net.forward_train(torch.rand(4, 1, 8, 8), outliers)
    assert not torch.equal(mean, bn.running_mean)  # sanity: the InD batch does update them
    assert bn.training  # restored after the outlier pass
    if mode == "running":  # outliers normalised exactly as at test time, with the running stats
        net.eval()
        with torch.no_grad():
            expected = net.distances(net.encode(outliers))
        torch.testing.assert_close(out.outlier_distances.detach(), expected)
    # compare with a run without outliers from the same state: outliers must leave no trace
    net2 = PrototypeOODNet(
        _BatchNormNet(), num_classes=2, layer="encoder", head_channels=4, outlier_norm=mode
    )
    net2.load_state_dict(net.state_dict())
    bn2 = net2.backbone.encoder[1]
    bn2.running_mean.copy_(mean), bn2.running_var.copy_(var)
    bn.running_mean.copy_(mean), bn.running_var.copy_(var)
    x = torch.rand(4, 1, 8, 8)
    net.train(), net2.train()
    net.forward_train(x, outliers)
    net2.forward_train(x)
    torch.testing.assert_close(bn.running_mean, bn2.running_mean)
    torch.testing.assert_close(bn.running_var, bn2.running_var)


def test_gradients_reach_backbone_head_and_prototypes_from_outliers_only():
    torch.manual_seed(0)
    net = PrototypeOODNet(_small_unet(), num_classes=3, head_channels=4)
    out = net.forward_train(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16))
    out.outlier_distances.sum().backward()
    assert net.head.projection.conv.weight.grad.abs().sum() > 0
    assert net.prototypes.means.grad.abs().sum() > 0
    assert net.backbone.model[0].conv.unit0.conv.weight.grad.abs().sum() > 0
    assert net.backbone.model[2][0].conv.weight.grad is None  # the decoder's last block never saw them
