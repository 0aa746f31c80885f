"""The training step of every front-end (monai_ood.engines.step): PrototypeOODTrainingStep in MONAI's
SupervisedTrainer updates the whole network with both losses, directly or through TrainingForward (what
DDP wraps), with its errors; the fractional epoch of the learning-rate schedule and the logged losses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from monai_ood.engines.step import (
    PrototypeOODTrainingStep,
    TrainingForward,
    fractional_epoch,
    training_losses,
)
from monai_ood.losses import SegOODLoss
from monai_ood.networks import create_prototype_network

TINY_UNET = {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 0}


def _tiny_net(**network_kwargs):
    return create_prototype_network(
        "unet", 2, 1, 4, head_channels=8, network_kwargs={**TINY_UNET, **network_kwargs}
    )


def _trainer(network, net, outliers_per_step=None):
    batch = {
        "image": torch.rand(2, 1, 32, 32),
        "label": torch.randint(0, 4, (2, 1, 32, 32)).float(),
        "outlier": torch.rand(2, 1, 32, 32),
    }
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch, batch],
        network=network,
        optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3),
        loss_function=SegOODLoss(net.num_dims),
        iteration_update=PrototypeOODTrainingStep(outliers_per_step),
        decollate=False,
    )
    return trainer


def test_training_step_updates_the_network_with_both_losses():
    net = _tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = _trainer(net, net)
    trainer.run()
    output = trainer.state.output
    assert {"loss", "seg_loss", "ood_loss", "pred"} <= set(output)
    assert output["pred"].shape == (2, 4, 32, 32) and float(output["ood_loss"]) > 0
    for prefix in ("backbone.", "head.", "prototypes."):
        assert any(not torch.equal(v, before[k]) for k, v in net.state_dict().items() if k.startswith(prefix))


def test_training_step_through_training_forward_and_its_errors():
    net = _tiny_net()
    _trainer(TrainingForward(net), net).run()  # what DDP wraps
    with pytest.raises(TypeError, match="TrainingForward"):
        _trainer(torch.nn.DataParallel(net), net).run()
    with pytest.raises(ValueError, match="outliers_per_step"):
        PrototypeOODTrainingStep(-1)
    trainer = _trainer(net, net)
    trainer.data_loader = [{"image": torch.rand(2, 1, 32, 32), "label": torch.zeros(2, 1, 32, 32)}]
    with pytest.raises(KeyError, match="OutlierSynthesisd"):
        trainer.run()


def test_fractional_epoch_and_logged_losses():
    """The schedule is stepped with iteration / epoch_length (the paper's AdamWR, every iteration), and
    the StatsHandler gets the total loss and its two terms as plain floats."""
    net = _tiny_net()
    trainer = _trainer(net, net)  # one epoch of 2 iterations
    seen = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda engine: seen.append(fractional_epoch(engine))
    )
    trainer.run()
    assert seen == [(0.5,), (1.0,)]
    assert fractional_epoch(SimpleNamespace(state=SimpleNamespace(iteration=7, epoch_length=4))) == (1.75,)
    output = trainer.state.output
    losses = training_losses(output)
    assert losses == {key: output[key].item() for key in ("loss", "seg_loss", "ood_loss")}
    assert all(type(value) is float for value in losses.values())
    assert training_losses({"loss": torch.tensor(1.5), "pred": torch.zeros(2)}) == {"loss": 1.5}
