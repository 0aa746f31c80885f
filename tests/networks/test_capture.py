"""``capture_features``: the outputs of several named layers from one forward pass, checked against
independent forward hooks, with and without stopping after the last requested layer."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from monai_ood.networks.capture import capture_features

# the encoder stages of UNet(channels=(4, 8, 16), strides=(2, 2)), shallow to deep, and its decoder
STAGES = ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule"]
DECODER = ["model.1.submodule.2", "model.2"]


@pytest.fixture
def unet() -> UNet:
    torch.manual_seed(0)
    return UNet(2, 1, 3, channels=(4, 8, 16), strides=(2, 2)).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def reference_outputs(network: nn.Module, names, images: torch.Tensor):
    """The network's output and the first output of each named module, via plain forward hooks."""
    modules = dict(network.named_modules())
    captured = {}
    handles = [
        modules[name].register_forward_hook(lambda m, i, o, name=name: captured.setdefault(name, o))
        for name in names
    ]
    try:
        with torch.no_grad():
            output = network(images)
    finally:
        for handle in handles:
            handle.remove()
    return output, captured


def count_calls(network: nn.Module, names) -> dict[str, int]:
    """Attach counting hooks to ``names``; returns the live counter (remove with ``remove_hooks``)."""
    modules = dict(network.named_modules())
    counts = dict.fromkeys(names, 0)

    def hook(module, inputs, output, name):
        counts[name] += 1

    for name in names:
        modules[name].register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name))
    return counts


def remove_hooks(network: nn.Module) -> None:
    for module in network.modules():
        module._forward_hooks.clear()


def assert_no_hooks(network: nn.Module) -> None:
    leftover = {name: dict(m._forward_hooks) for name, m in network.named_modules() if m._forward_hooks}
    assert not leftover, f"hooks left behind on {sorted(leftover)}"


class TwoPath(nn.Module):
    """``first`` (called twice), then a tuple-returning ``pair``, then ``last``; an ``unused`` module
    that forward never calls; counts how often the code after ``pair`` runs."""

    def __init__(self, list_output: bool = False) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, 2, 1)
        self.pair = _Pair()
        self.last = nn.Conv2d(2, 3, 1)
        self.unused = nn.Conv2d(1, 1, 1)
        self.list_output = list_output
        self.after_pair = 0

    def forward(self, x: torch.Tensor):
        a = self.first(x)
        b = self.first(x * 2.0)  # the same module called a second time, on another input
        y, _ = self.pair(a + b)
        self.after_pair += 1
        out = self.last(y)
        return [out, out * 0.5] if self.list_output else out


class _Pair(nn.Module):
    def forward(self, x: torch.Tensor):
        return x + 1.0, "not a tensor"


# -- outputs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layers",
    [
        STAGES,
        STAGES[::-1],  # request order does not matter
        [STAGES[1]],
        [*STAGES, *DECODER],
        ["model.0.conv", "model.1.submodule.2.conv"],
    ],
)
@pytest.mark.parametrize("run_to_end", [True, False])
def test_outputs_equal_manual_hooks(unet, images, layers, run_to_end):
    expected_output, expected = reference_outputs(unet, layers, images)
    with torch.no_grad():
        output, captured = capture_features(unet, layers, images, run_to_end=run_to_end)
    assert set(captured) == set(layers)
    for name in layers:
        torch.testing.assert_close(captured[name], expected[name], rtol=0, atol=0)
    if run_to_end:
        torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
        torch.testing.assert_close(output, unet(images), rtol=0, atol=0)
    else:
        assert output is None
    assert_no_hooks(unet)


def test_stage_shapes(unet, images):
    _, captured = capture_features(unet, STAGES, images, run_to_end=False)
    assert [tuple(captured[s].shape) for s in STAGES] == [(2, 4, 8, 8), (2, 8, 4, 4), (2, 16, 4, 4)]


