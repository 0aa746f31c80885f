import mpmath
import numpy as np
import pytest
import torch
from scipy import stats

from monai_ood.losses import DISTANCE_FLOOR, log_prob_exclusion, log_prob_inclusion

mpmath.mp.dps = 50
DOFS = [2, 3, 16, 64, 256, 1024, 2048]
GRID = np.concatenate([[1e-12, 1e-3, 0.5], np.logspace(0, 6, 31)])


def _mp_log(distance: float, dof: int, upper: bool) -> float:
    a, x = mpmath.mpf(dof) / 2, mpmath.mpf(distance) / 2
    value = (
        mpmath.gammainc(a, x, mpmath.inf, regularized=True)
        if upper
        else mpmath.gammainc(a, 0, x, regularized=True)
    )
    return float(mpmath.log(value))


@pytest.mark.parametrize("dof", DOFS)
def test_matches_scipy_where_scipy_is_finite(dof):
    d = torch.tensor(GRID, dtype=torch.float64)
    for ours, ref in ((log_prob_inclusion, stats.chi2.logsf), (log_prob_exclusion, stats.chi2.logcdf)):
        expected = ref(GRID, dof)
        finite = np.isfinite(expected)
        assert finite.sum() >= 5
        np.testing.assert_allclose(ours(d, dof).numpy()[finite], expected[finite], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dof", DOFS)
@pytest.mark.parametrize("upper", [True, False])
def test_float32_matches_arbitrary_precision_on_the_whole_grid(dof, upper):
    """scipy's logsf is -inf beyond D ~ 1e4 (it takes log of an underflowed sf); mpmath is exact."""
    d32 = torch.tensor(GRID, dtype=torch.float32)
    got = (log_prob_inclusion if upper else log_prob_exclusion)(d32, dof).double().numpy()
    expected = np.array([_mp_log(float(v), dof, upper) for v in d32.double()])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dof", [2, 256, 2048])
@pytest.mark.parametrize("upper", [True, False])
def test_gradient_matches_high_precision_finite_differences(dof, upper):
    points = np.array([0.3, 2.0, dof * 0.5, float(dof), dof * 1.5, dof * 4.0, 800.0, 5e4, 1e6])
    d = torch.tensor(points, dtype=torch.float32, requires_grad=True)
    (log_prob_inclusion if upper else log_prob_exclusion)(d, dof).sum().backward()
    assert torch.isfinite(d.grad).all()
    for value, grad in zip(d.detach().double().tolist(), d.grad.double().tolist(), strict=True):
        h = 1e-6 * max(1.0, value)
        fd = (_mp_log(value + h, dof, upper) - _mp_log(value - h, dof, upper)) / (2 * h)
        assert grad == pytest.approx(fd, rel=1e-4, abs=1e-9), (value, grad, fd)


def test_gradcheck_float64():
    d = torch.tensor([0.5, 3.0, 20.0, 300.0, 4000.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: log_prob_inclusion(x, 16), (d,))
    assert torch.autograd.gradcheck(lambda x: log_prob_exclusion(x, 16), (d,))


def test_naive_float32_form_fails_where_ours_holds():
    """The reason this module exists: gammaincc in float32 underflows at D ~ 800 for N = 256."""
    d = torch.tensor([900.0, 1e4, 1e6], requires_grad=True)
    naive = torch.special.gammaincc(torch.tensor(128.0), d / 2)
    assert (naive == 0).all()
    ours = log_prob_inclusion(d, 256)
    ours.sum().backward()
    assert torch.isfinite(ours).all() and (d.grad < 0).all()
    # deep in the upper tail d/dD log Q(N/2, D/2) -> -1/2
    assert float(d.grad[-1]) == pytest.approx(-0.5, rel=1e-3)


def test_zero_distance_is_finite_and_shapes_broadcast():
    d = torch.zeros(2, 3, 4, 5, requires_grad=True)
    lo, hi = log_prob_exclusion(d, 256), log_prob_inclusion(d, 256)
    (lo.sum() + hi.sum()).backward()
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all() and torch.isfinite(d.grad).all()
    assert lo.shape == d.shape and float(hi.detach().max()) == 0.0
    assert float(lo.detach().max()) == pytest.approx(_mp_log(DISTANCE_FLOOR, 256, False), rel=1e-6)
    dof = torch.tensor([2.0, 16.0, 256.0]).view(1, 3, 1, 1)
    x = torch.full((2, 3, 4, 5), 10.0, requires_grad=True)
    v = log_prob_inclusion(x, dof)
    v.sum().backward()
    assert v.shape == x.shape and x.grad.shape == x.shape
    assert float(v.detach()[0, 1, 0, 0]) == pytest.approx(stats.chi2.logsf(10.0, 16), rel=1e-5)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="degrees of freedom"):
        log_prob_inclusion(torch.ones(3), 0)
    with pytest.raises(TypeError, match="floating-point"):
        log_prob_inclusion(torch.ones(3, dtype=torch.long), 4)
