"""The paper's training augmentation as one MONAI transform (section 4.1: rotation <= 15 degrees,
translation <= 10 pixels), shared by every model trained here and by the InD test variants."""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.transforms import RandAffined

__all__ = ["ROTATE_DEGREES", "TRANSLATE_PIXELS", "affine_augmentation"]

ROTATE_DEGREES = 15.0
TRANSLATE_PIXELS = 10.0


def affine_augmentation(
    keys: Sequence[str] = ("image", "label"),
    spatial_dims: int = 2,
    rotate_degrees: float = ROTATE_DEGREES,
    translate_pixels: float = TRANSLATE_PIXELS,
    prob: float = 1.0,
) -> RandAffined:
    """ONE ``RandAffined``: a random rotation and translation in a single resampling (a second
    interpolation pass would be a shortcut the OOD head can learn: BENCHMARK.md pitfalls).

    Args:
        keys: the image key first (bilinear), then label keys (nearest neighbour); zero padding.
        spatial_dims: 2 (one in-plane angle) or 3 (an angle about each axis).
        rotate_degrees: maximum absolute rotation.
        translate_pixels: maximum absolute translation per axis, in pixels.
        prob: probability of warping an item.

    Returns:
        The transform; seed it with ``set_random_state(seed)``.
    """
    keys = tuple(keys)
    if not keys:
        raise ValueError(f"keys must name at least the image, got {keys!r}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    angle = math.radians(rotate_degrees)
    return RandAffined(
        keys=keys,
        prob=prob,
        rotate_range=(angle,) if spatial_dims == 2 else (angle,) * 3,
        translate_range=(translate_pixels,) * spatial_dims,
        mode=("bilinear",) + ("nearest",) * (len(keys) - 1),
        padding_mode="zeros",
    )
