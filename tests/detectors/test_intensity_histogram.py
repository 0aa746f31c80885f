"""Intensity histograms (IHF, monai_ood.detectors.intensity_histogram) against ``np.histogram`` and a
float64 Ledoit-Wolf (and PCA) Mahalanobis, on brain-like discs and shifted copies of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detector_helpers import items, mahalanobis_numpy
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

from monai_ood.detectors.base import NotFittedError
from monai_ood.detectors.intensity_histogram import IntensityHistogramDetector


def brain_like(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Two-tissue discs on a zero background: a crude stand-in for skull-stripped slices."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        radius, (cy, cx) = rng.uniform(9, 13), size / 2 + rng.normal(0, 1, 2)
        d = np.hypot(yy - cy, xx - cx)
        image = np.where(d < 0.6 * radius, 0.7, 0.35) * (d < radius)
        out[i, 0] = np.clip(image + (d < radius) * rng.normal(0, 0.05, d.shape), 0, 1)
    return out


@pytest.mark.parametrize("foreground", ["nonzero", "all"])
def test_histograms_match_numpy(foreground):
    images = brain_like(4, 0)
    images[1, 0, :4] = 1.2  # out of range: counted in the last bin after clipping
    images[2] = 0.0  # no foreground at all
    detector = IntensityHistogramDetector(bins=16, foreground=foreground, threshold=1e-3)
    got = detector.histograms(torch.from_numpy(images))
    assert got.shape == (4, 16) and got.dtype == np.float64
    for i, image in enumerate(images.astype(np.float64)):
        values = image[image > 1e-3] if foreground == "nonzero" else image.ravel()
        if values.size == 0:
            np.testing.assert_array_equal(got[i], 0)
            continue
        expected, _ = np.histogram(np.clip(values, 0, 1), bins=16, range=(0, 1), density=True)
        np.testing.assert_allclose(got[i], expected, rtol=1e-12, atol=1e-12)


def test_histogram_mahalanobis_matches_numpy():
    train, test = brain_like(30, 1), brain_like(5, 2)
    detector = IntensityHistogramDetector(bins=12)
    with pytest.raises(NotFittedError):
        detector.predict(torch.from_numpy(test))
    detector.fit(items(train))

    def hist(x):
        return np.stack([np.histogram(i[i > 1e-3], 12, (0, 1), density=True)[0] for i in x])

    np.testing.assert_allclose(
        detector.covariance_.numpy(), LedoitWolf().fit(hist(train)).covariance_, rtol=1e-6
    )
    out = detector.predict(torch.from_numpy(test))
    assert out.score_map is None and out.image_score.shape == (5,) and out.image_score.dtype == torch.float32
    np.testing.assert_allclose(out.image_score.numpy(), mahalanobis_numpy(hist(test), hist(train)), rtol=1e-4)

    reduced = IntensityHistogramDetector(bins=12, pca=4).fit(items(train))
    pca = PCA(n_components=4, svd_solver="full").fit(hist(train))
    expected = mahalanobis_numpy(pca.transform(hist(test)), pca.transform(hist(train)))
    np.testing.assert_allclose(
        reduced.predict(torch.from_numpy(test)).image_score.numpy(), expected, rtol=1e-4
    )
    assert IntensityHistogramDetector(bins=12, pca=0.99).fit(items(train)).pca_.n_components_ <= 12


def test_histogram_scores_shifted_images_higher():
    detector = IntensityHistogramDetector().fit(items(brain_like(40, 3)))
    held_out = torch.from_numpy(brain_like(20, 4))
    shifted = {
        "constant": torch.full_like(held_out, 0.5),
        "inverted": 1 - held_out,
        "inverted inside the brain": torch.where(held_out > 1e-3, 1 - held_out, held_out),
    }
    scores_in = detector.predict(held_out).image_score.numpy()
    labels = np.r_[np.zeros(20), np.ones(20)]
    for name, images in shifted.items():
        scores_out = detector.predict(images).image_score.numpy()
        assert roc_auc_score(labels, np.r_[scores_in, scores_out]) == 1.0, name


def test_histogram_options():
    with pytest.warns(UserWarning, match="Quantisation"):
        IntensityHistogramDetector(bins=500)
    with pytest.raises(ValueError, match="bins"):
        IntensityHistogramDetector(bins=1)
    with pytest.raises(ValueError, match="pca"):
        IntensityHistogramDetector(pca=1.5)
    with pytest.raises(ValueError):
        IntensityHistogramDetector(foreground="brain")
    with pytest.raises(ValueError, match="at least 2"):
        IntensityHistogramDetector().fit(items(brain_like(1, 0)))
    with pytest.raises(ValueError, match="exceed"):
        IntensityHistogramDetector(bins=8, pca=20).fit(items(brain_like(5, 0)))
