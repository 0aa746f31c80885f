"""Benchmark figures: valid PNGs of the documented size, not blank, written atomically, no pyplot."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from monai_ood.benchmark.plots import (  # noqa: E402
    DPI,
    HIST_COLUMNS,
    PANEL_INCHES,
    ROC_INCHES,
    TITLE_INCHES,
    method_plots,
    risk_coverage_plot,
    roc_curves,
    score_histograms,
    slug,
)


def _check_png(path: Path, size: tuple[int, int]) -> None:
    """A PNG of ``(width, height)`` pixels with something drawn on it."""
    import matplotlib.image

    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == size
    pixels = matplotlib.image.imread(str(path))
    assert pixels.shape[:2] == (size[1], size[0])
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 10  # lines, text and colours


def _scores(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    ind = rng.normal(size=200)
    groups = {
        "C1": rng.normal(3.0, 1.0, 80),
        "C2": rng.normal(1.0, 1.0, 60),
        "lesion": rng.normal(0.5, 2, 40),
    }
    return ind, groups


def test_roc_curves(tmp_path: Path):
    pyplot_before = "matplotlib.pyplot" in sys.modules
    ind, groups = _scores()
    path = roc_curves(ind, groups, tmp_path / "roc.png", "method X")
    assert path == tmp_path / "roc.png"
    _check_png(path, (int(ROC_INCHES * DPI),) * 2)
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]  # no temporary files
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before  # the object API only


@pytest.mark.parametrize("n_groups", [1, 3, 5])
def test_score_histograms_size_follows_the_panels(tmp_path: Path, n_groups: int):
    rng = np.random.default_rng(n_groups)
    groups = {f"set {k}": rng.normal(k, 1.0, 50) for k in range(n_groups)}
    groups["set 0"][0] = 1e12  # a far outlier: clipped into the last bin, the others stay visible
    path = score_histograms(rng.normal(size=100), groups, tmp_path / "sub" / "hist.png", "histograms")
    columns = min(n_groups, HIST_COLUMNS)
    rows = -(-n_groups // HIST_COLUMNS)
    width, height = columns * PANEL_INCHES[0], rows * PANEL_INCHES[1] + TITLE_INCHES
    _check_png(path, (round(width * DPI), round(height * DPI)))
    assert [p.name for p in path.parent.iterdir()] == ["hist.png"]


def test_constant_scores_and_overwrite(tmp_path: Path):
    path = tmp_path / "hist.png"
    score_histograms(np.zeros(10), {"same": np.zeros(5)}, path, "constant")
    first = path.read_bytes()
    score_histograms(np.zeros(10), {"same": np.ones(5)}, path, "replaced")  # re-runs replace the file
    assert path.read_bytes() != first
    assert [p.name for p in tmp_path.iterdir()] == ["hist.png"]


def test_method_plots_writes_one_pair_per_method(tmp_path: Path):
    ind, groups = _scores()
    sets = {
        "noise": ("C1", groups["C1"]),
        "other anatomy": ("C1", groups["C1"][:10] - 1),
        "ghosting severity 3": ("C3", groups["C2"]),
        "lesion": ("lesion", groups["lesion"]),
    }
    written = []
    for method in ("prototype head (default)", "MC dropout"):
        written += method_plots(method, ind, sets, tmp_path / "plots")
    names = ["prototype-head-default_roc.png", "prototype-head-default_hist.png"]
    names += ["mc-dropout_roc.png", "mc-dropout_hist.png"]
    assert [p.name for p in written] == names
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(names)
    _check_png(written[0], (int(ROC_INCHES * DPI),) * 2)
    _check_png(written[1], (round(3 * PANEL_INCHES[0] * DPI), round((PANEL_INCHES[1] + TITLE_INCHES) * DPI)))


def test_risk_coverage_plot(tmp_path: Path):
    rng = np.random.default_rng(0)
    scores = rng.random(60)
    path = risk_coverage_plot(scores, scores + 0.3 * rng.random(60), tmp_path / "rc.png", "risk")
    _check_png(path, (int(ROC_INCHES * DPI), int(ROC_INCHES * 0.75 * DPI)))


def test_slug():
    assert slug("MC dropout (T=10)") == "mc-dropout-t-10"
    assert slug("  Energy ") == "energy"
    with pytest.raises(ValueError, match="no letter or digit"):
        slug("()")


@pytest.mark.parametrize(
    "ind, groups, message",
    [
        (np.zeros(3), {}, "non-empty dict"),
        (np.zeros(3), {"a": []}, "group 'a' scores must be"),
        (np.zeros(3), {"a": [0.0, np.nan]}, "group 'a' scores must be"),
        ([], {"a": [1.0]}, "InD scores must be"),
    ],
)
def test_bad_scores(tmp_path: Path, ind, groups, message):
    for plot in (roc_curves, score_histograms):
        with pytest.raises(ValueError, match=message):
            plot(ind, groups, tmp_path / "x.png", "bad")
    assert list(tmp_path.iterdir()) == []


def test_bad_histogram_options(tmp_path: Path):
    ind, groups = _scores()
    with pytest.raises(ValueError, match="clip_quantiles"):
        score_histograms(ind, groups, tmp_path / "x.png", "bad", clip_quantiles=(0.9, 0.1))
    with pytest.raises(ValueError, match="bins"):
        score_histograms(ind, groups, tmp_path / "x.png", "bad", bins=0)


def test_degree_calibration_plot(tmp_path: Path):
    from monai_ood.benchmark.plots import degree_calibration_plot

    rng = np.random.default_rng(0)
    path = degree_calibration_plot(
        {"seed 0": rng.random(300), "seed 1": rng.random(200) ** 0.5}, tmp_path / "degree.png", "method X"
    )
    _check_png(path, (int(2 * ROC_INCHES * 0.8 * DPI), int(ROC_INCHES * 0.75 * DPI)))
    with pytest.raises(ValueError):
        degree_calibration_plot({}, tmp_path / "empty.png", "empty")
