"""``nnUNetv2_train ... -pretrained_weights FILE`` for the wrapped network.

nnU-Net's loader (``nnunetv2.run.load_pretrained_weights``) requires every key of the network being
trained, except the segmentation layers (``.seg_layers.``), in the file with the same shape. The wrapped
network's keys are ``backbone.*`` (nnU-Net's U-Net) plus the head's (``head.*``, ``prototypes.*``), so
a checkpoint of nnU-Net's own trainer fails that check. :func:`load_pretrained_weights` maps the file's
keys instead:

* a **plain nnU-Net checkpoint** (keys ``encoder.*``, ``decoder.*``): each key ``k`` goes to
  ``backbone.k``; the head and the prototypes are left initialised (there are none in the file);
* a **checkpoint of a prototype OOD trainer** (keys ``backbone.*``, ``head.*``, ``prototypes.*``): keys
  as they are; the head and the prototypes are each loaded whole where all their tensors fit (another
  ``c_g`` or another number of classes leaves them initialised).

In both cases the segmentation layers stay initialised (as nnU-Net's loader leaves them), every other
backbone key must be in the file with its shape (nnU-Net's rule, as a ``ValueError`` naming the key),
and one line says what was loaded and what was left initialised.

The trainer routes nnU-Net's loader here for its own network (:func:`route_nnunet_loader`, installed by
:meth:`~monai_ood.integrations.nnunet.PrototypeOODTrainerMixin.initialize`); any other network still
goes to nnU-Net's loader unchanged.
"""

from __future__ import annotations

import os
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from .network import nnUNetPrototypeOODNet

__all__ = ["PretrainedWeights", "load_pretrained_weights", "read_network_weights", "route_nnunet_loader"]

BACKBONE_PREFIX = "backbone."
#: nnU-Net's loader never transfers the segmentation layers (the classes may differ)
SKIPPED_KEYS = ".seg_layers."


@dataclass(frozen=True)
class PretrainedWeights:
    """What :func:`load_pretrained_weights` did.

    Attributes:
        source: the file (or ``"state dict"``).
        kind: ``"plain nnU-Net"`` or ``"prototype OOD"`` (the file's key layout).
        loaded: tensors loaded per part (``{"backbone": n, "head": m, ...}``).
        initialised: tensors left initialised per part (``{"backbone.decoder.seg_layers": s, "head": h, ...}``).
    """

    source: str
    kind: str
    loaded: dict[str, int] = field(default_factory=dict)
    initialised: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        """One line for the console and the training log."""

        def parts(counts: Mapping[str, int]) -> str:
            return ", ".join(f"{name} ({n})" for name, n in counts.items()) or "nothing"

        return (
            f"pretrained weights from {self.source} ({self.kind} checkpoint): loaded {parts(self.loaded)}; "
            f"left initialised {parts(self.initialised)}"
        )


