"""Helpers of the engine tests: tiny labelled items, the training configuration, a tiny saved model.

Imported by the test modules and ``conftest.py`` of this folder (``from engine_helpers import ...``);
the shared fixtures are in ``conftest.py``.
"""

import numpy as np
import torch

from monai_ood.engines import TrainingConfig
from monai_ood.engines.checkpoint import build_network, make_model_config, save_model
from monai_ood.preprocessing import SlicePreprocessing

# ---------------------------------------------------------------- training (test_training, test_calibration)
CLASS_NAMES = ["background", "ring", "core"]
PREPROCESSING = SlicePreprocessing(size=(32, 32))


def training_items(n, seed):
    """Bright squares (class 1) with a brighter core (class 2) on a dark noisy background."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        label = np.zeros((1, 32, 32), np.int64)
        r, c = rng.integers(4, 20, size=2)
        label[0, r : r + 8, c : c + 8] = 1
        label[0, r + 2 : r + 6, c + 2 : c + 6] = 2
        image = (rng.random((1, 32, 32)) * 0.2 + 0.4 * label).astype(np.float32)
        items.append({"image": image, "label": label})
    return items


def training_config(**overrides):
    kwargs = {
        "network_kwargs": {"channels": (4, 8, 16), "strides": (2, 2)},
        "head_channels": 8,
        "batch_size": 4,
        "max_epochs": 2,
        "num_workers": 0,
        "seed": 0,
        # the engine's mechanics (best-by-Dice model.pt, one score-map grid) are the paper head's
        "head_config": "paper",
        **overrides,
    }
    return TrainingConfig(**kwargs)


# ---------------------------------------------------------------- a tiny model.pt (test_fit_detector, test_calibration)
NETWORK_KWARGS = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}
UNET_STAGES = ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule"]


def random_items(count, seed, shape=(1, 32, 32)):
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        image = rng.random(shape, dtype=np.float32)
        label = rng.integers(0, 3, (1, *shape[1:])).astype(np.int64)
        items.append({"image": image, "label": label})
    return items


def save_tiny_model(path, calibration=None):
    config = make_model_config("unet", 2, 1, 3, 4, NETWORK_KWARGS)
    torch.manual_seed(0)
    net = build_network(config)
    with torch.no_grad():  # weights unlike a fresh initialisation
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(path, net, config, SlicePreprocessing(size=(32, 32)), calibration=calibration)
    return {k: v.clone() for k, v in net.state_dict().items()}
