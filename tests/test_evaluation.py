import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from monai_ood.evaluation import dice_per_class, ood_metrics


def test_ood_metrics_known_answers_and_sklearn():
    ind = np.array([0.1, 0.2, 0.3, 0.4])
    ood = np.array([0.35, 0.5, 0.6, 0.7])
    m = ood_metrics(ind, ood)
    assert m["auroc"] == pytest.approx(roc_auc_score([0] * 4 + [1] * 4, np.r_[ind, ood]))
    assert m["auroc"] == pytest.approx(15 / 16)
    # catching 95% of 4 OOD images needs all 4, i.e. threshold 0.35: InD 0.4 is flagged -> FPR 1/4
    assert m["fpr95"] == pytest.approx(0.25)
    perfect = ood_metrics([0, 1], [2, 3])
    assert (
        perfect["auroc"] == 1
        and perfect["fpr95"] == 0
        and perfect["aupr_in"] == 1
        and perfect["aupr_out"] == 1
    )
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics([0, np.nan], [1])


def test_dice_per_class():
    label = np.array([[0, 1, 1, 2]])
    pred = np.array([[0, 1, 2, 2]])
    np.testing.assert_allclose(dice_per_class(pred, label, 4)[:2], [2 / 3, 2 / 3])
    assert np.isnan(dice_per_class(pred, label, 4)[2])


def test_risk_coverage_known_answers():
    from monai_ood.evaluation import risk_coverage

    risks = np.array([0.0, 0.0, 1.0, 1.0])
    perfect = risk_coverage([0.1, 0.2, 0.8, 0.9], risks)
    # selective risks 0, 0, 1/3, 1/2 -> mean 5/24
    assert perfect["aurc"] == pytest.approx(5 / 24) and perfect["spearman"] == pytest.approx(np.sqrt(0.8))
    worst = risk_coverage([0.9, 0.8, 0.2, 0.1], risks)
    # selective risks 1, 1, 2/3, 1/2
    assert worst["aurc"] == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4) and worst["random"] == pytest.approx(
        0.5
    )
    with pytest.raises(ValueError, match="matching"):
        risk_coverage([1.0], [0.0])


def test_dice_per_image_and_severity_correlation():
    from scipy.stats import spearmanr

    from monai_ood.evaluation import dice_per_image, severity_correlation

    label = np.array([[[0, 1], [1, 0]], [[0, 0], [0, 0]]])
    pred = np.array([[[0, 1], [0, 0]], [[0, 0], [0, 0]]])
    np.testing.assert_allclose(dice_per_image(pred, label, 2), [2 / 3, 1.0])
    scores, severity = [0.1, 0.5, 0.4, 0.9], [0, 1, 2, 3]
    assert severity_correlation(scores, severity) == pytest.approx(spearmanr(scores, severity).statistic)
