"""Property tests: the chi-square inclusion terms stay finite, signed, monotone and accurate in float32.

``log_prob_inclusion(d, N) = log Q(N/2, d/2)`` (the chi-square log survival function with ``N`` degrees
of freedom) and ``log_prob_exclusion(d, N) = log P(N/2, d/2)`` (its log CDF), where ``d`` is the
*squared* Mahalanobis distance, so ``scipy.stats.chi2(N).logsf(d)`` is the reference with no square or
square root. Distances span 0, subnormal, tiny and huge float32 values up to 1e30; the degrees of freedom
span [1, 1e5]. References are independent of the module: scipy where it is finite, mpmath (50 digits)
everywhere, and the analytic derivative ``d/dd log Q = -f / (2 Q)`` (``f`` the Gamma(N/2) density at d/2).
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

from monai_ood.losses import DISTANCE_FLOOR, OutlierExposureLoss, log_prob_exclusion, log_prob_inclusion

mpmath.mp.dps = 50
FLOAT32_TINY = float(np.finfo(np.float32).smallest_subnormal)
FLOOR32 = float(np.nextafter(np.float32(DISTANCE_FLOOR), np.float32(0)))  # below float32(1e-20)
D_MAX = float(np.float32(1e30))  # 1e30 as float32 (1.0000000150e30)

# degrees of freedom: integers (embedding sizes) and arbitrary reals in [1, 1e5], with the edges
dofs = st.one_of(
    st.sampled_from([1, 2, 3, 1e5]),
    st.integers(1, 100_000),
    st.floats(1.0, 1e5, allow_nan=False, allow_infinity=False),
)


def _as_float32(value: float) -> float:
    return float(np.float32(value))


# distances: log-uniform magnitudes over 0 ... 1e30 plus exact zeros, subnormals and the clamp floor
log_magnitudes = st.floats(-45.0, 30.0).map(lambda e: min(_as_float32(10.0**e), D_MAX))
plain = st.floats(0.0, D_MAX, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
edges = st.sampled_from([0.0, FLOAT32_TINY, 1e-30, _as_float32(DISTANCE_FLOOR), 1.0, D_MAX])
distances = st.one_of(log_magnitudes, plain, edges)
distance_lists = st.lists(distances, min_size=1, max_size=12)


def _evaluate(fn, values, dof):
    d = torch.tensor(values, dtype=torch.float32, requires_grad=True)
    out = fn(d, dof)
    (grad,) = torch.autograd.grad(out.sum(), d)
    assert out.dtype == torch.float32 and out.shape == d.shape
    return out.detach().double().numpy(), grad.double().numpy()


def _mp_reference(distance: float, dof: float, upper: bool) -> tuple[float, float]:
    """``(log Q or log P, its derivative w.r.t. d)`` at 50 digits, with the module's clamp at the floor."""
    clamped = max(distance, DISTANCE_FLOOR)
    a, x = mpmath.mpf(dof) / 2, mpmath.mpf(clamped) / 2
    # each tail from the expansion mpmath converges on (lower series below the mean, upper above),
    # the other as its complement (50 digits are plenty for log1p of a tiny complement)
    if x < a:
        lower = mpmath.gammainc(a, 0, x, regularized=True)
        log_tail = mpmath.log1p(-lower) if upper else mpmath.log(lower)
    else:
        upper_tail = mpmath.gammainc(a, x, mpmath.inf, regularized=True)
        log_tail = mpmath.log(upper_tail) if upper else mpmath.log1p(-upper_tail)
    log_density = (a - 1) * mpmath.log(x) - x - mpmath.loggamma(a)
    slope = mpmath.exp(log_density - log_tail) / 2
    if distance < DISTANCE_FLOOR:
        slope = mpmath.mpf(0)  # clamped: constant below the floor
    return float(log_tail), float(-slope if upper else slope)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(values=distance_lists, dof=dofs)
