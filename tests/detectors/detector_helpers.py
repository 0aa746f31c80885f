"""Helpers of the detector tests: tiny UNets, items, stub networks and float64 numpy references.

Imported by the test modules of this folder (``from detector_helpers import ...``; plain functions cannot
live in ``conftest.py``, which pytest does not keep importable); the shared fixtures are in ``conftest.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.nets import UNet
from sklearn.covariance import LedoitWolf
from torch import nn

K = 3

# ---------------------------------------------------------------- post-hoc detectors (K-class UNets)


def make_unet(
    seed: int = 0, spatial_dims: int = 2, dropout: float = 0.0, out_channels: int = K, norm="instance"
) -> UNet:
    torch.manual_seed(seed)
    net = UNet(spatial_dims, 1, out_channels, channels=(4, 8, 16), strides=(2, 2), dropout=dropout, norm=norm)
    return net.eval()


def items(images) -> list[dict]:
    images = np.asarray(images, dtype=np.float32)
    return [{"image": image, "label": np.zeros((1, *image.shape[1:]), np.int64)} for image in images]


def rand(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


class FixedLogits(nn.Module):
    """A network (or ensemble member) stub returning known logits, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: x.shape[0]]


def foreground_reference(pixel: np.ndarray, logits: np.ndarray, empty) -> np.ndarray:
    """Float64 numpy: mean over argmax != 0 per image; ``empty(i)`` where there is no foreground."""
    out = []
    for i in range(len(pixel)):
        mask = logits[i].argmax(0) != 0
        out.append(pixel[i][mask].mean() if mask.any() else empty(i))
    return np.array(out)


def mahalanobis_numpy(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    lw = LedoitWolf().fit(train)
    diff, precision = x - train.mean(0), np.linalg.inv(lw.covariance_)
    return np.sqrt(np.einsum("nd,de,ne->n", diff, precision, diff))


# ---------------------------------------------------------------- trained detectors (1x32x32 toy images)

SIZE = 32
# Outlier ops for the toy runs (elastic and swap work too, but warn and cost more at 32x32; gamma is
# nearly invisible behind the UNet's instance norms).
OUTLIER_OPS = ("rotate180", "vflip", "patch_permute")


def toy_items(n: int, seed: int) -> list[dict]:
    """A bright bar along the top and a disc (label 1) with an intensity ramp: upright structure."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    items = []
    for _ in range(n):
        cy, cx = rng.uniform(13, 21, size=2)
        radius = rng.uniform(5, 8)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        image = np.where(inside, 0.4 + 0.4 * (yy - cy + radius) / (2 * radius), 0.0)
        image[2:5, 6:26] = 1.0
        image = image + rng.normal(0, 0.02, image.shape)
        items.append(
            {
                "image": np.clip(image, 0, 1).astype(np.float32)[None],
                "label": inside.astype(np.int64)[None],
            }
        )
    return items


def stack(items: list[dict]) -> torch.Tensor:
    return torch.from_numpy(np.stack([item["image"] for item in items]))


def tiny_unet() -> UNet:
    return UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2))
