"""The default detector on whole preprocessed nnU-Net cases, tile by tile as nnU-Net predicts them.

nnU-Net predicts a case with overlapping patches (``tile_step_size`` 0.5 by default) blended by a
Gaussian. The detector (:class:`~monai_ood.detectors.FusedDetector`) sees one patch at a time too:
:func:`score_case` runs :meth:`~monai_ood.detectors.FusedDetector.segment_and_score` on the same tiles,
blends the tiles' fused maps (at the patch size) with nnU-Net's Gaussian, accumulating in float32
(nnU-Net's own logits buffer is float16), and keeps every tile's fused image score; the case's image
score is their mean (as ``monai-ood score`` averages the windows of a 3D volume). :func:`map_values`
yields the values of the tiles' maps on the detector's own map grid that the Weibull calibration is
fitted to (as :func:`monai_ood.engines.calibrate` does), leaving out map cells that lie mostly in the
padding added to cases smaller than a patch.

Mirroring test-time augmentation is not applied to the detector: the calibration is fitted to single
passes, and the maps describe the input as given.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

__all__ = ["CaseScores", "map_values", "score_case"]

# a map cell counts for calibration when at least this fraction of it covers the image, not padding
_MIN_REAL_FRACTION = 0.5


@dataclass
class CaseScores:
    """The detector's scores of one case.

    Attributes:
        score_map: the blended fused map on the preprocessed grid, ``(*spatial)`` float32 (CPU).
        tile_scores: the fused image score of every tile, ``(T,)`` float64 (CPU).
    """

    score_map: torch.Tensor
    tile_scores: torch.Tensor

    @property
    def image_score(self) -> float:
        """The case's image score: the mean of its tiles' fused image scores."""
        return float(self.tile_scores.mean())


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


def score_case(
    detector,
    data,
    patch_size: Sequence[int],
    tile_step_size: float = 0.5,
    use_gaussian: bool = True,
) -> CaseScores:
    """The detector's blended map and tile scores of one preprocessed case, on the preprocessed grid.

    Args:
        detector: a fitted :class:`~monai_ood.detectors.FusedDetector` with a map term, on the network
            (it runs where the network is).
        data: ``(C, *spatial)`` preprocessed case (tensor, array or blosc2 array).
        patch_size: nnU-Net's patch size of the configuration (2D patches on 3D data: slice by slice).
        tile_step_size: overlap of the tiles as nnU-Net's predictor uses it.
        use_gaussian: blend tiles with nnU-Net's Gaussian (otherwise a plain average).

    Returns:
        :class:`CaseScores`: the map ``(*spatial)`` and the tiles' image scores.

    Raises:
        ValueError: if the detector has no map term.
    """
    data = _as_tensor(data)
    if _spatial_is_sliced(data, patch_size):
        parts = [
            score_case(detector, data[:, d], patch_size, tile_step_size, use_gaussian)
            for d in range(data.shape[1])
        ]
        return CaseScores(
            torch.stack([p.score_map for p in parts]), torch.cat([p.tile_scores for p in parts])
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
    scores = []
    for tile, _, region in tiles:
        _, out, _ = detector.segment_and_score(tile[None])
        if out.score_map is None:
            raise ValueError("the detector has no map term: there is no score map to write")
        total[region] += out.score_map[0, 0].float().cpu() * gaussian
        weight[region] += gaussian
        scores.append(out.image_score.double().cpu().reshape(-1))
    return CaseScores((total / weight)[crop].contiguous(), torch.cat(scores))


def map_values(
    detector, data, patch_size: Sequence[int], tile_step_size: float = 0.5
) -> Iterator[torch.Tensor]:
    """The values of the detector's map of every tile of one preprocessed case, on the map's own grid
    (for the Weibull fit).

    Yields:
        1D float32 CPU tensors, one per tile, without the cells that lie mostly in padding.
    """
    data = _as_tensor(data)
    if _spatial_is_sliced(data, patch_size):
        for d in range(data.shape[1]):
            yield from map_values(detector, data[:, d], patch_size, tile_step_size)
        return
    _, _, tiles = _tiles(data, patch_size, tile_step_size)
    for tile, real, _ in tiles:
        low = detector.segment_and_score(tile[None])[2]
        if low is None:
            raise ValueError("the detector has no map term: there is no map to calibrate")
        low = low[0, 0].float().cpu()
        fraction = F.interpolate(real[None, None], size=low.shape, mode="area")[0, 0]
        values = low[fraction >= _MIN_REAL_FRACTION]
        if values.numel():
            yield values