@example(values=[0.0, FLOAT32_TINY, 1e-20, 1.0, 1e15, 1e18, 1e30], dof=1)
@example(values=[0.0, 1e-30, 1e5, 1e30], dof=1e5)
def test_values_and_gradients_are_finite_and_signed(values, dof):
    inc, inc_grad = _evaluate(log_prob_inclusion, values, dof)
    exc, exc_grad = _evaluate(log_prob_exclusion, values, dof)
    for array in (inc, inc_grad, exc, exc_grad):
        assert np.isfinite(array).all(), (values, dof, array)
    # probabilities: both logs are <= 0; inclusion falls and exclusion rises with the distance
    assert (inc <= 0).all() and (exc <= 0).all()
    assert (inc_grad <= 0).all() and (exc_grad >= 0).all()
    # below the clamp the functions are constant: zero gradient (the float32 value nearest the floor,
    # 9.99999968e-21 < 1e-20, is left to test_gradient_is_zero_wherever_the_forward_is_clamped)
    below = np.asarray(values) < FLOOR32
    assert (inc_grad[below] == 0).all() and (exc_grad[below] == 0).all()


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    values=st.lists(
        st.floats(0.0, _as_float32(DISTANCE_FLOOR), width=32, allow_subnormal=True), min_size=1, max_size=6
    ),
    dof=dofs,
)
@example(values=[_as_float32(DISTANCE_FLOOR)], dof=1)
def test_gradient_is_zero_wherever_the_forward_is_clamped(values, dof):
    clamped = [v for v in values if v < DISTANCE_FLOOR]  # as the forward decides, in float64
    for fn in (log_prob_inclusion, log_prob_exclusion):
        out, grad = _evaluate(fn, clamped, dof)
        at_floor, _ = _evaluate(fn, [DISTANCE_FLOOR], dof)
        assert (out == at_floor[0]).all()
        assert (grad == 0).all(), (clamped, grad)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(values=st.lists(distances, min_size=2, max_size=30), dof=dofs)
def test_inclusion_is_non_increasing_and_exclusion_non_decreasing(values, dof):
    ordered = sorted(values)
    inc, _ = _evaluate(log_prob_inclusion, ordered, dof)
    exc, _ = _evaluate(log_prob_exclusion, ordered, dof)
    assert (np.diff(inc) <= 0).all(), (ordered, inc)
    assert (np.diff(exc) >= 0).all(), (ordered, exc)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(values=distance_lists, dof=dofs)
def test_inclusion_and_exclusion_are_complementary(values, dof):
    inc, _ = _evaluate(log_prob_inclusion, values, dof)
    exc, _ = _evaluate(log_prob_exclusion, values, dof)
    # P_I + (1 - P_I) = 1, checked in log space (valid everywhere) and in linear space where representable
    np.testing.assert_allclose(np.logaddexp(inc, exc), 0.0, atol=1e-6)
    representable = (inc > -80) & (exc > -80)
    np.testing.assert_allclose((np.exp(inc) + np.exp(exc))[representable], 1.0, atol=1e-6)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    dof=dofs,
    z_scores=st.lists(st.floats(-6.0, 6.0), min_size=1, max_size=8),
    small=st.lists(st.floats(1e-3, 50.0), max_size=4),
)
def test_matches_scipy_chi2_where_scipy_is_finite(dof, z_scores, small):
    """``d`` is the squared Mahalanobis distance: compare to ``chi2(N).logsf(d)`` and ``.logcdf(d)`` directly."""
    # moderate distances around the chi-square bulk (mean N, sd sqrt(2N)), where scipy can compute
    values = [_as_float32(max(dof + z * math.sqrt(2 * dof), 1e-3)) for z in z_scores] + [
        _as_float32(v) for v in small
    ]
    d = np.asarray(values, dtype=np.float64)
    for fn, reference in ((log_prob_inclusion, stats.chi2.logsf), (log_prob_exclusion, stats.chi2.logcdf)):
        got, _ = _evaluate(fn, values, dof)
        expected = reference(d, dof)
        finite = np.isfinite(expected) & (expected > -700)
        np.testing.assert_allclose(got[finite], expected[finite], rtol=2e-6, atol=1e-6)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(values=st.lists(distances, min_size=1, max_size=6), dof=dofs)
@example(values=[0.0, 1e-20, 1e15, 1e18, 1e30], dof=1)
def test_values_match_arbitrary_precision_over_the_whole_range(values, dof):
    for fn, upper in ((log_prob_inclusion, True), (log_prob_exclusion, False)):
        got, _ = _evaluate(fn, values, dof)
        expected = np.array([_mp_reference(v, dof, upper)[0] for v in values])
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6, err_msg=f"upper={upper}, N={dof}")


