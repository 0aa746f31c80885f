"""Reconstruction-error OOD detection with a convolutional autoencoder.

The reconstruction signal of the generative OOD literature ("in-distribution samples are reconstructed
accurately, while OOD samples have large reconstruction errors"): a MONAI
:class:`~monai.networks.nets.AutoEncoder` is trained on the InD training images alone (no labels, no
outliers) with the mean squared error, and then

* score map = per-pixel squared error ``mean_c (x - x_hat)^2`` ``(B, 1, *spatial)``;
* image score = the mean of the score map over the **whole image**.

Why the whole image and not only the non-background region: a region defined from the test image itself
(e.g. ``x > t``) lets an OOD image pick its own denominator, and an image whose content spills over where
InD images are background (the very thing to detect) would be averaged over a larger region; the whole
image counts every error the autoencoder cannot explain, background included, at the cost of diluting
errors of images with little foreground. The image sizes are fixed by the preprocessing, so the mean is
the sum up to a constant.

Inputs whose spatial size is not a multiple of ``prod(strides)`` are zero-padded symmetrically for the
autoencoder and cropped back (zero is the background of the [0, 1] images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoEncoder

from ..transforms.augmentation import affine_augmentation
from .base import Detector, DetectorOutput, NotFittedError, eval_mode, module_device
from .fcdd import _augmented_batch, _batch_indices, _check_training_args

__all__ = ["AutoencoderDetector"]


class AutoencoderDetector(Detector):
    """Autoencoder reconstruction error; higher = more OOD.

    Args:
        spatial_dims, in_channels, channels, strides: of :class:`monai.networks.nets.AutoEncoder`
            (``out_channels = in_channels``; MONAI's defaults otherwise: PReLU, instance norm, no
            residual units).
        steps: optimisation steps of :meth:`fit` (0 keeps the random initialisation, e.g. as a baseline).
        batch_size: images per step.
        lr: Adam learning rate (constant).
        seed: seeds the initial weights (``torch.manual_seed``), the batch order and the augmentation.
        device: where to train and predict; ``None`` = CUDA if available, else the CPU.
        rotate_degrees, translate_pixels: the light augmentation (one ``RandAffine``), as for the
            segmentation training.

    Attributes:
        model: the trained :class:`AutoEncoder` (``None`` before :meth:`fit`).
        history: the training loss of every step.

    Example:
        >>> import numpy as np
        >>> det = AutoencoderDetector(steps=10).fit([{"image": np.random.rand(1, 32, 32).astype("float32")}] * 4)
        >>> det.predict(torch.rand(2, 1, 32, 32)).score_map.shape
        torch.Size([2, 1, 32, 32])
    """

    requires_fit = True
    name = "autoencoder"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64),
        strides: Sequence[int] = (2, 2, 2),
        steps: int = 2000,
        batch_size: int = 8,
        lr: float = 1e-3,
        seed: int = 0,
        device: str | torch.device | None = None,
        rotate_degrees: float = 15.0,
        translate_pixels: float = 10.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if len(channels) != len(strides):
            raise ValueError(f"channels and strides must have the same length, got {channels!r}, {strides!r}")
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.channels, self.strides = tuple(channels), tuple(strides)
        self.steps, self.batch_size, self.lr, self.seed = steps, batch_size, lr, seed
        self.device = torch.device(device) if device is not None else None
        self.rotate_degrees, self.translate_pixels = rotate_degrees, translate_pixels
        self.model: AutoEncoder | None = None
        self.history: list[float] = []

    def _resolve_device(self) -> torch.device:
        if self.device is not None:
            return self.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _fit(self, train_items, val_items) -> None:
        _check_training_args(train_items, self.steps, self.batch_size)
        device = self._resolve_device()
        torch.manual_seed(self.seed)
        model = AutoEncoder(
            self.spatial_dims,
            self.in_channels,
            self.in_channels,
            channels=self.channels,
            strides=self.strides,
        ).to(device)
        augment = affine_augmentation(
            ("image",), self.spatial_dims, self.rotate_degrees, self.translate_pixels
        )
        augment.set_random_state(self.seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        self.history = []
        model.train()
        for indices in _batch_indices(len(train_items), self.batch_size, self.steps, self.seed):
            images = _augmented_batch(train_items, indices, augment, ("image",))["image"].to(device)
            loss = F.mse_loss(self._reconstruct(model, images), images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.history.append(float(loss.detach()))
        model.eval()
        self.model = model

    def _reconstruct(self, model: AutoEncoder, images: torch.Tensor) -> torch.Tensor:
        """``model(images)`` with symmetric zero padding to a multiple of ``prod(strides)``, cropped back."""
        multiple = math.prod(self.strides)
        spatial = images.shape[2:]
        extra = [(-size) % multiple for size in spatial]
        if not any(extra):
            return model(images)
        pad: list[int] = []
        for e in reversed(extra):  # F.pad wants the last axis first
            pad += [e // 2, e - e // 2]
        out = model(F.pad(images, pad))
        crop = tuple(slice(e // 2, e // 2 + size) for e, size in zip(extra, spatial, strict=True))
        return out[(slice(None), slice(None), *crop)]

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The autoencoder's reconstruction of ``images`` ``(B, C, *spatial)``, on the model's device."""
        if self.model is None:
            raise NotFittedError("AutoencoderDetector must be fitted first: call .fit(train_items)")
        images = images.to(device=module_device(self.model, images.device), dtype=torch.float32)
        with torch.no_grad(), eval_mode(self.model):
            return self._reconstruct(self.model, images)

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        images = images.to(device=module_device(self.model, images.device), dtype=torch.float32)
        error = (self.reconstruct(images) - images).square().mean(dim=1, keepdim=True)
        return DetectorOutput(error.flatten(1).mean(dim=1), error)
