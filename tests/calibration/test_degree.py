"""monai_ood.calibration.degree: the OOD degree against the true distribution of the scores."""

import numpy as np
import pytest
from scipy import stats

from monai_ood.calibration.degree import DegreeCalibrator


@pytest.mark.parametrize("distribution", [stats.expon(), stats.lognorm(0.6), stats.gamma(3.0)])
def test_the_degree_is_the_fraction_of_in_distribution_scores_below(distribution):
    validation = distribution.rvs(size=1000, random_state=1)
    degree = DegreeCalibrator().fit(validation)
    # the meaning, against the true CDF: on fresh in-distribution scores and far into the tail
    levels = np.array([0.05, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99])
    np.testing.assert_allclose(degree(distribution.ppf(levels)), levels, atol=0.03)
    beyond = distribution.ppf(np.array([0.999, 0.99999]))  # up to past the largest validation score
    assert beyond[-1] > validation.max()
    np.testing.assert_allclose(degree(beyond), [0.999, 0.99999], atol=0.003)
    assert degree(beyond[-1]) > degree(validation.max())  # it keeps rising past the validation maximum
    # the observed fraction of new InD images above each degree threshold is what the degree promises
    test = degree(distribution.rvs(size=5000, random_state=2))
    for threshold in (0.5, 0.8, 0.95):
        assert abs((test > threshold).mean() - (1 - threshold)) < 0.03


def test_the_degree_rises_monotonically_and_never_reaches_one():
    degree = DegreeCalibrator().fit(stats.norm.rvs(size=200, random_state=0))
    top = degree.scores_[-1] + 5 * degree.scale_  # five tail scales past the validation maximum
    grid = np.linspace(-5, top, 4000)
    values = degree(grid)
    assert (np.diff(values) >= -1e-12).all() and values[0] == 0.0 and values[-1] < 1.0
    assert (np.diff(values[grid > degree.scores_[-1]]) > 0).all()  # no plateau at the maximum
    # continuous where the empirical body meets the fitted tail
    u = degree.threshold_
    np.testing.assert_allclose(degree([u - 1e-9, u + 1e-9]), degree.threshold_level_, atol=1e-6)
    assert degree(degree.scores_[-1]) < 1.0 and degree(100.0) > degree(10.0)


def test_round_trip_and_refusals():
    degree = DegreeCalibrator(tail_fraction=0.3).fit(np.arange(50.0) ** 1.5)
    back = DegreeCalibrator.from_dict(degree.to_dict())
    x = np.array([-1.0, 3.0, 100.0, 1e4])
    np.testing.assert_array_equal(back(x), degree(x))
    with pytest.raises(ValueError, match="at least 10"):
        DegreeCalibrator().fit([1.0, 2.0])
    with pytest.raises(ValueError, match="all validation image scores are equal"):
        DegreeCalibrator().fit(np.ones(20))
    with pytest.raises(ValueError, match="finite"):
        DegreeCalibrator().fit([*range(20), float("nan")])
    with pytest.raises(ValueError, match="not fitted"):
        DegreeCalibrator().transform([1.0])
    with pytest.raises(ValueError, match="version"):
        DegreeCalibrator.from_dict({**degree.to_dict(), "version": 2})


def test_calibrate_fits_the_degree_on_the_validation_image_scores_and_score_reports_it(tmp_path):
    """Through a model.pt: calibrate stores the degree of the validation images' own image scores, and
    score_image gives each image the degree of its score (independently: the head's scores by hand)."""
    import SimpleITK as sitk
    import torch

    from monai_ood.calibration import Calibration
    from monai_ood.engines.calibration import calibrate
    from monai_ood.engines.checkpoint import build_network, load_model, make_model_config, save_model
    from monai_ood.inference import score_image
    from monai_ood.preprocessing import SlicePreprocessing

    torch.manual_seed(0)
    config = make_model_config("unet", 2, 1, 3, 8, {"channels": [4, 8, 16], "strides": [2, 2]})
    path = save_model(tmp_path / "model.pt", build_network(config), config, SlicePreprocessing(size=(32, 32)))
    rng = np.random.default_rng(0)
    val = [{"image": rng.random((1, 32, 32), dtype=np.float32)} for _ in range(12)]
    calibrate(path, val, batch_size=5, device="cpu")
    loaded = load_model(path, device="cpu")
    with torch.no_grad():
        images = torch.from_numpy(np.stack([item["image"] for item in val]))
        expected = loaded.net.forward_with_ood(images)[1].image_score.double().numpy()
    np.testing.assert_allclose(loaded.degree.scores_, np.sort(expected), rtol=1e-6)
    record = Calibration.from_dict(torch.load(path, weights_only=True)["calibration"])
    np.testing.assert_array_equal(record.degree.scores_, loaded.degree.scores_)

    volume = sitk.GetImageFromArray(rng.random((4, 32, 32)).astype(np.float32))
    scored = score_image(loaded.net, volume, loaded.preprocessing, loaded.calibrator, 4, None, loaded.degree)
    assert scored.ood_degree == pytest.approx(float(loaded.degree(scored.image_score)))
    assert 0.0 <= scored.ood_degree < 1.0
    for row in scored.slices:
        assert row["ood_degree"] == pytest.approx(float(loaded.degree(row["image_score"])))
    # without enough validation images there is no degree, said in a warning
    with pytest.warns(UserWarning, match="too few for the OOD degree"):
        calibrate(path, val[:5], device="cpu")
    assert load_model(path, device="cpu").degree is None