def _check_gradients(values, dof):
    for fn, upper in ((log_prob_inclusion, True), (log_prob_exclusion, False)):
        _, grad = _evaluate(fn, values, dof)
        # the forward pass clamps at 1e-20 in float64: below it (float32(1e-20) included) the value is
        # constant and its gradient 0
        expected = np.array(
            [0.0 if float(np.float32(v)) < 1e-20 else _mp_reference(v, dof, upper)[1] for v in values]
        )
        np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-7, err_msg=f"upper={upper}, N={dof}")


gradient_distances = st.one_of(
    st.floats(-45.0, 12.0).map(lambda e: _as_float32(10.0**e)),
    st.sampled_from([0.0, FLOAT32_TINY, 1e-20, 0.5, 1e12]),
)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(values=st.lists(gradient_distances, min_size=1, max_size=6), dof=dofs)
@example(values=[1e-20, 1e-5, 0.5, 1.0, 300.0, 1e6, 1e12], dof=1)
@example(values=[5e4, 1e5, 1.5e5, 1e12], dof=1e5)
def test_gradients_match_the_analytic_derivative_up_to_1e12(values, dof):
    """``d/dd log Q(N/2, d/2) = -f(d/2) / (2 Q)`` (and ``+f / (2 P)`` for the CDF), to 1e-3 relative."""
    _check_gradients(values, dof)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    values=st.lists(st.floats(13.0, 30.0).map(lambda e: _as_float32(10.0**e)), min_size=1, max_size=6),
    dof=dofs,
)
@example(values=[1e18], dof=1)
def test_gradients_match_the_analytic_derivative_beyond_1e13(values, dof):
    _check_gradients(values, dof)


# ---------------------------------------------------------------------------------------------------
# OutlierExposureLoss on extreme finite distances
# ---------------------------------------------------------------------------------------------------


@st.composite
def loss_inputs(draw):
    batch, outlier_batch = draw(st.integers(1, 2)), draw(st.integers(0, 2))
    classes = draw(st.integers(2, 4))
    grid = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    factor = draw(st.sampled_from([1, 2, 4]))  # labels at the feature grid size or finer
    magnitude = st.one_of(log_magnitudes, edges)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def field(b):
        n = b * classes * grid[0] * grid[1]
        values = draw(st.lists(magnitude, min_size=n, max_size=n)) if n <= 24 else None
        if values is None:  # larger tensors: random magnitudes from the drawn seed
            values = (10.0 ** rng.uniform(-45, 30, n)).clip(0, D_MAX) * (rng.random(n) > 0.1)
        return torch.tensor(np.asarray(values, dtype=np.float32).reshape(b, classes, *grid))

    distances = field(batch)
    outliers = field(outlier_batch) if outlier_batch else None
    labels = torch.as_tensor(
        rng.integers(0, classes, (batch, 1, grid[0] * factor, grid[1] * factor)), dtype=torch.float32
    )
    num_dims = draw(st.sampled_from([1, 2, 16, 256, 2048, 100_000]))
    return distances, labels, outliers, num_dims, draw(st.booleans())


@settings(max_examples=15, deadline=None, derandomize=True)
@given(inputs=loss_inputs())
def test_outlier_exposure_loss_is_finite_with_finite_gradients(inputs):
    distances, labels, outliers, num_dims, class_balanced = inputs
    loss_fn = OutlierExposureLoss(num_dims=num_dims, class_balanced=class_balanced)
    d = distances.clone().requires_grad_(True)
    o = None if outliers is None else outliers.clone().requires_grad_(True)
    loss = loss_fn(d, labels, o)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert torch.isfinite(loss), (loss, distances, outliers)
    # -log(mean P_I) >= 0 and -log(1 - mean P_I) >= 0
    assert float(loss.detach()) >= -1e-6
    leaves = [d] if o is None else [d, o]
    grads = torch.autograd.grad(loss, leaves)
    for grad in grads:
        assert torch.isfinite(grad).all(), grads
    # the inlier term only pushes the own-class distance down, the outlier term only pushes distances up
    assert (grads[0] >= 0).all()
    if o is not None:
        assert (grads[1] <= 0).all()
    # float32 and float64 inputs give the same loss (the tails are computed in float64 either way)
    loss64 = loss_fn(distances.double(), labels, None if outliers is None else outliers.double())
    assert float(loss.detach()) == pytest.approx(float(loss64), rel=1e-5, abs=1e-5)
