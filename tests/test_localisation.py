"""Localisation metrics: pixel AUROC against scikit-learn, AUPRO against a brute-force reference."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest

from monai_ood.evaluation import aupro, localisation_metrics, pixel_auroc


def _components(mask: np.ndarray) -> list[list[tuple[int, ...]]]:
    """Connected components of a boolean array with full connectivity (8 in 2D, 26 in 3D), by flood fill."""
    steps = [step for step in itertools.product((-1, 0, 1), repeat=mask.ndim) if any(step)]
    seen = np.zeros(mask.shape, bool)
    components = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            pixel = queue.popleft()
            pixels.append(pixel)
            for step in steps:
                other = tuple(p + s for p, s in zip(pixel, step, strict=True))
                inside = all(0 <= o < n for o, n in zip(other, mask.shape, strict=True))
                if inside and mask[other] and not seen[other]:
                    seen[other] = True
                    queue.append(other)
        components.append(pixels)
    return components


def reference_aupro(scores, masks, valid=None, fpr_limit: float = 0.3) -> float:
    """PRO curve by definition: at every distinct valid score t (and +inf), FPR(t) and the mean over
    regions of each region's fraction >= t; trapezoids up to ``fpr_limit``, interpolated there."""
    scores, masks = np.asarray(scores, np.float64), np.asarray(masks, bool)
    valid = np.ones(masks.shape, bool) if valid is None else np.asarray(valid, bool)
    lesion = masks & valid
    regions = [
        np.array([scores[(i, *pixel)] for pixel in pixels])
        for i in range(len(scores))
        for pixels in _components(lesion[i])
    ]
    negatives = scores[valid & ~lesion]
    points = [(0.0, 0.0)]
    for t in sorted(set(scores[valid].tolist()), reverse=True):
        points.append((float(np.mean(negatives >= t)), float(np.mean([np.mean(r >= t) for r in regions]))))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            x1, y1 = fpr_limit, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += (x1 - x0) * (y0 + y1) / 2.0
    return area / fpr_limit


