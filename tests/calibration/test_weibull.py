"""Tests for the Weibull calibration of score maps (Cho et al. 2023, Eq. 9)."""

import json
import os

import numpy as np
import pytest
import torch
from scipy import stats

from monai_ood.calibration import WeibullCalibrator
from monai_ood.calibration.weibull import NotFittedError


def weibull_sample(shape, scale, n, seed):
    return stats.weibull_min.rvs(shape, scale=scale, size=n, random_state=np.random.default_rng(seed))


def neg_log_likelihood(x, shape, scale):
    return -np.sum(stats.weibull_min.logpdf(x, shape, loc=0, scale=scale))


@pytest.fixture(scope="module")
def fitted():
    return WeibullCalibrator().fit(weibull_sample(1.5, 2.0, 50_000, seed=7))


# ---------------------------------------------------------------- fitting


@pytest.mark.parametrize("shape", [1.5, 3.0])
@pytest.mark.parametrize("scale", [2.0, 50.0])
def test_recovers_known_parameters(shape, scale):
    x = weibull_sample(shape, scale, 200_000, seed=int(shape * 10 + scale))
    cal = WeibullCalibrator().fit(x)
    assert cal.is_fitted
    assert isinstance(cal.shape, float) and isinstance(cal.scale, float)
    assert cal.shape == pytest.approx(shape, rel=0.02)
    assert cal.scale == pytest.approx(scale, rel=0.02)
    assert cal.num_samples == cal.num_fit_samples == 200_000
    assert cal.num_zeros == 0


@pytest.mark.parametrize("shape", [0.5, 1.5, 8.0])
def test_agrees_with_scipy_mle(shape):
    x = weibull_sample(shape, 3.0, 5_000, seed=3)
    cal = WeibullCalibrator().fit(x)
    ref_shape, ref_loc, ref_scale = stats.weibull_min.fit(x, floc=0)
    assert ref_loc == 0
    assert cal.shape == pytest.approx(ref_shape, rel=1e-4)
    assert cal.scale == pytest.approx(ref_scale, rel=1e-4)
    # Our root of the score equation is at least as good a maximum as scipy's optimizer.
    assert neg_log_likelihood(x, cal.shape, cal.scale) <= neg_log_likelihood(x, ref_shape, ref_scale) + 1e-6


def test_float32_torch_and_numpy_inputs_agree():
    x = weibull_sample(2.0, 5.0, 20_000, seed=1)
    a = WeibullCalibrator().fit(x)
    b = WeibullCalibrator().fit(torch.from_numpy(x).reshape(4, 50, 100))
    c = WeibullCalibrator().fit(x.astype(np.float32))
    assert (a.shape, a.scale) == (b.shape, b.scale)
    assert c.shape == pytest.approx(a.shape, rel=1e-5)
    assert c.scale == pytest.approx(a.scale, rel=1e-5)


def test_chunks_equal_concatenation():
    x = weibull_sample(1.5, 2.0, 30_000, seed=2)
    chunks = [x[:1], x[1:10_000], x[10_000:10_000], torch.from_numpy(x[10_000:25_000]), x[25_000:]]
    whole = WeibullCalibrator().fit(x)
    streamed = WeibullCalibrator().fit(iter(chunks))  # a generator-like stream works too
    assert (streamed.shape, streamed.scale, streamed.num_samples) == (
        whole.shape,
        whole.scale,
        whole.num_samples,
    )


def test_chunks_equal_concatenation_when_subsampling():
    x = weibull_sample(3.0, 50.0, 100_000, seed=4)
    whole = WeibullCalibrator(max_samples=10_000, seed=5).fit(x)
    streamed = WeibullCalibrator(max_samples=10_000, seed=5).fit(np.array_split(x, 37))
    assert whole.num_fit_samples == streamed.num_fit_samples == 10_000
    assert whole.num_samples == 100_000
    assert (streamed.shape, streamed.scale) == (whole.shape, whole.scale)
    # Seeded: refitting gives the same result, another seed a (slightly) different subset.
    again = WeibullCalibrator(max_samples=10_000, seed=5).fit(x)
    other = WeibullCalibrator(max_samples=10_000, seed=6).fit(x)
    assert (again.shape, again.scale) == (whole.shape, whole.scale)
    assert other.shape != whole.shape


