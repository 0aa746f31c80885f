"""Score maps ``A(x)`` of whole preprocessed nnU-Net cases, tile by tile as nnU-Net predicts them.

nnU-Net predicts a case with overlapping patches (``tile_step_size`` 0.5 by default) blended by a
Gaussian. The OOD head sees one patch at a time too: :func:`predict_score_map` runs the encoder-only
OOD pass (:meth:`~monai_ood.networks.PrototypeOODNet.ood`) on the same tiles, upsamples each tile's
feature-grid ``A`` to the patch and blends the tiles with nnU-Net's Gaussian, accumulating in float32
(nnU-Net's own logits buffer is float16, which distances of OOD inputs can overflow).
:func:`feature_score_values` yields the feature-grid values the Weibull calibration is fitted to (the
maps before upsampling, as :func:`monai_ood.engines.calibrate` does), leaving out feature cells that lie
mostly in the padding added to cases smaller than a patch.

Mirroring test-time augmentation is not applied to score maps: the calibration is fitted to single
passes, and the maps describe the input as given.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

from ...networks.prototype_net import PrototypeOODNet

__all__ = ["feature_score_values", "predict_score_map"]

# a feature cell counts for calibration when at least this fraction of it covers the image, not padding
_MIN_REAL_FRACTION = 0.5


def _as_tensor(data) -> torch.Tensor:
    """A float32 tensor of a tensor, numpy array or blosc2 array (``[:]`` reads the latter)."""
    if isinstance(data, torch.Tensor):
        return data.float()
    return torch.from_numpy(np.ascontiguousarray(data[:])).float()


def _tiles(
    data: torch.Tensor, patch_size: Sequence[int], tile_step_size: float
) -> tuple[
    tuple[int, ...], tuple[slice, ...], Iterator[tuple[torch.Tensor, torch.Tensor, tuple[slice, ...]]]
]:
    """Tile ``data`` as nnU-Net's predictor does (padded with 0 to at least one patch).

    Returns:
        The padded spatial shape, the slices that crop the padding off again, and an iterator of
        ``(tile (C, *patch), real-voxel mask (*patch), spatial slices of the tile)``.
    """
    padded, revert = pad_nd_image(data, tuple(patch_size), "constant", {"value": 0}, True, None)
    crop = tuple(revert[1:])
    steps = compute_steps_for_sliding_window(tuple(padded.shape[1:]), tuple(patch_size), tile_step_size)

    def tiles():
        real = torch.zeros(padded.shape[1:], dtype=torch.float32)
        real[crop] = 1.0
        for start in itertools.product(*steps):
            region = tuple(slice(s, s + p) for s, p in zip(start, patch_size, strict=True))
            yield padded[(slice(None), *region)], real[region], region

    return tuple(padded.shape[1:]), crop, tiles()


def _spatial_is_sliced(data: torch.Tensor, patch_size: Sequence[int]) -> bool:
    """nnU-Net's 2D configurations run on 3D cases slice by slice along the first axis."""
    spatial = data.dim() - 1
    if len(patch_size) == spatial:
        return False
    if len(patch_size) == spatial - 1:
        return True
    raise ValueError(f"patch size {tuple(patch_size)} does not fit data of shape {tuple(data.shape)}")


@torch.inference_mode()
def predict_score_map(
    net: PrototypeOODNet,
    data,
    patch_size: Sequence[int],
    tile_step_size: float = 0.5,
    device: torch.device | str = "cpu",
    use_gaussian: bool = True,
) -> torch.Tensor:
    """The blended score map ``A(x)`` of one preprocessed case, on the preprocessed grid.

    Args:
        net: the prototype network (in eval mode is set here).
        data: ``(C, *spatial)`` preprocessed case (tensor, array or blosc2 array).
        patch_size: nnU-Net's patch size of the configuration (2D patches on 3D data: slice by slice).
        tile_step_size: overlap of the tiles as nnU-Net's predictor uses it.
        device: where the network runs.
        use_gaussian: blend tiles with nnU-Net's Gaussian (otherwise a plain average).

    Returns:
        A float32 CPU tensor of shape ``spatial``.
    """
    net.eval()
    data = _as_tensor(data)
    if _spatial_is_sliced(data, patch_size):
        return torch.stack(
            [
                predict_score_map(net, data[:, d], patch_size, tile_step_size, device, use_gaussian)
                for d in range(data.shape[1])
            ]
        )
    gaussian = (
        compute_gaussian(
            tuple(patch_size), sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=torch.float32, device="cpu"
        )
        if use_gaussian
        else torch.ones(tuple(patch_size))
    )
    padded_shape, crop, tiles = _tiles(data, patch_size, tile_step_size)
    total = torch.zeros(padded_shape, dtype=torch.float32)
    weight = torch.zeros(padded_shape, dtype=torch.float32)
    for tile, _, region in tiles:
        ood = net.ood(tile[None].to(device))
        total[region] += ood.score_map_upsampled[0, 0].float().cpu() * gaussian
        weight[region] += gaussian
    return (total / weight)[crop].contiguous()


@torch.inference_mode()
def feature_score_values(
    net: PrototypeOODNet,
    data,
    patch_size: Sequence[int],
    tile_step_size: float = 0.5,
    device: torch.device | str = "cpu",
) -> Iterator[torch.Tensor]:
    """The feature-grid values of ``A(x)`` of every tile of one preprocessed case (for the Weibull fit).

    Yields:
        1D float32 CPU tensors, one per tile, without the cells that lie mostly in padding.
    """
    net.eval()
    data = _as_tensor(data)
    if _spatial_is_sliced(data, patch_size):
        for d in range(data.shape[1]):
            yield from feature_score_values(net, data[:, d], patch_size, tile_step_size, device)
        return
    _, _, tiles = _tiles(data, patch_size, tile_step_size)
    for tile, real, _ in tiles:
        score_map = net.ood(tile[None].to(device)).score_map[0, 0].float().cpu()
        fraction = F.interpolate(real[None, None], size=score_map.shape, mode="area")[0, 0]
        values = score_map[fraction >= _MIN_REAL_FRACTION]
        if values.numel():
            yield values
