"""A single Gaussian's pieces shared by the Mahalanobis detector and the head's Gaussian term."""

from __future__ import annotations

import torch

__all__ = ["cholesky_with_ridge", "mahalanobis_distance"]


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