def test_subsampling_barely_changes_estimate():
    x = weibull_sample(1.5, 2.0, 2_000_000, seed=9).astype(np.float32)
    exact = WeibullCalibrator(max_samples=None).fit(x)
    sub = WeibullCalibrator(max_samples=200_000, seed=0).fit(x)
    assert exact.num_fit_samples == 2_000_000 and sub.num_fit_samples == 200_000
    # Subsampling error of the shape MLE is ~0.78 * k / sqrt(n) ~ 0.17% here.
    assert sub.shape == pytest.approx(exact.shape, rel=0.01)
    assert sub.scale == pytest.approx(exact.scale, rel=0.01)


@pytest.mark.parametrize("seed", [0, 1])
def test_subsample_is_unbiased_for_data_simulated_with_same_seed(seed):
    # Regression: keys from default_rng(seed) equalled the uniforms behind rvs(default_rng(seed)),
    # so bottom-k sampling picked the smallest values (shape 2.2 instead of 1.5).
    x = weibull_sample(1.5, 2.0, 300_000, seed=seed)
    cal = WeibullCalibrator(max_samples=100_000, seed=seed).fit(x)
    assert cal.shape == pytest.approx(1.5, rel=0.02)
    assert cal.scale == pytest.approx(2.0, rel=0.02)


def test_zeros_are_dropped_and_counted():
    x = weibull_sample(2.0, 4.0, 10_000, seed=11)
    with_zeros = np.concatenate([x, np.zeros(500), -np.zeros(3)])
    cal = WeibullCalibrator().fit(with_zeros)
    ref = WeibullCalibrator().fit(x)
    assert cal.num_samples == 10_503 and cal.num_zeros == 503 and cal.num_fit_samples == 10_000
    assert (cal.shape, cal.scale) == pytest.approx((ref.shape, ref.scale), rel=1e-12)


def test_integer_and_list_inputs():
    cal = WeibullCalibrator().fit([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12])
    assert cal.is_fitted and cal.num_samples == 11


def test_extreme_shapes_converge():
    for shape in (0.2, 60.0):
        x = weibull_sample(shape, 1.0, 50_000, seed=13)
        cal = WeibullCalibrator().fit(x)
        assert cal.shape == pytest.approx(shape, rel=0.03)


def test_brentq_fallback_matches_newton(monkeypatch):
    import monai_ood.calibration.weibull as weibull_module

    x = weibull_sample(1.5, 2.0, 20_000, seed=17)
    newton = WeibullCalibrator().fit(x)

    def failing_root_scalar(*args, **kwargs):
        raise RuntimeError("forced failure")

    monkeypatch.setattr(weibull_module.optimize, "root_scalar", failing_root_scalar)
    fallback = WeibullCalibrator().fit(x)
    assert fallback.shape == pytest.approx(newton.shape, rel=1e-9)
    assert fallback.scale == pytest.approx(newton.scale, rel=1e-9)


def test_fit_does_not_modify_input():
    x = np.concatenate([np.zeros(5), weibull_sample(2.0, 1.0, 1_000, seed=0)]).astype(np.float32)
    t = torch.from_numpy(x.copy())
    before = x.copy()
    WeibullCalibrator().fit(x)
    WeibullCalibrator(max_samples=100).fit(t)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(t.numpy(), before)


# ---------------------------------------------------------------- fit errors


