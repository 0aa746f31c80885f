"""A single Gaussian's pieces shared by the Mahalanobis detector and the head's Gaussian term."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = ["ShrunkGaussian", "cholesky_with_ridge", "fit_shrunk_gaussian", "mahalanobis_distance"]


class ShrunkGaussian(NamedTuple):
    """A fitted Gaussian: float64 CPU ``mean`` ``(D,)``, ``covariance`` ``(D, D)``, its lower ``cholesky``
    factor, and the Ledoit-Wolf ``shrinkage`` intensity in ``[0, 1]``."""

    mean: torch.Tensor
    covariance: torch.Tensor
    cholesky: torch.Tensor
    shrinkage: float


def fit_shrunk_gaussian(x) -> ShrunkGaussian:
    """Mean and Ledoit-Wolf shrunk covariance (:class:`sklearn.covariance.LedoitWolf`, towards
    ``(trace / D) * I`` with the analytically optimal intensity) of ``x`` ``(N, D)``, in float64.

    Shrinkage is what makes ``D`` comparable to or larger than ``N`` usable (the sample covariance is then
    singular). The one fit behind every Gaussian of the project (the head's Gaussian term and the
    Mahalanobis, feature-statistics and intensity-histogram detectors)."""
    from sklearn.covariance import LedoitWolf  # deferred: keep networks importable without scikit-learn

    x = np.asarray(x, dtype=np.float64)
    estimator = LedoitWolf(assume_centered=False).fit(x)
    covariance = torch.from_numpy(np.asarray(estimator.covariance_, dtype=np.float64)).clone()
    return ShrunkGaussian(
        torch.from_numpy(np.asarray(estimator.location_, dtype=np.float64)).clone(),
        covariance,
        cholesky_with_ridge(covariance),
        float(estimator.shrinkage_),
    )


def cholesky_with_ridge(covariance: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a float64 covariance; adds a small ridge if round-off left it singular."""
    chol, info = torch.linalg.cholesky_ex(covariance)
    if int(info) == 0:
        return chol
    dim = covariance.shape[0]
    scale = max(float(torch.diagonal(covariance).mean()), 1e-12)
    eye = torch.eye(dim, dtype=covariance.dtype, device=covariance.device)
    for ridge in (1e-10, 1e-8, 1e-6, 1e-4):
        chol, info = torch.linalg.cholesky_ex(covariance + ridge * scale * eye)
        if int(info) == 0:
            return chol
    raise ValueError(
        "the feature covariance is not positive definite even with a ridge; are the features constant?"
    )


def mahalanobis_distance(vectors: torch.Tensor, mean: torch.Tensor, cholesky: torch.Tensor) -> torch.Tensor:
    """``sqrt((z - mean)^T Sigma^-1 (z - mean))`` of ``vectors`` ``(N, D)`` in float64: ``(N,)``, with
    ``Sigma = cholesky @ cholesky.T`` (one triangular solve, no inverse)."""
    centred = (vectors.double() - mean).T  # (D, N)
    whitened = torch.linalg.solve_triangular(cholesky, centred, upper=False)
    return whitened.square().sum(dim=0).sqrt()
