"""The benchmark harness: every metric of `evaluate` against an independent computation on small sets."""

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from monai_ood.benchmark.harness import BenchmarkSets, Scores, evaluate
from monai_ood.benchmark.ood_sets import OODItem

H, W = 8, 8


def _image(rng, level):
    return (rng.random((1, H, W)) * 0.1 + level).astype(np.float32)


def _label(rng):
    return rng.integers(0, 3, size=(1, H, W)).astype(np.int64)


@pytest.fixture
def sets():
    rng = np.random.default_rng(0)
    base = [{"image": _image(rng, 0.2), "label": _label(rng)} for _ in range(6)]
    ind = base + [{"image": _image(rng, 0.2), "label": _label(rng)} for _ in range(6)]
    ood = {
        "far": [OODItem("far", "C1", _image(rng, 0.8)) for _ in range(5)],
        "view": [OODItem("view", "C2", _image(rng, 0.25)) for _ in range(5)],
    }
    for severity in (1, 2, 3):
        name = f"noise severity {severity}"
        ood[name] = [
            OODItem(
                "noise",
                "C3",
                _image(rng, 0.2 + 0.1 * severity),
                severity=severity,
                artefact="noise",
                label=item["label"].copy(),
            )
            for item in base
        ]
    lesions = []
    for item in base:
        mask = np.zeros((1, H, W), dtype=bool)
        mask[0, 2:5, 3:6] = True
        image = item["image"].copy()
        image[mask] = 0.9
        lesions.append(OODItem("lesion", "lesion", image, label=np.ones_like(item["label"]), mask=mask))
    ood["lesion"] = lesions
    return BenchmarkSets(ind, ood, base, {"test": True})


def _mean_scorer(images):
    """Image score = mean intensity, map = the image, segmentation = thresholds of the image."""
    images = np.asarray(images)
    segmentation = np.clip((images[:, 0] * 4).astype(np.uint8), 0, 2)
    return Scores(images.reshape(len(images), -1).mean(1), images[:, 0].copy(), segmentation)


def test_every_metric_matches_an_independent_computation(sets):
    row = evaluate(_mean_scorer, sets, num_classes=3, class_names=["bg", "a", "b"])
    ind = np.array([i["image"].mean() for i in sets.ind])
    for name, items in sets.ood.items():
        ood = np.array([i.image.mean() for i in items])
        labels = np.r_[np.zeros(len(ind)), np.ones(len(ood))]
        expected = roc_auc_score(labels, np.r_[ind, ood])
        assert row["sets"][name]["auroc"] == pytest.approx(expected, abs=1e-12), name
        assert row["scores"][name] == pytest.approx(ood.tolist())
    # categories: means over their sets; "mean" over C1-C3 only (the lesion set is on its own)
    c3 = [row["sets"][f"noise severity {s}"]["auroc"] for s in (1, 2, 3)]
    assert row["categories"]["C3"]["auroc"] == pytest.approx(np.mean(c3))
    assert set(row["categories"]) == {"C1", "C2", "C3", "lesion"}
    c1_c3 = [v["auroc"] for k, v in row["sets"].items() if k != "lesion"]
    assert row["mean"]["auroc"] == pytest.approx(np.mean(c1_c3))
    # severity: Spearman of the clean base (0) and its artefact versions (1-3)
    base = [i["image"].mean() for i in sets.artefact_base]
    noisy = [i.image.mean() for s in (1, 2, 3) for i in sets.ood[f"noise severity {s}"]]
    severities = [0] * len(base) + [s for s in (1, 2, 3) for _ in sets.artefact_base]
    assert row["severity_spearman"]["noise"] == pytest.approx(spearmanr(base + noisy, severities).statistic)
    # failure: risk-coverage over the clean base and its artefact versions, AURC from first principles
    images = [i["image"] for i in sets.artefact_base] + [
        i.image for s in (1, 2, 3) for i in sets.ood[f"noise severity {s}"]
    ]
    labels = [i["label"][0] for i in sets.artefact_base] * 4
    risks = []
    for image, label in zip(images, labels, strict=True):
        prediction = np.clip((image[0] * 4).astype(np.uint8), 0, 2)
        dice = []
        for k in (1, 2):
            p, t = prediction == k, label == k
            if p.sum() + t.sum():
                dice.append(2 * (p & t).sum() / (p.sum() + t.sum()))
        risks.append(1 - (np.mean(dice) if dice else 1.0))
    order = np.argsort(base + noisy, kind="stable")
    aurc = np.mean(np.cumsum(np.array(risks)[order]) / np.arange(1, len(risks) + 1))
    assert row["failure"]["aurc"] == pytest.approx(aurc)
    # localisation on the lesion set, inside the brain (label > 0: everywhere here): the painted square
    # holds the highest values of each image, so both metrics are perfect
    assert row["localisation"]["set"] == "lesion"
    assert row["localisation"]["pixel_auroc"] == pytest.approx(1.0)
    assert row["localisation"]["aupro"] == pytest.approx(1.0)
    assert row["dice"]["per_class"].keys() == {"a", "b"}