def _random_case(seed: int, shape=(3, 12, 14), ties: bool = False, with_valid: bool = False):
    """Blobby masks (a thresholded smoothed field gives several regions per image), scores correlated
    with them, optional integer scores (many ties) and a valid mask."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=[0] + [1.2] * (len(shape) - 1))
    masks = field > np.quantile(field, 0.8)
    scores = rng.normal(size=shape) + 1.5 * masks
    if ties:
        scores = np.round(scores)
    valid = rng.random(shape) > 0.2 if with_valid else None
    return scores, masks, valid


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("with_valid", [False, True])
def test_pixel_auroc_matches_sklearn(seed, ties, with_valid):
    from sklearn.metrics import roc_auc_score

    scores, masks, valid = _random_case(seed, ties=ties, with_valid=with_valid)
    inside = np.ones(masks.shape, bool) if valid is None else valid
    expected = roc_auc_score(masks[inside], scores[inside])
    assert pixel_auroc(scores, masks, valid) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed, ties, with_valid, fpr_limit):
    scores, masks, valid = _random_case(seed, ties=ties, with_valid=with_valid)
    expected = reference_aupro(scores, masks, valid, fpr_limit)
    assert aupro(scores, masks, valid, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-12)


def test_aupro_3d_maps_match_brute_force():
    scores, masks, valid = _random_case(7, shape=(2, 5, 6, 7), ties=True, with_valid=True)
    assert aupro(scores, masks, valid) == pytest.approx(reference_aupro(scores, masks, valid), abs=1e-12)


def _two_regions() -> np.ndarray:
    """Two lesions in one image: a 2 x 2 square and a 4 x 4 square."""
    masks = np.zeros((1, 16, 16), bool)
    masks[0, 1:3, 1:3] = True
    masks[0, 8:12, 8:12] = True
    return masks


def test_known_answers():
    masks = _two_regions()
    perfect = masks.astype(float)
    assert localisation_metrics(perfect, masks) == pytest.approx({"pixel_auroc": 1.0, "aupro": 1.0})
    last = 1.0 - perfect  # every lesion pixel below every other pixel
    assert localisation_metrics(last, masks) == {"pixel_auroc": 0.0, "aupro": 0.0}

    # The small region caught, the large one ranked last: regions count equally in PRO (0.5 at every
    # FPR < 1), pixels do not (4 of 20 lesion pixels above every background pixel).
    one = np.full(masks.shape, 0.5)
    one[0, 1:3, 1:3] = 1.0
    one[0, 8:12, 8:12] = 0.0
    assert localisation_metrics(one, masks) == pytest.approx({"pixel_auroc": 0.2, "aupro": 0.5})

    # The missed region tied with the background: the curve joins (0, 0.5) to (1, 1) by a straight line,
    # so at FPR 0.3 PRO is 0.65 and the area 0.3 * (0.5 + 0.65) / 2 = 0.1725, / 0.3 = 0.575.
    one[0, 8:12, 8:12] = 0.5
    assert aupro(one, masks) == pytest.approx(0.575)
    assert aupro(one, masks, fpr_limit=1.0) == pytest.approx(0.75)


def test_diagonal_neighbours_are_one_region():
    masks = np.zeros((1, 6, 6), bool)
    masks[0, 0, 0:3] = True
    masks[0, 1, 3] = True  # touches (0, 2) by a corner only
    scores = np.full(masks.shape, 0.5)
    scores[masks] = 0.0
    scores[0, 1, 3] = 1.0
    # One region of 4 pixels with 1 caught: PRO 0.25 (two regions, 4-connected, would give 0.5).
    assert aupro(scores, masks) == pytest.approx(0.25)


def test_random_map_gives_half_the_fpr_limit():
    rng = np.random.default_rng(0)
    masks = np.zeros((20, 48, 48), bool)
    masks[:, 10:20, 10:25] = True
    masks[::2, 30:40, 30:34] = True
    scores = rng.random(masks.shape)
    assert pixel_auroc(scores, masks) == pytest.approx(0.5, abs=0.01)
    assert aupro(scores, masks) == pytest.approx(0.15, abs=0.01)  # PRO ~= FPR: area fpr_limit^2 / 2
    assert aupro(scores, masks, fpr_limit=0.1) == pytest.approx(0.05, abs=0.01)


def test_valid_excludes_pixels():
    masks = _two_regions()
    scores = masks.astype(float)
    valid = np.ones(masks.shape, bool)
    valid[0, :, 13:] = False
    scores[0, :, 13:] = 5.0  # background above every lesion, but outside valid
    scores[0, 0, 15] = np.nan  # ignored too
    outside_lesion = masks.copy()
    outside_lesion[0, 14:16, 14:16] = True  # a missed lesion outside valid: not a region
    assert localisation_metrics(scores, outside_lesion, valid) == pytest.approx(
        {"pixel_auroc": 1.0, "aupro": 1.0}
    )
    scores[0, 0, 15] = 5.0
    assert aupro(scores, masks) < 0.9 and pixel_auroc(scores, masks) < 1.0  # the same pixels, counted
    assert localisation_metrics(scores, masks, valid.astype(np.uint8))["aupro"] == pytest.approx(1.0)


def test_images_without_lesion_count_for_fpr_only():
    masks = np.concatenate([_two_regions(), np.zeros((1, 16, 16), bool)])
    scores = masks.astype(float)
    scores[1, 0, 0] = 2.0  # one false positive above every lesion, in the lesion-free image
    negatives = (~masks).sum()
    # PRO is 0 up to FPR 1/negatives, then 1: area 0.3 - 1/negatives, / 0.3.
    assert aupro(scores, masks) == pytest.approx((0.3 - 1 / negatives) / 0.3)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s, m, v: (s[0, 0], m[0, 0], None), "with a spatial axis"),
        (lambda s, m, v: (s, m[:, :-1], None), "masks must have the shape"),
        (lambda s, m, v: (s, m, v[:, :-1]), "valid must have the shape"),
        (lambda s, m, v: (s, m * 2, None), "masks must be boolean"),
        (lambda s, m, v: (s, np.zeros_like(m), None), "no lesion pixel"),
        (lambda s, m, v: (s, m, v & ~m), "no lesion pixel inside valid"),
        (lambda s, m, v: (s, np.ones_like(m), None), "no non-lesion pixel"),
        (lambda s, m, v: (np.where(m, np.inf, s), m, None), "NaN or Inf"),
    ],
)
def test_bad_inputs_raise_one_value_error(change, message):
    masks = _two_regions()
    scores, valid = masks.astype(float), np.ones(masks.shape, bool)
    args = change(scores, masks, valid)
    for function in (pixel_auroc, aupro, localisation_metrics):
        with pytest.raises(ValueError, match=message):
            function(*args)


@pytest.mark.parametrize("fpr_limit", [0.0, -0.1, 1.5, float("nan")])
def test_bad_fpr_limit(fpr_limit):
    masks = _two_regions()
    with pytest.raises(ValueError, match="fpr_limit must be in"):
        aupro(masks.astype(float), masks, fpr_limit=fpr_limit)
