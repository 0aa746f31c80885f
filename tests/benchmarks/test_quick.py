"""`benchmarks/run.py --quick` runs in the suite: every method and every column must be produced."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHODS = {
    "prototype head",
    "prototype head (default)",
    "MSP",
    "entropy",
    "energy",
    "MC dropout",
    "ensemble",
    "FCDD",
    "Mahalanobis",
    "MECAM",
    "autoencoder",
}
ARTEFACTS = {"motion", "ghosting", "spike", "bias_field", "noise", "blur"}


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
    for method, row in run["methods"].items():
        assert set(row["categories"]) == {"C1", "C2", "C3"}, method
        for values in row["sets"].values():
            for metric in ("auroc", "fpr95", "aupr_in", "aupr_out"):
                assert 0.0 <= values[metric] <= 1.0, (method, metric)
        assert set(row["severity_spearman"]) == ARTEFACTS, method
        assert all(math.isfinite(v) for v in row["severity_spearman"].values()), method
        assert math.isfinite(row["failure"]["aurc"]) and math.isfinite(row["failure"]["spearman"]), method
        assert row["time_ratio_to_plain_forward"] > 0, method
    assert {"with head", "with default head", "plain"} == set(run["facts"]["dice"])
    table = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    assert all(f"| {method} |" in table for method in METHODS)
    assert report["command"].startswith("python benchmarks/run.py --quick")