def read_network_weights(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The network weights of an nnU-Net checkpoint file (``network_weights``), of a loaded checkpoint,
    or a bare state dict as it is."""
    if isinstance(source, (str, os.PathLike)):
        # nnU-Net's checkpoints hold more than tensors (its loader reads them the same way)
        source = torch.load(source, map_location=torch.device("cpu"), weights_only=False)
    if not isinstance(source, Mapping):
        raise ValueError(f"expected an nnU-Net checkpoint or a state dict, got {type(source).__name__}")
    weights = source.get("network_weights", source)
    if not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError("the checkpoint's network_weights are not a state dict of tensors")
    return dict(weights)


def _part(key: str) -> str:
    """The part a key of the wrapped network belongs to, as the summary names it."""
    if SKIPPED_KEYS in key:
        return key[: key.index(SKIPPED_KEYS) + len(SKIPPED_KEYS) - 1]
    if key.startswith(BACKBONE_PREFIX):
        return "backbone"
    return key.split(".", 1)[0]


def load_pretrained_weights(
    network: nnUNetPrototypeOODNet,
    source: str | os.PathLike | Mapping[str, Any],
) -> PretrainedWeights:
    """Load an nnU-Net checkpoint, plain or of a prototype OOD trainer, into the wrapped network.

    Args:
        network: the wrapped network (unwrapped from DDP / ``torch.compile``).
        source: a checkpoint file as ``nnUNetTrainer.save_checkpoint`` writes it (``network_weights``),
            a loaded checkpoint, or a state dict.

    Returns:
        :class:`PretrainedWeights` (:meth:`~PretrainedWeights.line` is the one-line summary).

    Raises:
        ValueError: a backbone key (other than the segmentation layers) missing from the file or of
            another shape: the file is of another network (e.g. other plans).

    Example::

        net = nnUNetTrainerPrototypeOOD.build_network_architecture(plans_manager, configuration, 1, 3)
        summary = load_pretrained_weights(net, "nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth")
        print(summary.line())  # pretrained weights from ... (plain nnU-Net checkpoint): loaded backbone (52); ...
    """
    name = str(source) if isinstance(source, (str, os.PathLike)) else "state dict"
    pretrained = read_network_weights(source)
    wrapped = any(key.startswith(BACKBONE_PREFIX) for key in pretrained)
    kind = "prototype OOD" if wrapped else "plain nnU-Net"
    own = network.state_dict()
    updates: dict[str, torch.Tensor] = {}
    loaded: Counter[str] = Counter()
    initialised: Counter[str] = Counter()
    parts: dict[str, dict[str, torch.Tensor | None]] = {}  # the head's parts: loaded whole or not at all
    for key, value in own.items():
        part = _part(key)
        backbone = key.startswith(BACKBONE_PREFIX)
        source_key = key if wrapped else (key[len(BACKBONE_PREFIX) :] if backbone else None)
        if SKIPPED_KEYS in key or source_key is None:
            initialised[part] += 1
            continue
        found = pretrained.get(source_key)
        fits = found is not None and tuple(found.shape) == tuple(value.shape)
        if backbone:
            if not fits:
                what = (
                    "is missing"
                    if found is None
                    else f"has shape {tuple(found.shape)}, not {tuple(value.shape)}"
                )
                raise ValueError(
                    f"{name}: {source_key!r} {what}: the pretrained weights are not of this network (train "
                    "them with the same plans and configuration, or give a checkpoint of this network)"
                )
            updates[key] = found
            loaded[part] += 1
        else:
            parts.setdefault(part, {})[key] = found if fits else None
    for part, tensors in parts.items():
        if all(t is not None for t in tensors.values()):
            updates.update(tensors)
            loaded[part] += len(tensors)
        else:  # another c_g or another number of classes
            initialised[part] += len(tensors)
    network.load_state_dict({**own, **updates})
    return PretrainedWeights(name, kind, dict(loaded), dict(initialised))


# trainers whose network may come through nnU-Net's loader, to log the summary in their training log
_TRAINERS: weakref.WeakSet = weakref.WeakSet()


def _unwrap(network: nn.Module) -> nn.Module:
    network = network.module if isinstance(network, DistributedDataParallel) else network
    return network._orig_mod if isinstance(network, OptimizedModule) else network


def route_nnunet_loader(trainer=None) -> None:
    """Send ``nnUNetv2_train -pretrained_weights`` of a wrapped network to :func:`load_pretrained_weights`.

    Replaces the ``load_pretrained_weights`` that ``nnunetv2.run.run_training`` calls with one that takes
    :class:`~monai_ood.integrations.nnunet.nnUNetPrototypeOODNet` here and passes every other network to
    nnU-Net's own loader. Installed once per process; the trainer calls it from ``initialize`` (which
    nnU-Net runs before it loads the pretrained weights).

    Args:
        trainer: a trainer whose training log gets the summary line (``print_to_log_file``).
    """
    from nnunetv2.run import run_training

    if trainer is not None:
        _TRAINERS.add(trainer)
    current = run_training.load_pretrained_weights
    if getattr(current, "routes_prototype_ood", False):
        return
    nnunet_loader: Callable = current

    def routed(network, fname, verbose=False):
        ours = _unwrap(network)
        if not isinstance(ours, nnUNetPrototypeOODNet):
            return nnunet_loader(network, fname, verbose=verbose)
        summary = load_pretrained_weights(ours, fname)
        log = next(
            (t.print_to_log_file for t in _TRAINERS if _unwrap(getattr(t, "network", None)) is ours), print
        )
        log(summary.line())
        return summary

    routed.routes_prototype_ood = True
    routed.__wrapped__ = nnunet_loader
    run_training.load_pretrained_weights = routed