@pytest.mark.parametrize(
    "values, match",
    [
        (np.array([]), "empty"),
        ([], "empty"),
        ([np.array([]), torch.zeros(0)], "empty"),
        (np.full(100, 3.5), "constant"),
        (np.zeros(100), "constant"),
        (np.concatenate([np.zeros(10), np.full(10, 2.0)]), "constant"),
        (np.array([1.0, 2.0, np.nan] * 10), "NaN"),
        (np.array([1.0, 2.0, np.inf] * 10), "Inf"),
        (torch.tensor([1.0, float("nan")] * 10), "NaN"),
        ([np.ones(5) * 2, np.array([1.0, -0.5])], "negative.*chunk 1"),
        (np.array([1.0, 2.0, 3.0]), "at least 10"),
        ("scores", "expects an array"),
        (np.array([1 + 2j] * 20), "dtype"),
    ],
)
def test_fit_errors(values, match):
    with pytest.raises(ValueError, match=match):
        WeibullCalibrator().fit(values)


def test_failed_fit_keeps_previous_state(fitted):
    cal = WeibullCalibrator().fit(weibull_sample(2.0, 1.0, 1_000, seed=0))
    shape = cal.shape
    with pytest.raises(ValueError):
        cal.fit(np.array([np.nan]))
    assert cal.shape == shape


def test_constructor_validation():
    with pytest.raises(ValueError, match="max_samples"):
        WeibullCalibrator(max_samples=1)
    with pytest.raises(ValueError, match="min_samples"):
        WeibullCalibrator(min_samples=1)
    with pytest.raises(ValueError, match="max_samples"):
        WeibullCalibrator(max_samples=5, min_samples=10)


# ---------------------------------------------------------------- transform


def test_not_fitted_errors(tmp_path):
    cal = WeibullCalibrator()
    assert not cal.is_fitted
    for call in (
        lambda: cal.transform(np.ones(3)),
        lambda: cal(torch.ones(3)),
        lambda: cal.cdf_threshold(0.5),
        cal.to_dict,
        lambda: cal.save(tmp_path / "w.json"),
    ):
        with pytest.raises(NotFittedError, match="not fitted"):
            call()
    assert issubclass(NotFittedError, RuntimeError)
    assert not os.listdir(tmp_path)


def test_transform_numpy_matches_scipy(fitted):
    x = np.linspace(0.0, 12.0, 1001)
    ref = stats.weibull_min.cdf(x, fitted.shape, loc=0, scale=fitted.scale)
    out = fitted.transform(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == x.shape
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-15)
    out32 = fitted(x.astype(np.float32).reshape(7, 11, 13))
    assert out32.dtype == np.float32 and out32.shape == (7, 11, 13)
    np.testing.assert_allclose(out32.ravel(), ref, atol=1e-6)


@pytest.mark.parametrize(
    "dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.float16, 2e-3)]
)
def test_transform_torch_matches_scipy(fitted, dtype, atol):
    x = torch.linspace(0.0, 12.0, 1000, dtype=torch.float64).reshape(10, 1, 100)
    ref = stats.weibull_min.cdf(x.to(dtype).double().numpy(), fitted.shape, loc=0, scale=fitted.scale)
    out = fitted.transform(x.to(dtype))
    assert isinstance(out, torch.Tensor)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    np.testing.assert_allclose(out.double().numpy(), ref, atol=atol, rtol=0)


def test_transform_range_monotone_and_edge_values(fitted):
    x = np.concatenate([[-5.0, -0.0, 0.0], np.geomspace(1e-6, 1e3, 500), [np.inf]])
    out = fitted.transform(x)
    assert np.all((out >= 0) & (out <= 1))
    assert np.all(np.diff(out) >= 0)
    assert out[0] == 0 and out[1] == 0 and out[2] == 0 and out[-1] == 1
    t = fitted.transform(torch.from_numpy(x).float())
    assert torch.all((t >= 0) & (t <= 1)) and torch.all(t.diff() >= 0)
    assert t[0] == 0 and t[-1] == 1