def test_a_method_without_map_or_segmentation_gets_none(sets):
    row = evaluate(lambda x: Scores(np.asarray(x).reshape(len(x), -1).std(1)), sets, num_classes=3)
    assert row["localisation"] is None and row["failure"] is None and row["dice"] is None
    assert 0.0 <= row["mean"]["auroc"] <= 1.0


def test_non_finite_scores_are_refused_with_the_set_named(sets):
    def bad(images):
        scores = np.zeros(len(images))
        if len(images) == 5:  # the two five-image sets
            scores[0] = np.nan
        return Scores(scores)

    with pytest.raises(ValueError, match="far"):
        evaluate(bad, sets, num_classes=3)


def test_step_budget_in_whole_epochs():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "benchmark_run", Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"
    )
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    # 154 training slices in batches of 8 = 20 steps per epoch
    assert run.epochs_for(600, 154) == 30
    assert run.epochs_for(601, 154) == 31
    assert run.epochs_for(1, 154) == 1


def test_warp_sensitivity_is_the_auroc_of_warped_against_clean_inds():
    from monai_ood.benchmark.harness import warp_sensitivity

    rng = np.random.default_rng(1)
    clean, warped = rng.normal(0, 1, 30), rng.normal(0.5, 1, 30)
    variants = [None] * 30 + ["affine"] * 30
    expected = roc_auc_score(np.r_[np.zeros(30), np.ones(30)], np.r_[clean, warped])
    assert warp_sensitivity(np.r_[clean, warped], variants) == pytest.approx(expected, abs=1e-12)
    assert warp_sensitivity(clean, [None] * 30) is None


def test_the_degree_is_measured_on_the_ind_test_images_and_against_severity(sets):
    from monai_ood.calibration import DegreeCalibrator

    rng = np.random.default_rng(1)
    validation = [_image(rng, 0.2).mean() for _ in range(40)]
    degree = DegreeCalibrator().fit(validation)
    row = evaluate(_mean_scorer, sets, num_classes=3, degree=degree)
    ind = np.array([i["image"].mean() for i in sets.ind], dtype=np.float64)
    ind_degrees = degree.transform(ind)
    by_threshold = {r["threshold"]: r for r in row["degree"]["calibration"]}
    assert by_threshold[0.5]["observed_above"] == pytest.approx((ind_degrees > 0.5).mean())
    assert by_threshold[0.9]["expected_above"] == pytest.approx(0.1)
    assert row["degree"]["ind_mean"] == pytest.approx(ind_degrees.mean())
    # the far set lies beyond every validation score: its degree is near 1
    assert row["degree"]["mean_by_set"]["far"] > 0.99
    # the severity rho of the degree: Spearman of the degree of the clean base (0) and its versions (1-3)
    base = [i["image"].mean() for i in sets.artefact_base]
    noisy = [i.image.mean() for s in (1, 2, 3) for i in sets.ood[f"noise severity {s}"]]
    severities = [0] * len(base) + [s for s in (1, 2, 3) for _ in sets.artefact_base]
    expected = spearmanr(degree.transform(np.array(base + noisy, dtype=np.float64)), severities).statistic
    assert row["degree"]["severity_spearman"]["noise"] == pytest.approx(expected)
    # without a degree there is no degree row
    assert evaluate(_mean_scorer, sets, num_classes=3)["degree"] is None
