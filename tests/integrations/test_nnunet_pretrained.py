"""``nnUNetv2_train ... -pretrained_weights FILE`` with the prototype trainer
(monai_ood.integrations.nnunet.pretrained), in-process: a checkpoint written by nnU-Net's own trainer
(``nnUNetTrainer.save_checkpoint``, its planned ``PlainConvUNet``) goes through nnU-Net's own
``maybe_load_checkpoint``, what ``nnUNetv2_train`` runs, into the wrapped network's ``backbone.*``,
with the head, the prototypes and the segmentation layers left initialised and one line in the log."""

from __future__ import annotations

import torch
from nnunet_helpers import initialised_trainer, plans, require_nnunet

require_nnunet()

import pytest  # noqa: E402
from nnunetv2.run import run_training  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402

from monai_ood.integrations.nnunet import nnUNetTrainerPrototypeOOD  # noqa: E402
from monai_ood.integrations.nnunet.pretrained import load_pretrained_weights  # noqa: E402


class SmallHead(nnUNetTrainerPrototypeOOD):  # noqa: N801
    ood_head_channels = 8


class OtherHead(nnUNetTrainerPrototypeOOD):  # noqa: N801
    ood_head_channels = 12


def _perturbed(trainer) -> dict[str, torch.Tensor]:
    """Give every tensor of the trainer's network other values than any initialisation (instance norms
    start at ones and zeros in every network) and return its state dict."""
    with torch.no_grad():
        for value in trainer.network.state_dict().values():
            value.add_(torch.rand_like(value) + 0.5)
    return {key: value.clone() for key, value in trainer.network.state_dict().items()}


def _load_as_nnunet_train_does(trainer, checkpoint) -> dict[str, torch.Tensor]:
    run_training.maybe_load_checkpoint(trainer, False, False, str(checkpoint))
    return trainer.network.state_dict()


def test_plain_nnunet_checkpoint_loads_into_the_backbone_and_leaves_the_head(tmp_path, monkeypatch):
    plain = initialised_trainer(nnUNetTrainer, tmp_path, monkeypatch, fold=0)
    plain_weights = _perturbed(plain)
    checkpoint = tmp_path / "checkpoint_final.pth"
    plain.save_checkpoint(str(checkpoint))  # nnU-Net's own checkpoint of its own trainer

    ours = initialised_trainer(SmallHead, tmp_path, monkeypatch, fold=1)
    before = {key: value.clone() for key, value in ours.network.state_dict().items()}
    after = _load_as_nnunet_train_does(ours, checkpoint)

    loaded = [k for k in after if k.startswith("backbone.") and ".seg_layers." not in k]
    assert len(loaded) == sum(".seg_layers." not in k for k in plain_weights)
    for key, value in after.items():
        if key in loaded:
            assert torch.equal(value, plain_weights[key[len("backbone.") :]]), key
        else:  # head, prototypes and segmentation layers: as initialised
            assert torch.equal(value, before[key]), key
    untouched = {k.split(".")[0] for k in after if k not in loaded}
    assert untouched == {"backbone", "head", "prototypes"}  # backbone: its decoder.seg_layers

    seg_layers = sum(".seg_layers." in k for k in after)
    line = (
        f"pretrained weights from {checkpoint} (plain nnU-Net checkpoint): loaded backbone ({len(loaded)}); "
        f"left initialised backbone.decoder.seg_layers ({seg_layers}), head (3), prototypes (2)"
    )
    log = open(ours.log_file, encoding="utf-8").read()
    assert line in log and log.count("pretrained weights from") == 1

    # nnU-Net's own trainer, on its own network, still goes to nnU-Net's loader
    again = initialised_trainer(nnUNetTrainer, tmp_path, monkeypatch, fold=2)
    reloaded = _load_as_nnunet_train_does(again, checkpoint)
    for key, value in reloaded.items():
        if ".seg_layers." not in key:
            assert torch.equal(value, plain_weights[key]), key
    assert not getattr(run_training.load_pretrained_weights.__wrapped__, "routes_prototype_ood", False)


def test_checkpoint_of_the_prototype_trainer_loads_the_head_where_it_fits(tmp_path, monkeypatch):
    first = initialised_trainer(SmallHead, tmp_path, monkeypatch, fold=0)
    trained = _perturbed(first)
    checkpoint = tmp_path / "checkpoint_final.pth"
    first.save_checkpoint(str(checkpoint))

    same = initialised_trainer(SmallHead, tmp_path, monkeypatch, fold=1)
    initial = {key: value.clone() for key, value in same.network.state_dict().items()}
    after = _load_as_nnunet_train_does(same, checkpoint)
    for key, value in after.items():
        expected = initial[key] if ".seg_layers." in key else trained[key]
        assert torch.equal(value, expected), key

    other = initialised_trainer(OtherHead, tmp_path, monkeypatch, fold=2)  # c_g 12, not 8
    summary = other.load_pretrained_weights(checkpoint)
    assert summary.kind == "prototype OOD"
    # the head is loaded whole or not at all (its PReLU weight alone would fit any c_g)
    assert set(summary.loaded) == {"backbone"}
    assert (summary.initialised["head"], summary.initialised["prototypes"]) == (3, 2)
    backbone = other.network.backbone.state_dict()
    assert all(
        torch.equal(v, trained[f"backbone.{k}"]) for k, v in backbone.items() if ".seg_layers." not in k
    )


def test_checkpoint_of_another_network_is_refused_in_one_line(tmp_path, monkeypatch):
    manager = PlansManager(plans(n_stages=4))  # one stage more than the trainer's plan
    network = nnUNetTrainer.build_network_architecture(
        manager, manager.get_configuration("3d_fullres"), 1, 3, enable_deep_supervision=True
    )
    checkpoint = tmp_path / "other.pth"
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer"}, checkpoint)
    ours = initialised_trainer(SmallHead, tmp_path, monkeypatch)
    before = {key: value.clone() for key, value in ours.network.state_dict().items()}
    with pytest.raises(ValueError, match=r"not of this network") as refused:
        _load_as_nnunet_train_does(ours, checkpoint)
    assert "\n" not in str(refused.value) and str(checkpoint) in str(refused.value)
    assert all(torch.equal(v, before[k]) for k, v in ours.network.state_dict().items())  # nothing half-loaded
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        load_pretrained_weights(ours.network, {"network_weights": {"a": 1}})
