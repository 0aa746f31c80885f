"""Synthetic auxiliary outliers: the transformation T of Cho, Park and Choo (2023).

The paper trains its OoD score with outlier exposure, using transformed training images as the
auxiliary outliers: "We randomly employed one of the following operations: 180° rotation, vertical
flip, permutation, and random operations of {Swap, Gamma, Deformation} in TorchIO" (Sec. 3.2 and
Sec. 4.1, "Training details"). :class:`OutlierSynthesis` is that T as a MONAI array transform and
:class:`OutlierSynthesisd` its dictionary wrapper.

Reference:
    J. Cho, I. Park, J. Choo. "Training Auxiliary Prototypical Classifiers for Explainable Anomaly
    Detection in Medical Image Segmentation." WACV 2023.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
import torchio as tio
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor, look_up_option
from monai.utils.enums import StrEnum

__all__ = [
    "LOCAL_OPS",
    "PAPER_OPS",
    "OutlierOp",
    "OutlierSynthesis",
    "OutlierSynthesisd",
]

# Seeds handed to torch / numpy generators are drawn from ``self.R`` in this range.
_MAX_SEED = 2**31 - 1


class OutlierOp(StrEnum):
    """Names of the operations :class:`OutlierSynthesis` can pick from."""

    ROTATE180 = "rotate180"
    VFLIP = "vflip"
    PATCH_PERMUTE = "patch_permute"
    SWAP = "swap"
    GAMMA = "gamma"
    ELASTIC = "elastic"
    # local corruptions inside a random box (beyond the paper): the rest of the image stays InD, so the
    # score map has to localise them
    LOCAL_SHUFFLE = "local_shuffle"
    CUTPASTE = "cutpaste"
    LOCAL_NOISE = "local_noise"
    LOCAL_BLUR = "local_blur"
    BLOB = "blob"


#: the paper's six operations (Sec. 3.2 / 4.1), the default
PAPER_OPS: tuple[str, ...] = ("rotate180", "vflip", "patch_permute", "swap", "gamma", "elastic")
#: the local corruptions
LOCAL_OPS: tuple[str, ...] = ("local_shuffle", "cutpaste", "local_noise", "local_blur", "blob")


class OutlierSynthesis(RandomizableTransform):
    """Turn a training image into an auxiliary outlier with one randomly chosen operation.

    This is the outlier generator T of Cho, Park, Choo (2023), Sec. 3.2 / 4.1. Each call samples
    ONE operation from ``ops`` (with probabilities ``op_weights``) and applies it:

    * ``"rotate180"``: 180° rotation in the plane of spatial axes ``rotation_axes`` (equivalent to
      flipping both axes; applying it twice is the identity).
    * ``"vflip"``: flip of spatial axis ``flip_axis`` (default 0, the first spatial axis H). This is
      the anatomical up-down flip when images are laid out with up-down along H, e.g. axial slices
      stored with anterior at the top (row 0). Note that MONAI's ``LoadImage`` keeps the file's voxel
      order (x, y, z), so after ``Orientation(axcodes="RAS")`` axis 0 is left-right and the
      anterior-posterior axis is 1: pass ``flip_axis=1`` there.
    * ``"patch_permute"``: jigsaw. The image is cut into ``permute_grid`` patches per spatial axis
      and the patches are shuffled (never the identity permutation). An integer grid applies to
      every spatial axis (a 3D volume becomes g x g x g cubes); pass e.g. ``(4, 4, 1)`` to shuffle
      only in-plane. If a size is not divisible by its grid, only the centred divisible core is cut
      and shuffled; the few border rows outside it are left as they are. The grid along an axis is
      clipped to the axis size.
    * ``"swap"``: ``torchio.RandomSwap`` with ``swap_patch_size`` and ``swap_num_iterations``.
      The patch size is clipped to half the image size along each axis, because TorchIO's patch
      sampler never terminates when a patch (almost) fills the image.
    * ``"gamma"``: TorchIO gamma, ``x -> x ** gamma`` with ``|log gamma|`` drawn uniformly from
      ``gamma_log_range`` and a random sign, so gamma is never close to 1 (defaults: gamma in
      [0.45, 0.74] or [1.35, 2.23]). Gamma assumes intensities normalised to [0, 1] as in the paper;
      negative inputs are shifted to minimum 0, transformed and shifted back (no NaN). One gamma is
      used for all channels.
    * ``"elastic"``: ``torchio.RandomElasticDeformation`` with ``elastic_num_control_points`` and
      ``elastic_max_displacement`` (in voxels, along each spatial axis), TorchIO's default
      ``locked_borders=2`` and linear interpolation.

    Local operations (not in the paper) change only a random box whose side along each axis is a
    fraction in ``box_fraction`` of the image (uniform), so the outlier is mostly InD tissue and the
    score map must localise the change. None resamples the image (no interpolation shortcut):

    * ``"local_shuffle"``: the box is cut into 4-voxel tiles which are shuffled (a local jigsaw).
    * ``"cutpaste"``: the box's content is pasted at another random position (CutPaste, Li et al. 2021).
    * ``"local_noise"``: Gaussian noise (``torchio.RandomNoise``, std 5-20% of the image's range) in the box.
    * ``"local_blur"``: ``torchio.RandomBlur`` (std 1-3 voxels, in-plane for 2D) of the box.
    * ``"blob"``: a smooth Gaussian bump of ±30-100% of the image's range centred in the box (the
      synthetic anomalies of FCDD-style training).

    Spatial operations act on array axes and do not touch the affine of a ``MetaTensor``: the
    outlier is a corrupted image on the same voxel grid, not a resampling, so it is not recorded as
    an invertible operation either.

    TorchIO wants (C, W, H, D) tensors; the array axes are passed to it in order (TorchIO's axis
    names play no role, every parameter here is per array axis). A 2D image (C, H, W) is given to
    TorchIO as (C, H, W, 1): the swap patch size is 1 and the elastic displacement 0 along that
    singleton axis, so both act in-plane. TorchIO draws from torch's global RNG; here it runs inside
    ``torch.random.fork_rng`` seeded from ``self.R``, so ``set_random_state`` replays runs and the
    caller's global RNG state is left unchanged.

    Args:
        ops: names of the operations to choose from (subset and order), any of :data:`PAPER_OPS`
            (``"rotate180"``, ``"vflip"``, ``"patch_permute"``, ``"swap"``, ``"gamma"``, ``"elastic"``) and
            :data:`LOCAL_OPS` (local corruptions inside a random box). Defaults to the paper's six.
        op_weights: sampling probabilities of ``ops`` (non-negative, normalised to sum to 1).
            ``None`` picks uniformly.
        flip_axis: spatial axis flipped by ``"vflip"`` (0 = H, the first spatial axis).
        rotation_axes: pair of distinct spatial axes spanning the plane of ``"rotate180"``.
        permute_grid: number of patches per spatial axis for ``"patch_permute"``; an int for every
            spatial axis or one value per spatial axis.
        swap_patch_size: patch size of ``torchio.RandomSwap`` in voxels; an int for every spatial
            axis or one value per spatial axis.
        swap_num_iterations: number of patch pairs ``torchio.RandomSwap`` swaps.
        gamma_log_range: ``(low, high)`` range of ``|log gamma|``, ``0 < low <= high``.
        elastic_num_control_points: control points of the coarse B-spline grid per spatial axis
            (at least 5, since TorchIO's locked borders make 4 an identity); an int or one per axis.
        elastic_max_displacement: maximum displacement at each control point in voxels; a float or
            one per spatial axis (at least one positive).
        box_fraction: ``(low, high)`` side of the box of the local operations, as a fraction of each axis.
        prob: probability of applying the transform at all. The paper turns every outlier image into
            an outlier, hence the default 1.0.

    Raises:
        ValueError: on an unknown op name (with a "did you mean" hint) or an invalid parameter.

    Attributes:
        last_op: name of the operation sampled by the last ``randomize`` (``None`` before the first
            call or when ``prob`` skipped the transform), for logging which op made each outlier.

    Example:
        >>> import torch
        >>> t = OutlierSynthesis(ops=("rotate180", "vflip", "patch_permute"))
        >>> _ = t.set_random_state(seed=0)
        >>> out = t(torch.rand(1, 64, 64))  # (C, H, W); (C, H, W, D) works the same way
        >>> out.shape, t.last_op in ("rotate180", "vflip", "patch_permute")
        (torch.Size([1, 64, 64]), True)
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        ops: Sequence[str] = PAPER_OPS,
        op_weights: Sequence[float] | None = None,
        *,
        flip_axis: int = 0,
        rotation_axes: Sequence[int] = (0, 1),
        permute_grid: int | Sequence[int] = 4,
        swap_patch_size: int | Sequence[int] = 15,
        swap_num_iterations: int = 100,
        gamma_log_range: Sequence[float] = (0.3, 0.8),
        elastic_num_control_points: int | Sequence[int] = 7,
        elastic_max_displacement: float | Sequence[float] = 7.5,
        box_fraction: Sequence[float] = (0.15, 0.5),
        prob: float = 1.0,
    ) -> None:
        _check_prob(prob)
        RandomizableTransform.__init__(self, prob)
        self.ops: tuple[str, ...] = _parse_ops(ops)
        self.op_weights: np.ndarray = _parse_op_weights(op_weights, len(self.ops))

        if not _is_int(flip_axis) or not 0 <= flip_axis <= 2:
            raise ValueError(f"flip_axis must be a spatial axis index in {{0, 1, 2}}, got {flip_axis!r}")
        self.flip_axis = int(flip_axis)
        if (
            isinstance(rotation_axes, str)
            or not isinstance(rotation_axes, Sequence)
            or len(rotation_axes) != 2
            or not all(_is_int(a) and 0 <= a <= 2 for a in rotation_axes)
            or rotation_axes[0] == rotation_axes[1]
        ):
            raise ValueError(
                f"rotation_axes must be two distinct spatial axis indices in {{0, 1, 2}}, got {rotation_axes!r}"
            )
        self.rotation_axes = (int(rotation_axes[0]), int(rotation_axes[1]))

        self.permute_grid = _parse_per_axis_int(permute_grid, "permute_grid", minimum=1)
        if max(_as_tuple(self.permute_grid)) < 2:
            raise ValueError(
                f"permute_grid must cut at least one axis into >= 2 patches, got {permute_grid!r}"
            )
        self.swap_patch_size = _parse_per_axis_int(swap_patch_size, "swap_patch_size", minimum=1)
        if not _is_int(swap_num_iterations) or swap_num_iterations < 1:
            raise ValueError(f"swap_num_iterations must be an int >= 1, got {swap_num_iterations!r}")
        self.swap_num_iterations = int(swap_num_iterations)

        if (
            isinstance(gamma_log_range, str)
            or not isinstance(gamma_log_range, Sequence)
            or len(gamma_log_range) != 2
            or not all(_is_real(v) and math.isfinite(v) for v in gamma_log_range)
            or not 0 < gamma_log_range[0] <= gamma_log_range[1]
        ):
            raise ValueError(
                "gamma_log_range must be (low, high) bounds of |log gamma| with 0 < low <= high, "
                f"got {gamma_log_range!r}"
            )
        self.gamma_log_range = (float(gamma_log_range[0]), float(gamma_log_range[1]))

        self.elastic_num_control_points = _parse_per_axis_int(
            elastic_num_control_points, "elastic_num_control_points", minimum=5
        )
        self.elastic_max_displacement = _parse_per_axis_float(
            elastic_max_displacement, "elastic_max_displacement"
        )

        if (
            isinstance(box_fraction, str)
            or not isinstance(box_fraction, Sequence)
            or len(box_fraction) != 2
            or not 0 < box_fraction[0] <= box_fraction[1] <= 1
        ):
            raise ValueError(
                f"box_fraction must be (low, high) with 0 < low <= high <= 1, got {box_fraction!r}"
            )
        self.box_fraction = (float(box_fraction[0]), float(box_fraction[1]))

        # Sampled state, set by randomize().
        self.box_sides = np.full(3, 0.5)
        self.box_starts = np.zeros(3)
        self.paste_starts = np.zeros(3)
        self.last_op: str | None = None
        self.seed: int = 0
        self.log_gamma: float = 0.0

    def randomize(self, data: Any | None = None) -> None:
        """Sample whether to apply, which op, a seed for the op's own randomness and log gamma.

        All values come from ``self.R``; the same number of draws is made whatever op is chosen.
        """
        super().randomize(None)
        op = self.ops[int(self.R.choice(len(self.ops), p=self.op_weights))]
        self.seed = int(self.R.randint(0, _MAX_SEED))
        sign = 1.0 if self.R.rand() < 0.5 else -1.0
        self.log_gamma = sign * float(self.R.uniform(*self.gamma_log_range))
        self.box_sides = self.R.uniform(*self.box_fraction, size=3)
        self.box_starts = self.R.uniform(0.0, 1.0, size=3)
        self.paste_starts = self.R.uniform(0.0, 1.0, size=3)
        self.last_op = op if self._do_transform else None

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """Apply one sampled outlier operation to ``img``.

        Args:
            img: channel-first image, (C, H, W) or (C, H, W, D); ``torch.Tensor`` (any device),
                ``MetaTensor`` or ``np.ndarray``.
            randomize: sample a new op first; ``False`` reuses the last sample (the dictionary
                wrapper uses this to share one sample across keys).

        Returns:
            The outlier, with the type, shape, dtype and device of ``img`` (``MetaTensor`` metadata
            copied from the input). ``img`` itself is not modified. When ``prob`` skips the
            transform, ``img`` is returned as is.

        Raises:
            ValueError: if ``img`` is not 3D or 4D, or the op parameters do not fit its dimensions.
            RuntimeError: if called with ``randomize=False`` before anything was sampled.
        """
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        if self.last_op is None:
            raise RuntimeError("no op sampled yet, call `randomize()` first.")
        if img.ndim not in (3, 4):
            raise ValueError(
                f"img must be channel-first (C, H, W) or (C, H, W, D), got shape {tuple(img.shape)}"
            )
        x = convert_to_tensor(img, track_meta=False)
        self._check_dims(x.ndim - 1)
        out = self._apply(x, self.last_op)
        if out.is_floating_point() and not x.is_floating_point():
            out = torch.round(out)  # float results of gamma/elastic: round, don't truncate, into ints
        out, *_ = convert_to_dst_type(out, dst=img, safe=not x.is_floating_point())
        if isinstance(out, MetaTensor):
            # copy_meta_from is shallow: without this the output would share the input's affine tensor.
            out.meta = deepcopy(img.meta)
        return out

    def _check_dims(self, spatial_ndim: int) -> None:
        """Check the configured ops against the image dimensionality (every call, not only when picked)."""
        if OutlierOp.VFLIP in self.ops and self.flip_axis >= spatial_ndim:
            raise ValueError(
                f"flip_axis must be < the number of spatial dims ({spatial_ndim}), got {self.flip_axis!r}"
            )
        if OutlierOp.ROTATE180 in self.ops and max(self.rotation_axes) >= spatial_ndim:
            raise ValueError(
                f"rotation_axes must be < the number of spatial dims ({spatial_ndim}), got {self.rotation_axes!r}"
            )
        per_axis = {
            OutlierOp.PATCH_PERMUTE: ("permute_grid", self.permute_grid),
            OutlierOp.SWAP: ("swap_patch_size", self.swap_patch_size),
            OutlierOp.ELASTIC: ("elastic_num_control_points", self.elastic_num_control_points),
        }
        checks = [per_axis[op] for op in per_axis if op in self.ops]
        if OutlierOp.ELASTIC in self.ops:
            checks.append(("elastic_max_displacement", self.elastic_max_displacement))
        for name, value in checks:
            if isinstance(value, tuple) and len(value) != spatial_ndim:
                raise ValueError(
                    f"{name} needs one value per spatial axis ({spatial_ndim}) for this image, got {value!r}"
                )

    def _apply(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """Deterministic part: apply ``op`` to the plain tensor ``x`` using the sampled state."""
        spatial_ndim = x.ndim - 1
        if op == OutlierOp.ROTATE180:
            # A 180° rotation in a plane is the flip of both of its axes.
            return torch.flip(x, dims=(1 + self.rotation_axes[0], 1 + self.rotation_axes[1]))
        if op == OutlierOp.VFLIP:
            return torch.flip(x, dims=(1 + self.flip_axis,))
        if op == OutlierOp.PATCH_PERMUTE:
            grid = _expand(self.permute_grid, spatial_ndim)
            return _permute_patches(x, grid, self.seed)
        if op == OutlierOp.SWAP:
            spatial = x.shape[1:]
            # TorchIO's sampler loops forever unless some axis leaves >= 2 start positions.
            patch = tuple(
                min(p, max(1, s // 2))
                for p, s in zip(_expand(self.swap_patch_size, spatial_ndim), spatial, strict=True)
            )
            if all(s - p < 2 for p, s in zip(patch, spatial, strict=True)):
                raise ValueError(f"image spatial shape {tuple(spatial)} is too small for 'swap'")
            if spatial_ndim == 2:
                patch = (*patch, 1)
            swap = tio.RandomSwap(patch_size=patch, num_iterations=self.swap_num_iterations)
            return _run_torchio(swap, x, self.seed)
        if op == OutlierOp.GAMMA:
            # Gamma of a negative value is undefined: work on a copy shifted to min 0.
            shift = torch.clamp(x.min(), max=0).to(torch.float32).cpu()
            gamma = tio.Gamma(gamma=math.exp(self.log_gamma))
            return _run_torchio(gamma, x, self.seed, shift=shift)
        if op == OutlierOp.ELASTIC:
            points = _expand(self.elastic_num_control_points, spatial_ndim)
            displacement = tuple(float(d) for d in _expand(self.elastic_max_displacement, spatial_ndim))
            if spatial_ndim == 2:
                # No displacement along the singleton axis (also avoids TorchIO's folding warning,
                # which fires for any non-zero displacement along a size-1 axis).
                points, displacement = (*points, max(points)), (*displacement, 0.0)
            elastic = tio.RandomElasticDeformation(num_control_points=points, max_displacement=displacement)
            return _run_torchio(elastic, x, self.seed)
        if op in LOCAL_OPS:
            return self._apply_local(x, op)
        raise ValueError(f"unknown op {op!r}")  # unreachable: ops are checked in __init__

    def _box(self, spatial: Sequence[int], starts: np.ndarray) -> tuple[slice, ...]:
        sides = [max(2, round(f * n)) for f, n in zip(self.box_sides, spatial, strict=False)]
        sides = [min(side, n) for side, n in zip(sides, spatial, strict=True)]
        return tuple(
            slice(int(u * (n - side)), int(u * (n - side)) + side)
            for u, side, n in zip(starts, sides, spatial, strict=False)
        )

    def _apply_local(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """The local operations: change only the sampled box of ``x`` (C, *spatial)."""
        spatial = tuple(x.shape[1:])
        box = (slice(None), *self._box(spatial, self.box_starts))
        out = x.clone()
        crop = x[box]
        value_range = float(x.max() - x.min()) or 1.0
        if op == OutlierOp.LOCAL_SHUFFLE:
            grid = tuple(max(1, n // 4) for n in crop.shape[1:])
            if max(grid) < 2:
                grid = tuple(min(2, n) for n in crop.shape[1:])
            out[box] = _permute_patches(crop, grid, self.seed)
        elif op == OutlierOp.CUTPASTE:
            target = (slice(None), *self._box(spatial, self.paste_starts))
            out[target] = crop
        elif op == OutlierOp.LOCAL_NOISE:
            noise = tio.RandomNoise(std=(0.05 * value_range, 0.2 * value_range))
            out[box] = _run_torchio(noise, crop, self.seed)
        elif op == OutlierOp.LOCAL_BLUR:
            std = (1.0, 3.0) if crop.ndim == 4 else (1.0, 3.0, 1.0, 3.0, 0.0, 0.0)
            out[box] = _run_torchio(tio.RandomBlur(std=std), crop, self.seed)
        else:  # BLOB: a Gaussian bump centred in the box, sigma a quarter of the box side
            generator = np.random.default_rng(self.seed)
            amplitude = generator.uniform(0.3, 1.0) * value_range * generator.choice((-1.0, 1.0))
            coords = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in spatial), indexing="ij")
            exponent = sum(
                ((c - (b.start + b.stop - 1) / 2) / max(1.0, (b.stop - b.start) / 4)) ** 2
                for c, b in zip(coords, box[1:], strict=True)
            )
            out = x + float(amplitude) * torch.exp(-0.5 * exponent).to(
                x.device, x.dtype if x.is_floating_point() else torch.float32
            )
        return out


class OutlierSynthesisd(RandomizableTransform, MapTransform):
    """Dictionary-based wrapper of :class:`OutlierSynthesis`.

    One random sample (the same op, seed and gamma) is shared by all ``keys``, so identical inputs
    give identical outputs and same-shaped images get the same realisation (same rotation, jigsaw
    permutation, swapped patches or deformation field). Intended for intensity images: the elastic
    deformation interpolates linearly, which is not suitable for label maps.

    Args:
        keys: keys of the items to transform. See also: :class:`monai.transforms.MapTransform`.
        ops, op_weights, flip_axis, rotation_axes, permute_grid, swap_patch_size, swap_num_iterations,
        gamma_log_range, elastic_num_control_points, elastic_max_displacement: see
            :class:`OutlierSynthesis`.
        prob: probability of applying the transform (to all keys together).
        allow_missing_keys: don't raise an exception if a key is missing.

    Raises:
        ValueError: on an unknown op name or an invalid parameter.

    Example:
        >>> import torch
        >>> t = OutlierSynthesisd(keys=("image", "copy")).set_random_state(seed=0)
        >>> img = torch.rand(1, 32, 32)
        >>> out = t({"image": img, "copy": img.clone()})
        >>> bool(torch.equal(out["image"], out["copy"]))
        True
    """

    backend = OutlierSynthesis.backend

    def __init__(
        self,
        keys: KeysCollection,
        ops: Sequence[str] = PAPER_OPS,
        op_weights: Sequence[float] | None = None,
        *,
        flip_axis: int = 0,
        rotation_axes: Sequence[int] = (0, 1),
        permute_grid: int | Sequence[int] = 4,
        swap_patch_size: int | Sequence[int] = 15,
        swap_num_iterations: int = 100,
        gamma_log_range: Sequence[float] = (0.3, 0.8),
        elastic_num_control_points: int | Sequence[int] = 7,
        elastic_max_displacement: float | Sequence[float] = 7.5,
        box_fraction: Sequence[float] = (0.15, 0.5),
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        _check_prob(prob)
        RandomizableTransform.__init__(self, prob)
        self.synthesis = OutlierSynthesis(
            ops,
            op_weights,
            flip_axis=flip_axis,
            rotation_axes=rotation_axes,
            permute_grid=permute_grid,
            swap_patch_size=swap_patch_size,
            swap_num_iterations=swap_num_iterations,
            gamma_log_range=gamma_log_range,
            elastic_num_control_points=elastic_num_control_points,
            elastic_max_displacement=elastic_max_displacement,
            box_fraction=box_fraction,
            prob=1.0,
        )

    @property
    def last_op(self) -> str | None:
        """Name of the op applied by the last call (``None`` if none was applied)."""
        return self.synthesis.last_op if self._do_transform else None

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> OutlierSynthesisd:
        super().set_random_state(seed, state)
        self.synthesis.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        # All keys share one sample.
        self.synthesis.randomize(None)
        for key in self.key_iterator(d):
            d[key] = self.synthesis(d[key], randomize=False)
        return d


def _run_torchio(
    transform: tio.Transform, x: torch.Tensor, seed: int, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """Run a TorchIO transform on a (C, *spatial) tensor, seeded, without touching the global RNG.

    2D images get a trailing singleton axis (TorchIO wants (C, W, H, D)); the work is done in
    float32 on the CPU and the result is returned on ``x``'s device.
    """
    data = x.detach().to(device="cpu", dtype=torch.float32)
    if data.ndim == 3:
        data = data.unsqueeze(-1)
    if shift is not None:
        data = data - shift
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = transform(data)
    if shift is not None:
        out = out + shift
    if x.ndim == 3:
        out = out.squeeze(-1)
    return out.to(x.device)


def _permute_patches(x: torch.Tensor, grid: Sequence[int], seed: int) -> torch.Tensor:
    """Shuffle the patches of a (C, *spatial) tensor cut into ``grid`` patches per axis (jigsaw).

    Only the centred core whose size is divisible by the grid is cut; the rest is kept. The
    permutation is drawn from ``np.random.RandomState(seed)`` and is never the identity.
    """
    spatial = x.shape[1:]
    grid = [max(1, min(int(g), s)) for g, s in zip(grid, spatial, strict=True)]
    n_patches = math.prod(grid)
    if n_patches < 2:
        raise ValueError(f"image spatial shape {tuple(spatial)} is too small for 'patch_permute'")
    patch = [s // g for s, g in zip(spatial, grid, strict=True)]
    core = [p * g for p, g in zip(patch, grid, strict=True)]
    starts = [(s - c) // 2 for s, c in zip(spatial, core, strict=True)]
    region = (slice(None), *(slice(a, a + c) for a, c in zip(starts, core, strict=True)))

    rng = np.random.RandomState(seed)
    perm = rng.permutation(n_patches)
    while np.array_equal(perm, np.arange(n_patches)):  # identity would not be an outlier
        perm = rng.permutation(n_patches)

    n = len(spatial)
    channels = x.shape[0]
    # (C, g0, p0, g1, p1, ...) -> (C, g0, g1, ..., p0, p1, ...) -> (C, n_patches, p0, p1, ...)
    blocks = x[region].reshape(channels, *[v for gp in zip(grid, patch, strict=True) for v in gp])
    order = [0, *(1 + 2 * i for i in range(n)), *(2 + 2 * i for i in range(n))]
    blocks = blocks.permute(order).reshape(channels, n_patches, *patch)
    blocks = blocks[:, torch.as_tensor(perm, device=x.device)]
    blocks = (
        blocks.reshape(channels, *grid, *patch).permute(np.argsort(order).tolist()).reshape(channels, *core)
    )
    out = x.clone()
    out[region] = blocks
    return out


def _check_prob(prob: Any) -> None:
    if not _is_real(prob) or not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be a number in [0, 1], got {prob!r}")


def _parse_ops(ops: Sequence[str]) -> tuple[str, ...]:
    if isinstance(ops, str) or not isinstance(ops, Sequence) or len(ops) == 0:
        raise ValueError(f"ops must be a non-empty sequence of op names, got {ops!r}")
    parsed = tuple(look_up_option(op, OutlierOp).value for op in ops)
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"ops must not repeat an op (use op_weights to weight them), got {ops!r}")
    return parsed


def _parse_op_weights(op_weights: Sequence[float] | None, n_ops: int) -> np.ndarray:
    if op_weights is None:
        return np.full(n_ops, 1.0 / n_ops)
    if (
        isinstance(op_weights, str)
        or not isinstance(op_weights, Sequence | np.ndarray)
        or len(op_weights) != n_ops
        or not all(_is_real(w) and math.isfinite(w) and w >= 0 for w in op_weights)
        or sum(op_weights) <= 0
    ):
        raise ValueError(
            f"op_weights must be {n_ops} finite non-negative numbers (one per op) with a positive sum, "
            f"got {op_weights!r}"
        )
    weights = np.asarray(op_weights, dtype=np.float64)
    return weights / weights.sum()


def _parse_per_axis_int(value: Any, name: str, minimum: int) -> int | tuple[int, ...]:
    if _is_int(value) and value >= minimum:
        return int(value)
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) in (2, 3)
        and all(_is_int(v) and v >= minimum for v in value)
    ):
        return tuple(int(v) for v in value)
    raise ValueError(
        f"{name} must be an int >= {minimum} or 2 or 3 of them (one per spatial axis), got {value!r}"
    )


def _parse_per_axis_float(value: Any, name: str) -> float | tuple[float, ...]:
    if _is_real(value) and math.isfinite(value) and value > 0:
        return float(value)
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) in (2, 3)
        and all(_is_real(v) and math.isfinite(v) and v >= 0 for v in value)
        and any(v > 0 for v in value)
    ):
        return tuple(float(v) for v in value)
    raise ValueError(
        f"{name} must be a positive number or 2 or 3 non-negative numbers (one per spatial axis, "
        f"at least one positive), got {value!r}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _as_tuple(value: int | float | tuple) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _expand(value: int | float | tuple, n: int) -> tuple:
    return value if isinstance(value, tuple) else (value,) * n
