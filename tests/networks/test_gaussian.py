"""The single Gaussian of the head's Gaussian term and the Mahalanobis detectors (monai_ood.networks.gaussian):
the Ledoit-Wolf fit against the closed-form estimator computed here in float64 numpy, the Mahalanobis
distance against an explicit inverse, and the ridge that rescues a covariance round-off left singular."""

import numpy as np
import pytest
import torch

from monai_ood.networks.gaussian import cholesky_with_ridge, fit_shrunk_gaussian, mahalanobis_distance


def ledoit_wolf_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Ledoit & Wolf (2004): S shrunk towards m I with intensity min(b2, d2) / d2, in float64."""
    n, p = x.shape
    mean = x.mean(axis=0)
    centred = x - mean
    sample = centred.T @ centred / n
    m = np.trace(sample) / p
    d2 = np.sum((sample - m * np.eye(p)) ** 2) / p
    b2 = sum(np.sum((np.outer(row, row) - sample) ** 2) for row in centred) / n**2 / p
    shrinkage = min(b2, d2) / d2
    return mean, shrinkage * m * np.eye(p) + (1 - shrinkage) * sample, shrinkage


def test_shrunk_gaussian_and_mahalanobis_distance_match_float64_references():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 10)) @ rng.standard_normal(
        (10, 10)
    )  # D > N: the sample covariance is singular
    mean, covariance, shrinkage = ledoit_wolf_reference(x)
    fitted = fit_shrunk_gaussian(x.astype(np.float32))
    assert fitted.mean.dtype == fitted.covariance.dtype == fitted.cholesky.dtype == torch.float64
    np.testing.assert_allclose(fitted.mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(fitted.covariance.numpy(), covariance, rtol=1e-5, atol=1e-9)
    assert 0 < fitted.shrinkage < 1 and fitted.shrinkage == pytest.approx(shrinkage, rel=1e-5)
    chol = fitted.cholesky.numpy()
    np.testing.assert_array_equal(chol, np.tril(chol))
    np.testing.assert_allclose(chol @ chol.T, fitted.covariance.numpy(), rtol=1e-10, atol=1e-12)

    queries = rng.standard_normal((5, 10)) * 3
    diff = queries - fitted.mean.numpy()
    expected = np.sqrt(np.einsum("nd,de,ne->n", diff, np.linalg.inv(fitted.covariance.numpy()), diff))
    got = mahalanobis_distance(torch.from_numpy(queries).float(), fitted.mean, fitted.cholesky)
    assert got.shape == (5,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(mahalanobis_distance(fitted.mean[None], fitted.mean, fitted.cholesky), [0.0])


def test_cholesky_with_ridge():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 4))
    positive = torch.from_numpy(a @ a.T + np.eye(4))
    np.testing.assert_allclose(cholesky_with_ridge(positive).numpy(), np.linalg.cholesky(positive.numpy()))
    v = rng.standard_normal(4)
    singular = np.outer(v, v) - 1e-13 * np.eye(4)  # rank one, pushed just below zero as round-off does
    scale = np.trace(singular) / 4
    got = cholesky_with_ridge(torch.from_numpy(singular)).numpy()  # the smallest ridge that is enough
    np.testing.assert_allclose(got, np.linalg.cholesky(singular + 1e-10 * scale * np.eye(4)), rtol=1e-6)
    with pytest.raises(ValueError, match="not positive definite even with a ridge"):
        cholesky_with_ridge(-torch.eye(3, dtype=torch.float64))
