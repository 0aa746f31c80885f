"""FCDD on the encoder layer of a segmentation network, trained jointly with segmentation.

Fully convolutional data description (Liznerski et al., ICLR 2021), as the paper's baseline (Cho, Park,
Choo 2023, section 2.2 and section 4.2: "We applied the method described in Section 2.2 to the
intermediate layer f_int of f"):

* a 1x1 convolution ``c -> 1`` on the features ``f_int(x)`` of the hooked encoder layer gives
  ``e(x)`` ``(B, 1, *feature_spatial)`` (no activation: the pseudo-Huber map follows);
* ``F(x) = sqrt(e(x)^2 + 1) - 1 >= 0`` (:func:`pseudo_huber`);
* loss, eq. (3)::

      L_FCDD = 1/n_a sum_t mean_ij F(x_t)  -  1/n_b sum_s log(1 - exp(-mean_ij F(x_s^b)))

  :class:`FCDDLoss`. The paper writes ``||F(x)||_1``; we use the mean over the feature grid
  (``||F||_1 / (h w)``), which only rescales it for a fixed input size and keeps ``lambda`` independent
  of the image size;
* image score ``mean_ij F(x)`` and score map ``F(x)`` upsampled (bilinear) to the input: higher = more OOD.

The head sits on the same layer and uses the same hook machinery as :class:`PrototypeOODNet` (the
backbone, its forward and its state-dict keys are unchanged), and :func:`train_fcdd` trains
``L = L_seg + lambda * L_FCDD`` with the same outliers (:class:`OutlierSynthesis` applied to each
augmented InD image, through the encoder only) and the same optimiser as the prototype head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.utils import convert_to_tensor
from torch import nn

from ..networks.prototype_net import (
    HookedEncoderNet,
)
from ..networks.prototypes import ProjectionHead
from ..transforms.augmentation import affine_augmentation
from ..transforms.outlier_synthesis import PAPER_OPS, OutlierSynthesis
from .base import Detector, DetectorOutput, eval_mode, module_device, to_input_size

__all__ = [
    "FCDDDetector",
    "FCDDLoss",
    "FCDDNet",
    "FCDDOutput",
    "FCDDTrainOutput",
    "pseudo_huber",
    "train_fcdd",
]

# Outlier scores are clamped to at least this before log(1 - exp(-s)): log(-expm1(-1e-6)) ~ -13.8.
OUTLIER_SCORE_MIN = 1e-6


def pseudo_huber(e: torch.Tensor) -> torch.Tensor:
    """``sqrt(e^2 + 1) - 1``, computed as ``|e| * |e| / (hypot(e, 1) + 1)``.

    The two are equal; the second has no cancellation for small ``|e|`` (where ``sqrt(1 + e^2) - 1``
    rounds to 0 in float32) and no overflow of ``e^2`` for large ``|e|``.
    """
    magnitude = e.abs()
    return magnitude * (magnitude / (torch.hypot(e, torch.ones_like(e)) + 1.0))


@dataclass
class FCDDOutput:
    """``score_map`` F ``(B, 1, *feature_spatial)``, its upsampled version ``(B, 1, *input_spatial)``
    and the image score ``mean_ij F`` ``(B,)``."""

    score_map: torch.Tensor
    score_map_upsampled: torch.Tensor | None
    image_score: torch.Tensor


@dataclass
class FCDDTrainOutput:
    """One training step's outputs: InD ``logits``, InD ``score_map`` F and the outliers' F (or ``None``)."""

    logits: torch.Tensor
    score_map: torch.Tensor
    outlier_score_map: torch.Tensor | None


class FCDDNet(HookedEncoderNet):
    """A segmentation network with an FCDD head on a hooked encoder layer.

    The hook machinery is :class:`~monai_ood.networks.prototype_net.HookedEncoderNet`'s, shared with the
    prototype head (not a :class:`PrototypeOODNet`: it has no prototypes).

    * ``forward(x)`` returns the backbone's logits unchanged; the state dict holds ``backbone.*``
      (the backbone's own keys) and ``head.*``.
    * :meth:`ood` runs the encoder only; :meth:`forward_with_ood` one full pass;
      :meth:`forward_train` the full network on InD images and the encoder only on outliers (batch
      norms of the outlier pass as ``outlier_norm`` says, see :class:`PrototypeOODNet`).

    Args:
        backbone: any segmentation network returning logits.
        layer: dotted module name to hook; ``"auto"`` = the bottleneck of a supported network
            (:func:`monai_ood.networks.feature_layer_for`), the same layer the prototype head uses.
        feature_channels: channels of the hooked output; inferred when ``None``.
        spatial_dims: 2 or 3; inferred when ``None``.
        outlier_norm: ``"running"`` or ``"batch"``.

    Example:
        >>> from monai.networks.nets import UNet
        >>> net = FCDDNet(UNet(2, 1, 3, channels=(4, 8, 16), strides=(2, 2)))
        >>> net.ood(torch.rand(2, 1, 32, 32)).score_map.shape
        torch.Size([2, 1, 8, 8])
    """

    def __init__(
        self,
        backbone: nn.Module,
        layer: str = "auto",
        feature_channels: int | None = None,
        spatial_dims: int | None = None,
        outlier_norm: str = "running",
    ) -> None:
        super().__init__(backbone, layer, feature_channels, spatial_dims, outlier_norm)
        self.head = ProjectionHead(self.spatial_dims, self.feature_channels, 1, act=None)

    def score_map(self, features: torch.Tensor) -> torch.Tensor:
        """``F = pseudo_huber(e)`` of hooked features: ``(B, 1, *feature_spatial)``, float32 under autocast."""
        e = self.head(features)
        with torch.autocast(device_type=e.device.type, enabled=False):
            return pseudo_huber(e.float())

    @staticmethod
    def ood_from_score_map(score_map: torch.Tensor, input_size: Sequence[int] | None = None) -> FCDDOutput:
        upsampled = to_input_size(score_map, input_size) if input_size is not None else None
        return FCDDOutput(score_map, upsampled, score_map.flatten(1).mean(dim=1))

    def ood(self, x: torch.Tensor) -> FCDDOutput:
        """FCDD outputs from an encoder-only pass."""
        return self.ood_from_score_map(self.score_map(self.encode(x)), x.shape[2:])

    def forward_with_ood(self, x: torch.Tensor) -> tuple[torch.Tensor, FCDDOutput]:
        """One pass of the whole network: ``(logits, FCDDOutput)``."""
        logits, features = self.forward_capturing(x)
        return logits, self.ood_from_score_map(self.score_map(features), x.shape[2:])

    def forward_train(self, images: torch.Tensor, outliers: torch.Tensor | None = None) -> FCDDTrainOutput:
        """Whole network on ``images``, encoder only on ``outliers`` (``None`` for no outliers)."""
        logits, features = self.forward_capturing(images)
        score_map = self.score_map(features)
        outlier_map = None
        if outliers is not None:
            with self._outlier_normalisation():
                outlier_map = self.score_map(self.encode(outliers))
        return FCDDTrainOutput(logits, score_map, outlier_map)


class FCDDLoss(nn.Module):
    """Eq. (3) with image scores ``s = mean_ij F``:
    ``mean_t s(x_t) - mean_s log(1 - exp(-s(x_s^b)))``.

    The outlier term is ``log(-expm1(-s))`` with ``s`` clamped to at least :data:`OUTLIER_SCORE_MIN`,
    finite for any ``s >= 0`` (``s = 0`` would be ``log 0``). Computed in float32.

    Example:
        >>> FCDDLoss()(torch.rand(2, 1, 4, 4), torch.rand(3, 1, 4, 4)).shape
        torch.Size([])
    """

    def forward(self, score_map: torch.Tensor, outlier_score_map: torch.Tensor | None = None) -> torch.Tensor:
        """Args: InD maps F ``(B, 1, *S)`` and outlier maps ``(B_o, 1, *S)`` or ``None``."""
        loss = score_map.float().flatten(1).mean(dim=1).mean()
        if outlier_score_map is not None and outlier_score_map.shape[0] > 0:
            s = outlier_score_map.float().flatten(1).mean(dim=1).clamp_min(OUTLIER_SCORE_MIN)
            loss = loss - torch.log(-torch.expm1(-s)).mean()
        return loss


class FCDDDetector(Detector):
    """FCDD scores of a trained :class:`FCDDNet`: image score ``mean_ij F``, score map F at input size.

    Given ``net``, nothing is fitted (``requires_fit`` is False). Without ``net``, :meth:`fit` trains
    one with :func:`train_fcdd` from ``backbone_factory`` and ``train_kwargs`` (``steps`` is required).
    The network is used in eval mode (its modes are restored afterwards); inputs go to its device, where
    the scores are returned.
    """

    name = "fcdd"

    def __init__(
        self,
        net: FCDDNet | None = None,
        *,
        backbone_factory: Callable[[], nn.Module] | None = None,
        **train_kwargs,
    ) -> None:
        if (net is None) == (backbone_factory is None):
            raise ValueError("pass either a trained net=FCDDNet(...) or backbone_factory=... (to fit)")
        if net is not None and not isinstance(net, FCDDNet):
            raise TypeError(f"net must be an FCDDNet, got {type(net).__name__}")
        if net is None and "steps" not in train_kwargs:
            raise ValueError("fitting an FCDD network needs steps=... (see train_fcdd)")
        self.requires_fit = net is None
        super().__init__()
        self.net = net
        self._backbone_factory = backbone_factory
        self._train_kwargs = train_kwargs

    def _fit(self, train_items, val_items) -> None:
        self.net = train_fcdd(self._backbone_factory, train_items, **self._train_kwargs)

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        with eval_mode(self.net):
            out = self.net.ood(images.to(device=module_device(self.net, images.device), dtype=torch.float32))
        return DetectorOutput(out.image_score, out.score_map_upsampled)


# ---------------------------------------------------------------- training (shared with the autoencoder)


def _batch_indices(num_items: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """``steps`` batches of ``min(batch_size, num_items)`` indices, walking through seeded permutations."""
    rng = np.random.RandomState(seed)
    size = min(batch_size, num_items)
    order = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        while len(order) < size:
            order = np.concatenate([order, rng.permutation(num_items)])
        yield order[:size]
        order = order[size:]


def _augmented_batch(items, indices, augment, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Augment the chosen items one by one (on the CPU) and stack each key into a float32 batch."""
    out: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    for i in indices:
        item = augment({key: torch.as_tensor(np.asarray(items[i][key]), dtype=torch.float32) for key in keys})
        for key in keys:
            out[key].append(convert_to_tensor(item[key], track_meta=False, dtype=torch.float32))
    return {key: torch.stack(values) for key, values in out.items()}


def _check_training_args(train_items, steps: int, batch_size: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if len(train_items) == 0:
        raise ValueError("train_items is empty")


def _optimiser(parameters, lr: float, weight_decay: float, restart_epochs: int):
    """AdamW + CosineAnnealingWarmRestarts (T_0 = ``restart_epochs``, T_mult = 2), as the head's training."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=restart_epochs, T_mult=2)
    return optimizer, scheduler


def train_fcdd(
    network: nn.Module | Callable[[], nn.Module],
    train_items: Sequence[dict],
    steps: int,
    batch_size: int = 8,
    lambda_fcdd: float = 0.1,
    lr: float = 1e-3,
    seed: int = 0,
    outlier_ops: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    *,
    layer: str = "auto",
    weight_decay: float = 1e-4,
    warm_restart_epochs: int = 10,
    rotate_degrees: float = 15.0,
    translate_pixels: float = 10.0,
) -> FCDDNet:
    """Train segmentation and FCDD jointly: ``L = DiceCE(logits, labels) + lambda_fcdd * L_FCDD``.

    A plain seeded loop: each step takes ``batch_size`` items (seeded permutations), augments each with
    one ``RandAffined`` (image and label together), turns each augmented image into an outlier with
    :class:`OutlierSynthesis` (``outlier_ops``, default all six: ``n_b = n_a``) and runs the InD batch
    through the whole network and the outliers through the encoder only. AdamW and
    ``CosineAnnealingWarmRestarts(T_0=warm_restart_epochs, T_mult=2)`` stepped per iteration with the
    fractional epoch, as the prototype head's training.

    Args:
        network: an :class:`FCDDNet` (trained further), a backbone (wrapped on ``layer``), or a callable
            returning a backbone (called after seeding, so the initial weights are seeded too).
        train_items: ``{"image": (C, *spatial), "label": (1, *spatial)}`` items.
        steps: optimisation steps (0 returns the network untrained).
        device: where to train; ``None`` = where the network's parameters are.

    Seeding: ``torch.manual_seed(seed)`` (the global torch RNG: network initialisation, dropout), and
    the batch order, augmentation and outliers from their own generators seeded from ``seed``.
    """
    _check_training_args(train_items, steps, batch_size)
    torch.manual_seed(seed)
    if not isinstance(network, nn.Module):
        network = network()
    net = network if isinstance(network, FCDDNet) else FCDDNet(network, layer=layer)
    if device is not None:
        net.to(device)
    device = next(net.parameters()).device
    spatial_dims = net.spatial_dims

    augment = affine_augmentation(("image", "label"), spatial_dims, rotate_degrees, translate_pixels)
    augment.set_random_state(seed)
    synthesis = OutlierSynthesis(ops=PAPER_OPS if outlier_ops is None else tuple(outlier_ops))
    synthesis.set_random_state(seed + 1)
    seg_loss, fcdd_loss = DiceCELoss(to_onehot_y=True, softmax=True), FCDDLoss()
    optimizer, scheduler = _optimiser(net.parameters(), lr, weight_decay, warm_restart_epochs)
    epoch_length = math.ceil(len(train_items) / batch_size)

    net.train()
    for step, indices in enumerate(_batch_indices(len(train_items), batch_size, steps, seed)):
        batch = _augmented_batch(train_items, indices, augment, ("image", "label"))
        outliers = torch.stack([synthesis(image) for image in batch["image"]])
        images, labels = batch["image"].to(device), batch["label"].to(device)
        out = net.forward_train(images, outliers.to(device))
        loss = seg_loss(out.logits, labels) + lambda_fcdd * fcdd_loss(out.score_map, out.outlier_score_map)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step((step + 1) / epoch_length)
    net.eval()
    return net