def test_duplicate_layer_names_are_captured_once(unet, images):
    output, captured = capture_features(unet, [STAGES[0], STAGES[0], STAGES[2]], images)
    assert list(captured) == [STAGES[0], STAGES[2]]
    _, expected = reference_outputs(unet, [STAGES[0]], images)
    torch.testing.assert_close(captured[STAGES[0]], expected[STAGES[0]], rtol=0, atol=0)
    torch.testing.assert_close(output, unet(images), rtol=0, atol=0)


# -- early stop -----------------------------------------------------------------------------------------
def test_early_stop_does_not_run_the_decoder(unet, images):
    counts = count_calls(unet, [*STAGES, *DECODER])
    try:
        output, captured = capture_features(unet, STAGES, images, run_to_end=False)
        assert output is None and set(captured) == set(STAGES)
        assert counts == {**dict.fromkeys(STAGES, 1), **dict.fromkeys(DECODER, 0)}
        # the same capture running to the end does run the decoder, once
        capture_features(unet, STAGES, images, run_to_end=True)
        assert counts == {**dict.fromkeys(STAGES, 2), **dict.fromkeys(DECODER, 1)}
    finally:
        remove_hooks(unet)


def test_early_stop_after_a_shallow_layer_skips_deeper_ones(unet, images):
    counts = count_calls(unet, STAGES)
    try:
        capture_features(unet, [STAGES[0]], images, run_to_end=False)
        assert counts == {STAGES[0]: 1, STAGES[1]: 0, STAGES[2]: 0}
    finally:
        remove_hooks(unet)


def test_early_stop_in_a_custom_module():
    net = TwoPath()
    x = torch.rand(1, 1, 4, 4)
    _, captured = capture_features(net, ["pair"], x, run_to_end=False)
    assert net.after_pair == 0  # forward stopped inside the hook of ``pair``
    torch.testing.assert_close(captured["pair"], net.first(x) + net.first(x * 2.0) + 1.0)
    capture_features(net, ["pair"], x, run_to_end=True)
    assert net.after_pair == 1
    assert_no_hooks(net)


def test_no_layers():
    net = TwoPath()
    x = torch.rand(1, 1, 4, 4)
    output, captured = capture_features(net, [], x, run_to_end=False)
    assert output is None and captured == {} and net.after_pair == 0  # the network is not run
    output, captured = capture_features(net, [], x, run_to_end=True)
    assert captured == {} and net.after_pair == 1
    torch.testing.assert_close(output, net.last(net.first(x) + net.first(x * 2.0) + 1.0))


# -- first outputs and tuples ------------------------------------------------------------------------------
def test_layer_called_twice_keeps_first_output():
    net = TwoPath()
    x = torch.rand(1, 1, 4, 4)
    for run_to_end in (True, False):
        _, captured = capture_features(net, ["first"], x, run_to_end=run_to_end)
        torch.testing.assert_close(captured["first"], net.first(x), rtol=0, atol=0)


def test_tuple_layer_output_and_list_network_output():
    net = TwoPath(list_output=True)
    x = torch.rand(2, 1, 4, 4)
    output, captured = capture_features(net, ["pair", "last"], x)
    y = net.first(x) + net.first(x * 2.0) + 1.0
    torch.testing.assert_close(captured["pair"], y)
    torch.testing.assert_close(output, net.last(y))  # the first tensor of the list output
    assert isinstance(output, torch.Tensor)


# -- errors ---------------------------------------------------------------------------------------------
def test_unknown_layer_raises(unet, images):
    with pytest.raises(ValueError, match="model.9"):
        capture_features(unet, [STAGES[0], "model.9"], images)
    assert_no_hooks(unet)


@pytest.mark.parametrize("run_to_end", [True, False])
def test_layer_never_called_raises(run_to_end):
    net = TwoPath()
    with pytest.raises(RuntimeError, match="unused"):
        capture_features(net, ["first", "unused"], torch.rand(1, 1, 4, 4), run_to_end=run_to_end)
    assert net.after_pair == 1  # the pass ran to the end looking for ``unused``
    assert_no_hooks(net)


def test_hooks_removed_when_forward_fails(unet):
    with pytest.raises(RuntimeError):
        capture_features(unet, STAGES, torch.rand(1, 2, 16, 16))  # wrong channel count
    assert_no_hooks(unet)
