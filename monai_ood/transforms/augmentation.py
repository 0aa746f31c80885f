"""The paper's training augmentation as one MONAI transform (section 4.1: rotation <= 15 degrees,
translation <= 10 pixels), shared by every model trained here and by the InD test variants."""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.transforms import RandAffined

__all__ = ["ROTATE_DEGREES", "TRANSLATE_PIXELS", "affine_augmentation", "warped_copies"]

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


def warped_copies(
    items: Sequence[dict], seed: int = 0, copies: int = 1, spatial_dims: int | None = None
) -> list[dict]:
    """``copies`` warped versions of each item under :func:`affine_augmentation` (one resampling each),
    for fitting post-hoc statistics on images that went through the same interpolation as training and
    test images (BENCHMARK.md, "Resampling shortcut").

    Args:
        items: dicts with ``"image"`` ``(C, *spatial)`` and optionally ``"label"`` ``(1, *spatial)``.
        seed: seed of the warps; the same seed and items give the same copies.
        copies: warped versions per item (``0`` returns ``[]``).
        spatial_dims: 2 or 3; read from the first image when ``None``.

    Returns:
        New items (item-major: every copy of the first item first) with the warped ``"image"`` (float32,
        clipped to ``[0, 1]``) and ``"label"`` (int64, nearest neighbour) and the other keys copied.
    """
    import numpy as np
    from monai.utils import convert_to_numpy

    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
        raise ValueError(f"copies must be an int >= 0, got {copies!r}")
    if not items or copies == 0:
        return []
    if spatial_dims is None:
        spatial_dims = np.asarray(items[0]["image"]).ndim - 1
    warp = affine_augmentation(("image", "label"), spatial_dims=spatial_dims, prob=1.0)
    warp.set_random_state(seed)
    out = []
    for item in items:
        has_label = item.get("label") is not None
        for _ in range(copies):
            data = {"image": np.asarray(item["image"], dtype=np.float32)}
            # the label rides along even when absent so that every item consumes the same random numbers
            data["label"] = (
                np.asarray(item["label"], dtype=np.float32) if has_label else np.zeros_like(data["image"])
            )
            warped = warp(data)
            new = {k: v for k, v in item.items() if k not in ("image", "label")}
            new["image"] = np.clip(convert_to_numpy(warped["image"], dtype=np.float32), 0.0, 1.0)
            if has_label:
                new["label"] = np.rint(convert_to_numpy(warped["label"])).astype(np.int64)
            out.append(new)
    return out