def test_transform_scalars_and_ints(fitted):
    assert isinstance(fitted.transform(2.0), float)
    assert fitted.transform(2.0) == pytest.approx(
        stats.weibull_min.cdf(2.0, fitted.shape, scale=fitted.scale)
    )
    assert isinstance(fitted.transform(np.float32(2.0)), np.float32)
    assert fitted.transform(torch.arange(4)).dtype == torch.get_default_dtype()
    assert fitted.transform(np.arange(4)).dtype == np.float64


def test_transform_nan_raises(fitted):
    with pytest.raises(ValueError, match="NaN"):
        fitted.transform(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="NaN"):
        fitted(torch.tensor([[0.5, float("nan")]]))


def test_transform_is_differentiable(fitted):
    x = torch.tensor([0.5, 1.0, 3.0], requires_grad=True)
    fitted(x).sum().backward()
    expected = stats.weibull_min.pdf(x.detach().numpy(), fitted.shape, scale=fitted.scale)
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-5)


def test_cdf_threshold_is_quantile(fitted):
    for p in (0.01, 0.5, 0.9, 0.999):
        q = fitted.cdf_threshold(p)
        assert q == pytest.approx(stats.weibull_min.ppf(p, fitted.shape, scale=fitted.scale), rel=1e-12)
        assert fitted.transform(q) == pytest.approx(p, rel=1e-12)
    assert fitted.cdf_threshold(0.0) == 0.0
    assert fitted.cdf_threshold(1.0) == float("inf")
    for bad in (-0.1, 1.01, float("nan"), "high"):
        with pytest.raises(ValueError, match="probability"):
            fitted.cdf_threshold(bad)


# ---------------------------------------------------------------- serialisation


def test_dict_and_json_round_trip(fitted, tmp_path):
    d = fitted.to_dict()
    assert d["type"] == "weibull_min" and d["loc"] == 0.0 and d["version"] == 1
    assert d["shape"] == fitted.shape and d["scale"] == fitted.scale and d["num_samples"] == 50_000
    path = tmp_path / "weibull.json"
    fitted.save(path)
    assert json.loads(path.read_text()) == d
    assert os.listdir(tmp_path) == ["weibull.json"]  # no temp file left behind
    loaded = WeibullCalibrator.load(str(path))
    assert loaded.to_dict() == d
    x = np.linspace(0, 10, 50)
    np.testing.assert_array_equal(loaded(x), fitted(x))
    assert WeibullCalibrator.from_dict(d).to_dict() == d
    fitted.save(path)  # overwriting an existing file works
    assert WeibullCalibrator.load(path).to_dict() == d


def test_load_errors(fitted, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        WeibullCalibrator.load(tmp_path / "missing.json")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        WeibullCalibrator.load(bad_json)
    not_object = tmp_path / "list.json"
    not_object.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        WeibullCalibrator.load(not_object)

    good = fitted.to_dict()
    cases = [
        ({k: v for k, v in good.items() if k != "scale"}, "missing key"),
        ({**good, "shape": 0.0}, "'shape' must be a finite number > 0"),
        ({**good, "scale": -1.0}, "'scale' must be a finite number > 0"),
        ({**good, "shape": "1.5"}, "'shape'"),
        ({**good, "shape": True}, "'shape'"),
        ({**good, "type": "gumbel"}, "type"),
        ({**good, "version": 99}, "version"),
        ({**good, "loc": 1.0}, "'loc'"),
        ({**good, "num_samples": -3}, "num_samples"),
    ]
    for i, (d, match) in enumerate(cases):
        path = tmp_path / f"case{i}.json"
        path.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=match):
            WeibullCalibrator.load(path)
        with pytest.raises(ValueError, match=match):
            WeibullCalibrator.from_dict(d)
    # Non-finite values written by hand (JSON extension NaN/Infinity) are rejected too.
    path = tmp_path / "inf.json"
    path.write_text(json.dumps({**good, "scale": float("inf")}))
    with pytest.raises(ValueError, match="'scale'"):
        WeibullCalibrator.load(path)


def test_repr(fitted):
    assert "not fitted" in repr(WeibullCalibrator())
    assert "shape=" in repr(fitted)
