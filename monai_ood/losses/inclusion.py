"""Log probability of inclusion (paper eq. 7) in log space.

``P_I(D) = Gamma(N/2, D/2) / Gamma(N/2) = Q(N/2, D/2)`` is the chi-square survival function with ``N``
degrees of freedom; its complement ``1 - P_I = P(N/2, D/2)`` is the chi-square CDF.

Why not ``torch.special.gammaincc``: in float32 it underflows to 0 near ``D = 800`` for ``N = 256``,
which zeroes the gradient and makes ``-log P_I`` infinite exactly for the outliers the loss must push
away. Here both logs are computed in float64 from the regularised incomplete gammas where those are
representable, and from the Legendre continued fraction (upper tail) or the power series (lower tail)
in log form where they underflow; gradients are analytic:

    d/dD log Q(a, D/2) = -1/2 * exp(log f(D/2) - log Q),    f = the Gamma(a, 1) density,
    d/dD log P(a, D/2) = +1/2 * exp(log f(D/2) - log P),

so they stay finite (tending to -1/2 for the upper tail) wherever the values themselves are tiny.
Distances below ``DISTANCE_FLOOR`` are clamped to it, so ``log P`` is finite (and very negative) at
``D = 0`` instead of ``-inf``; the gradient there is 0.
"""

from __future__ import annotations

import torch

__all__ = ["log_prob_inclusion", "log_prob_exclusion", "DISTANCE_FLOOR"]

DISTANCE_FLOOR = 1e-20
# Below this, float64 regularised gammas are subnormal or 0: switch to the log-form expansions.
_UNDERFLOW = 1e-290
_ITERATIONS = 200  # upper bound; both expansions stop once converged to _TOLERANCE
_FPMIN = 1e-300
_TOLERANCE = 1e-16


