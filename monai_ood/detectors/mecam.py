"""MECAM-style OOD scores for segmentation: multi-exit class activation maps and feature masking.

MECAM (2025, "Unsupervised OOD detection in medical imaging using multi-exit class activation maps and
feature masking") observes that the CAMs of in-distribution images focus on the regions the model's
prediction depends on, while OOD images lack such focused activations; masking the input with the
*inverted* CAM therefore changes the features of InD images **more** than those of OOD images. It
combines CAMs from several exits (depths, resolutions) of a multi-exit classifier.

Adaptation to a trained segmentation network, without retraining and without multi-exit heads:

* **Exits** = the decoder's up-sampling blocks, one per resolution level (for MONAI's ``UNet`` the
  ``up`` block of every level, the last of which outputs the logits). They are found generically by
  one probe forward pass: the outermost modules whose output has more pixels than their input
  (:func:`find_decoder_exits`), ordered deepest first; or pass their names.
* **CAM of an exit** = Grad-CAM of the *predicted foreground logit sum*
  ``S = sum_p max_{k>=1} z_k(p) * [argmax_k z_k(p) >= 1]`` (for a one-channel sigmoid network:
  ``z_0(p) * [z_0(p) > 0]``); an image with no predicted foreground pixel uses every pixel.
  ``CAM = ReLU(sum_c mean_p(dS/dA_c) A_c)``. Grad-CAM rather than the channel mean of activations
  because it is class-aware (it weights the channels by what the foreground prediction uses, like the
  exit classifier weights of MECAM), for the cost of one backward pass through the decoder per batch.
* **Combined CAM** = the mean of the per-exit CAMs, each upsampled (bi/trilinear) to the input and
  min-max normalised per image (an exit whose CAM is constant contributes zeros): values in [0, 1].
* **Masking**: ``x * (1 - CAM)`` keeps what the network does not attend to (``mask_threshold`` = t
  gives the hard mask ``x * [CAM < t]`` instead). Zero is the background of the [0, 1] images.
* **Feature change** between the features of ``x`` and of the masked ``x`` at the encoder layer (the
  bottleneck the prototype head and FCDD use): ``1 - cos`` of the flattened feature maps per image,
  and per feature pixel ``1 - cos`` over channels for the map, upsampled to the input. Computed as
  ``||a/|a| - b/|b|||^2 / 2`` (equal to ``1 - cos``, exactly 0 when nothing changed).
* **Score** (higher = more OOD): by MECAM's hypothesis OOD features change *less*, so the score is
  ``-change`` (``ood_if="smaller_change"``, the default); ``ood_if="larger_change"`` gives ``+change``.
  Both are 0 when masking changes nothing; one is the AUROC-mirror of the other, so a benchmark can
  check the hypothesis on its data by comparing them.

Needs no fitting: CAMs come from the trained network's gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.utils import look_up_option
from torch import nn

from ..networks.capture import capture_features, encode_until
from ..networks.prototype_net import PrototypeOODNet
from .base import Detector, DetectorOutput, eval_mode, module_device, to_input_size
from .fcdd import FCDDNet

__all__ = ["MECAMDetector", "find_decoder_exits"]

OOD_IF = ("smaller_change", "larger_change")


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def find_decoder_exits(network: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the decoder's up-sampling blocks, deepest first, from one probe pass on ``example``.

    An up-sampling block is a module whose (first) output tensor has more pixels than its (first)
    input tensor; nested ones are dropped in favour of the outermost (e.g. a ``ConvTranspose`` inside
    MONAI's ``up`` block). Order = the order in which they finished in the forward pass.

    Raises:
        ValueError: if the network has no such module.
    """
    found: dict[str, int] = {}
    handles = []

    def record(name: str):
        def hook(module, inputs, output) -> None:
            x, y = _first_tensor(inputs), _first_tensor(output)
            if x is None or y is None or x.dim() != example.dim() or y.dim() != example.dim():
                return
            if name not in found and math.prod(y.shape[2:]) > math.prod(x.shape[2:]):
                found[name] = len(found)

        return hook

    for name, module in network.named_modules():
        if name:
            handles.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad(), eval_mode(network):
            network(example)
    finally:
        for handle in handles:
            handle.remove()
    exits = [n for n in found if not any(n.startswith(f"{other}.") for other in found)]
    if not exits:
        raise ValueError(
            f"found no up-sampling module in {type(network).__name__}: pass exits=[<module names>] explicitly"
        )
    return sorted(exits, key=found.__getitem__)


