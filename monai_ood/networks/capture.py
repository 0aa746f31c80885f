"""Capture the outputs of several named layers of a network in one forward pass.

The one feature-capture mechanism of the project: the heads (:class:`~monai_ood.networks.PrototypeOODNet`
and every :class:`~monai_ood.networks.prototype_net.HookedEncoderNet`), the detectors' terms
(:mod:`monai_ood.detectors.terms`), the post-hoc detectors and nnU-Net's network read features through
:func:`capture_features`. Forward hooks on the requested modules record their outputs for one call and
are removed after it (no hook stays on a network: copies, pickles and DDP see the plain module); with
``run_to_end=False`` the pass stops as soon as the last requested layer has run (a hook raises), so an
encoder-only pass never runs the decoder, even in networks whose encoder and decoder are nested
(MONAI's ``UNet``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["capture_features", "encode_until", "first_tensor", "named_module"]


def first_tensor(output) -> torch.Tensor:
    """A layer's output tensor: the output itself, or the first tensor of a tuple/list output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"the hooked layer must output a tensor (or a tuple starting with one), got {type(output)}"
    )


def named_module(network: nn.Module, name: str, what: str = "network") -> nn.Module:
    """The module called ``name`` in ``network.named_modules()``; a ValueError listing some names if none."""
    modules = dict(network.named_modules())
    if name not in modules:
        hint = ", ".join(list(modules)[1:12])
        raise ValueError(f"{what} has no module named {name!r}; some of its modules: {hint}, ...")
    return modules[name]


class _AllCaptured(Exception):
    """Raised by the last hook to end an early-stopping pass once every layer has run."""


def capture_features(
    network: nn.Module,
    layers: Sequence[str],
    images: torch.Tensor,
    run_to_end: bool = True,
    modules: Sequence[nn.Module] | None = None,
    whole_output: bool = False,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """One forward pass of ``network`` on ``images``, recording the output of every layer in ``layers``.

    Args:
        network: any module; ``layers`` are dotted names in ``network.named_modules()``.
        layers: the modules whose outputs to keep (a layer called twice keeps its first output).
        images: the input batch, passed as is (move it to the network's device first).
        run_to_end: ``True`` runs the whole network and returns its output; ``False`` stops after the
            last requested layer has run and returns ``None`` as output.
        modules: the modules named by ``layers`` (distinct names, in order), when the caller has already
            looked them up (saves a walk over the network per call).
        whole_output: return the network's output as it is (e.g. nnU-Net's list of deep-supervision
            logits) instead of its first tensor.

    Returns:
        ``(output, {layer: tensor})``: the network's output (its first tensor for a tuple/list output,
        e.g. deep supervision, unless ``whole_output``) or ``None``, and each layer's output (the first
        tensor of a tuple), in the order the layers ran.

    Raises:
        ValueError: for a name that is not a module of ``network``.
        RuntimeError: if a requested layer was not called during the forward pass.
    """
    layers = list(dict.fromkeys(layers))
    if modules is None:
        modules = [named_module(network, name) for name in layers]
    elif len(modules) != len(layers):
        raise ValueError(f"modules must match the {len(layers)} distinct layers, got {len(modules)}")
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, inputs, output) -> None:  # returns None: a returned value would replace output
            if name in captured:
                return
            captured[name] = first_tensor(output)
            if not run_to_end and len(captured) == len(layers):
                raise _AllCaptured

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in zip(layers, modules, strict=True)]
    output = None
    try:
        if layers or run_to_end:
            output = network(images)
    except _AllCaptured:
        output = None
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in captured]
    if missing:
        raise RuntimeError(f"layers {missing} were not called during {type(network).__name__}'s forward pass")
    if (
        not whole_output
        and isinstance(output, (tuple, list))
        and output
        and isinstance(output[0], torch.Tensor)
    ):
        output = output[0]
    return output, captured


def encode_until(network: nn.Module, layer: nn.Module | str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` (a submodule of ``network``, or its dotted name) from a forward pass that
    stops there (the decoder never runs).

    Raises:
        RuntimeError: if ``layer`` was not called by ``network``'s forward pass.
    """
    if isinstance(layer, str):
        return capture_features(network, [layer], x, run_to_end=False)[1][layer]
    return capture_features(network, ["layer"], x, run_to_end=False, modules=[layer])[1]["layer"]