def _log_upper_continued_fraction(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log Q(a, x) by the modified Lentz continued fraction (Numerical Recipes ``gcf``), for x > a + 1."""
    b = x + 1.0 - a
    c = torch.full_like(x, 1.0 / _FPMIN)
    d = 1.0 / b
    h = d
    for i in range(1, _ITERATIONS + 1):
        an = -i * (i - a)
        b = b + 2.0
        d = an * d + b
        d = torch.where(d.abs() < _FPMIN, torch.full_like(d, _FPMIN), d)
        c = b + an / c
        c = torch.where(c.abs() < _FPMIN, torch.full_like(c, _FPMIN), c)
        d = 1.0 / d
        step = d * c
        h = h * step
        # deep in the tail the fraction converges in a few terms: stop early (a sync every 8 terms)
        if i % 8 == 0 and bool(((step - 1.0).abs() < _TOLERANCE).all()):
            break
    return -x + a * torch.log(x) - torch.lgamma(a) + torch.log(h)


def _log_lower_series(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log P(a, x) by its power series (Numerical Recipes ``gser``), for x < a + 1."""
    term = 1.0 / a
    total = term
    ap = a
    for i in range(1, _ITERATIONS + 1):
        ap = ap + 1.0
        term = term * x / ap
        total = total + term
        if i % 8 == 0 and bool((term < _TOLERANCE * total).all()):
            break
    return -x + a * torch.log(x) - torch.lgamma(a) + torch.log(total)


def _log_regularised_gamma(a: torch.Tensor, x: torch.Tensor, upper: bool) -> torch.Tensor:
    lower_value = torch.special.gammainc(a, x)
    upper_value = torch.special.gammaincc(a, x)
    # log1p of the complement is more accurate than log of a value close to 1.
    if upper:
        out = torch.where(lower_value < 0.5, torch.log1p(-lower_value), torch.log(upper_value))
        underflow = upper_value < _UNDERFLOW
        expansion = _log_upper_continued_fraction
    else:
        out = torch.where(upper_value < 0.5, torch.log1p(-upper_value), torch.log(lower_value))
        underflow = lower_value < _UNDERFLOW
        expansion = _log_lower_series
    if bool(underflow.any()):
        out = out.masked_scatter(underflow, expansion(a[underflow], x[underflow]))
    return out


class _LogChiSquareTail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, distance: torch.Tensor, num_dims: torch.Tensor, upper: bool) -> torch.Tensor:
        x = distance.detach().double().clamp_min(DISTANCE_FLOOR) / 2.0
        a, x = torch.broadcast_tensors(num_dims.double() / 2.0, x)
        value = _log_regularised_gamma(a, x, upper)
        ctx.upper = upper
        ctx.save_for_backward(distance, a, x, value)
        return value.to(distance.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        distance, a, x, value = ctx.saved_tensors
        log_density = (a - 1.0) * torch.log(x) - x - torch.lgamma(a)
        log_ratio = log_density - value  # log(density / tail)
        if ctx.upper:
            # far in the upper tail both terms are about -x and their difference is lost to rounding
            # (x > 1e13); there Q(a, x) = density * (1 + (a-1)/x + (a-1)(a-2)/x^2 + ...), so use the series
            far = (x > 1e8) & (x > 100.0 * a)
            series = -torch.log1p((a - 1.0) / x + (a - 1.0) * (a - 2.0) / (x * x))
            log_ratio = torch.where(far, series, log_ratio)
        slope = 0.5 * torch.exp(log_ratio)
        slope = -slope if ctx.upper else slope
        # the forward pass clamps in float64: compare there too (float32(1e-20) is below the floor)
        slope = torch.where(distance.double() >= DISTANCE_FLOOR, slope, torch.zeros_like(slope))
        grad = grad_output.double() * slope
        # reduce over dimensions broadcast from num_dims
        while grad.dim() > distance.dim():
            grad = grad.sum(0)
        for dim, size in enumerate(distance.shape):
            if size == 1 and grad.shape[dim] != 1:
                grad = grad.sum(dim, keepdim=True)
        return grad.to(distance.dtype), None, None


def _prepare(distance: torch.Tensor, num_dims) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(distance, torch.Tensor) or not distance.is_floating_point():
        raise TypeError(f"distance must be a floating-point tensor, got {type(distance).__name__}")
    num_dims_t = torch.as_tensor(num_dims, dtype=torch.float64, device=distance.device)
    if not torch.isfinite(num_dims_t).all() or (num_dims_t <= 0).any():
        raise ValueError(
            f"num_dims (chi-square degrees of freedom) must be positive and finite, got {num_dims!r}"
        )
    return distance, num_dims_t


def log_prob_inclusion(distance: torch.Tensor, num_dims) -> torch.Tensor:
    """``log P_I(D) = log Q(N/2, D/2)``: the log chi-square survival function, elementwise (paper eq. 7).

    Args:
        distance: squared Mahalanobis distances ``D >= 0``, any shape, float16/32/64.
        num_dims: degrees of freedom ``N`` (the embedding size ``c_g``); a number or a tensor that
            broadcasts against ``distance``.

    Returns:
        A tensor of ``distance``'s shape and dtype, finite for ``D`` in ``[0, 1e6]`` and ``N`` in
        ``[2, 2048]`` (in float32 too), with finite gradients w.r.t. ``distance``.

    Example:
        >>> log_prob_inclusion(torch.tensor([0.0, 256.0, 1e6]), 256)  # ~[0, log 0.49, -4.9e5]
    """
    distance, num_dims_t = _prepare(distance, num_dims)
    return _LogChiSquareTail.apply(distance, num_dims_t, True)


def log_prob_exclusion(distance: torch.Tensor, num_dims) -> torch.Tensor:
    """``log(1 - P_I(D)) = log P(N/2, D/2)``: the log chi-square CDF, elementwise; see :func:`log_prob_inclusion`."""
    distance, num_dims_t = _prepare(distance, num_dims)
    return _LogChiSquareTail.apply(distance, num_dims_t, False)