class MECAMDetector(Detector):
    """Multi-exit Grad-CAM feature masking on a trained segmentation network (see the module docstring).

    Args:
        network: the trained segmentation network (logits out); a :class:`PrototypeOODNet` or
            :class:`FCDDNet` is unwrapped to its backbone and hooked layer.
        exits: ``"auto"`` (:func:`find_decoder_exits` on the first batch) or module names.
        encoder_layer: ``"auto"`` (the wrapper's layer, or :func:`monai_ood.networks.feature_layer_for`)
            or a module name.
        mask_threshold: ``None`` for the soft mask ``1 - CAM``; a value in (0, 1] for ``[CAM < t]``.
        ood_if: ``"smaller_change"`` (MECAM: score ``-change``) or ``"larger_change"`` (``+change``).

    The network runs in eval mode (every module's mode is restored afterwards) on its own device, where
    the scores are returned.
    """

    requires_fit = False
    name = "mecam"

    def __init__(
        self,
        network: nn.Module,
        exits: str | Sequence[str] = "auto",
        encoder_layer: str = "auto",
        mask_threshold: float | None = None,
        ood_if: str = "smaller_change",
    ) -> None:
        super().__init__()
        wrapped_layer = None
        if isinstance(network, (PrototypeOODNet, FCDDNet)):
            network, wrapped_layer = network.backbone, network.layer
        self.network = network
        modules = dict(network.named_modules())
        if encoder_layer == "auto":
            from ..networks.presets import feature_layer_for

            encoder_layer = wrapped_layer or feature_layer_for(network)
        if encoder_layer not in modules:
            raise ValueError(f"network has no module named {encoder_layer!r} (encoder_layer)")
        self.encoder_layer = encoder_layer
        if isinstance(exits, str):
            if exits != "auto":
                raise ValueError(f"exits must be 'auto' or a list of module names, got {exits!r}")
            self.exits: list[str] | None = None
        else:
            missing = [name for name in exits if name not in modules]
            if not exits or missing:
                raise ValueError(f"exits must be names of network modules; unknown: {missing or exits!r}")
            self.exits = list(exits)
        if mask_threshold is not None and not 0.0 < mask_threshold <= 1.0:
            raise ValueError(f"mask_threshold must be None or in (0, 1], got {mask_threshold!r}")
        self.mask_threshold = mask_threshold
        self.ood_if = look_up_option(ood_if, OOD_IF)

    @property
    def device(self) -> torch.device:
        return module_device(self.network, torch.device("cpu"))

    def _resolve_exits(self, images: torch.Tensor) -> list[str]:
        if self.exits is None:
            self.exits = find_decoder_exits(self.network, images[:1])
        return self.exits

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() < 3:
            raise ValueError(
                f"images must be a tensor (B, C, *spatial), got {getattr(images, 'shape', images)}"
            )
        return images.to(device=self.device, dtype=torch.float32)

    def exit_cams(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Grad-CAM of every exit, upsampled to the input and min-max normalised: ``(B, 1, *spatial)`` each."""
        x = self._to_device(images)
        exits = self._resolve_exits(x)
        with torch.enable_grad(), eval_mode(self.network):
            logits, activations = capture_features(self.network, exits, x.detach().requires_grad_(True))
            target = _foreground_logit_sum(logits)
            tensors = [activations[name] for name in exits]
            grads = torch.autograd.grad(target, tensors, allow_unused=True)
        cams = []
        for activation, grad in zip(tensors, grads, strict=True):
            activation = activation.detach()
            if grad is None:  # the exit does not reach the output
                cams.append(torch.zeros_like(x[:, :1]))
                continue
            weights = grad.flatten(2).mean(dim=2)  # (B, C): Grad-CAM channel weights
            cam = F.relu(torch.einsum("bc,bc...->b...", weights, activation)).unsqueeze(1)
            cams.append(_min_max(to_input_size(cam, x.shape[2:])))
        return cams

    def combined_cam(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the normalised exit CAMs, in [0, 1]: ``(B, 1, *spatial)``."""
        return torch.stack(self.exit_cams(images)).mean(dim=0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Features of the encoder layer (the forward pass stops there)."""
        x = self._to_device(images)
        with torch.no_grad(), eval_mode(self.network):
            return encode_until(self.network, self.encoder_layer, x)

    def mask(self, images: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
        """``images * (1 - cam)``, or ``images * [cam < mask_threshold]``."""
        keep = (cam < self.mask_threshold).to(images.dtype) if self.mask_threshold is not None else 1.0 - cam
        return images * keep

    def feature_change(
        self, images: torch.Tensor, cam: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(change (B,), change map (B, 1, *spatial))``: ``1 - cos`` between encoder features of the
        images and of the images masked with ``cam`` (default: :meth:`combined_cam`)."""
        x = self._to_device(images)
        cam = self.combined_cam(x) if cam is None else cam.to(device=x.device, dtype=x.dtype)
        clean, masked = self.encode(x), self.encode(self.mask(x, cam))
        image_change = _half_squared_distance(clean.flatten(1), masked.flatten(1), dim=1)
        pixel_change = _half_squared_distance(clean, masked, dim=1).unsqueeze(1)
        return image_change, to_input_size(pixel_change, x.shape[2:])

    def _predict(self, images: torch.Tensor) -> DetectorOutput:
        change, change_map = self.feature_change(images)
        sign = -1.0 if self.ood_if == "smaller_change" else 1.0
        return DetectorOutput(sign * change, sign * change_map)


def _foreground_logit_sum(logits: torch.Tensor) -> torch.Tensor:
    """Sum over predicted foreground pixels of the predicted class's logit (all pixels if none)."""
    if logits.shape[1] == 1:
        foreground = logits[:, 0]
        predicted = foreground > 0
    else:
        foreground = logits[:, 1:].max(dim=1).values
        predicted = logits.argmax(dim=1) > 0
    empty = predicted.flatten(1).sum(dim=1) == 0
    predicted = predicted | empty.view(-1, *([1] * (predicted.dim() - 1)))
    return (foreground * predicted).sum()


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation to [0, 1]; constant maps become 0."""
    flat = maps.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    span = high - low
    shape = (-1, *([1] * (maps.dim() - 1)))
    normalised = (maps - low.view(shape)) / span.clamp_min(1e-12).view(shape)
    return torch.where(span.view(shape) > 1e-12, normalised, torch.zeros_like(maps)).clamp(0.0, 1.0)


def _half_squared_distance(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """``||a/|a| - b/|b|||^2 / 2`` along ``dim`` (= ``1 - cos``; 0 for identical inputs, also zero ones)."""
    a, b = a.float(), b.float()
    return 0.5 * (F.normalize(a, dim=dim) - F.normalize(b, dim=dim)).square().sum(dim=dim)
