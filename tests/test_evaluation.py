from pathlib import Path

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


# ---------------------------------------------------------------- evaluate on your own data


def test_evaluate_on_your_own_folders_matches_scikit_learn_on_the_scores_of_score(tmp_path, capsys):
    import json

    import nibabel as nib
    import SimpleITK as sitk
    import torch
    from sklearn.metrics import roc_auc_score

    from monai_ood.cli import main
    from monai_ood.engines.checkpoint import build_network, load_model, make_model_config, save_model
    from monai_ood.inference import score_image
    from monai_ood.io import read_image
    from monai_ood.preprocessing import SlicePreprocessing

    torch.manual_seed(0)
    config = make_model_config("unet", 2, 1, 3, 8, {"channels": [4, 8, 16], "strides": [2, 2]})
    model = save_model(
        tmp_path / "model.pt", build_network(config), config, SlicePreprocessing(size=(32, 32))
    )
    rng = np.random.default_rng(0)
    folders = {name: tmp_path / name for name in ("ind", "noise", "labels")}
    for folder in folders.values():
        folder.mkdir()
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 24, 4)], indexing="ij")
    for k in range(4):
        inside = (x / 0.7) ** 2 + (y / (0.6 + 0.05 * k)) ** 2 < 1
        image = np.where(inside, 100.0, 0.0) + rng.normal(0, 2, inside.shape)
        nib.save(
            nib.Nifti1Image(image.astype(np.float32), np.diag([2.0, 2.0, 4.0, 1.0])),
            folders["ind"] / f"case{k}.nii.gz",
        )
        label = inside.astype(np.int16) + (inside & (x > 0)).astype(np.int16)
        nib.save(nib.Nifti1Image(label, np.diag([2.0, 2.0, 4.0, 1.0])), folders["labels"] / f"case{k}.nii.gz")
        noise = rng.uniform(0, 100, inside.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(noise, np.diag([2.0, 2.0, 4.0, 1.0])), folders["noise"] / f"noise{k}.nii.gz")
    out = tmp_path / "evaluation"
    argv = ["evaluate", "--checkpoint", str(model), "--output", str(out), "--device", "cpu"]
    argv += [
        "--ind",
        str(folders["ind"]),
        "--ood",
        f"noise={folders['noise']}:C1",
        "--labels",
        str(folders["labels"]),
    ]
    assert main(argv) == 0
    report = json.loads((out / "evaluation.json").read_text())
    # the independent reference: each file scored as `monai-ood score` scores it, then scikit-learn
    loaded = load_model(model, device="cpu")

    def scores(folder):
        return [
            score_image(loaded.net, read_image(p), loaded.preprocessing, None, 16, None).image_score
            for p in sorted(folder.iterdir())
        ]

    ind, noise = scores(folders["ind"]), scores(folders["noise"])
    expected = roc_auc_score([0] * 4 + [1] * 4, ind + noise)
    row = report["ood_sets"]["noise"]
    assert row["category"] == "C1" and row["n"] == 4 and row["auroc"] == pytest.approx(expected)
    assert report["categories"]["C1"]["auroc"] == pytest.approx(expected)
    assert report["failure"]["n"] == 4 and 0 <= report["failure"]["aurc"] <= 1
    assert sorted(report["scores"]["ind"]) == pytest.approx(sorted(ind))
    assert "| noise | C1 | 4 |" in (out / "evaluation.md").read_text(encoding="utf-8")
    assert all(Path(p).is_file() for p in report["plots"]) and len(report["plots"]) == 2
    assert sitk.ReadImage(report["plots"][0]).GetSize()[0] > 100  # a real PNG
    assert main(argv) == 2  # an existing report is refused without --overwrite
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(model),
                "--output",
                str(tmp_path / "o"),
                "--ood",
                str(folders["noise"]),
            ]
        )
        == 2
    )
    assert "needs --ind" in capsys.readouterr().err


def test_inputs_of_a_folder_a_file_or_a_datalist(tmp_path):
    import json

    from monai_ood.evaluation import _folder_inputs, parse_ood_set

    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    datalist = tmp_path / "list.json"
    datalist.write_text(
        json.dumps({"training": [{"image": "a.nii.gz"}], "test": [{"image": "c.nii.gz"}], "name": "x"})
    )
    assert [p.name for p in _folder_inputs(datalist)] == ["a.nii.gz", "c.nii.gz"]
    assert [p.name for p in _folder_inputs(tmp_path / "b.nii.gz")] == ["b.nii.gz"]
    assert parse_ood_set(f"ct={tmp_path}:modality") == ("ct", str(tmp_path), "modality")
    assert parse_ood_set(str(tmp_path)) == (tmp_path.name, str(tmp_path), "OOD")


def test_degree_calibration_against_the_promise_and_scipy_binomial():
    from scipy.stats import binom

    from monai_ood.evaluation import degree_calibration

    # degrees of 1000 images spread exactly as promised: i / 1000
    degrees = (np.arange(1000) + 0.5) / 1000
    rows = degree_calibration(degrees, thresholds=(0.5, 0.9, 0.99))
    for row in rows:
        assert row["observed_above"] == pytest.approx(row["expected_above"], abs=1e-3)
        low, high = binom.interval(0.95, 1000, 1 - row["threshold"])
        assert row["range95"] == pytest.approx([low / 1000, high / 1000])
        assert row["range95"][0] <= row["observed_above"] <= row["range95"][1]
    # every image above 0.9: miscalibrated, outside the range
    rows = degree_calibration(np.full(50, 0.95), thresholds=(0.9,))
    assert rows[0]["observed_above"] == 1.0 and rows[0]["n_above"] == 50
    assert rows[0]["observed_above"] > rows[0]["range95"][1]
    with pytest.raises(ValueError, match="threshold"):
        degree_calibration(degrees, thresholds=(1.0,))
    with pytest.raises(ValueError, match="finite"):
        degree_calibration([np.nan])
