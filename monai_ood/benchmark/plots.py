"""The benchmark's figures: ROC curves and score histograms of a method, InD against each OOD group.

OOD is the positive class and scores are "higher = more OOD", as in :mod:`monai_ood.evaluation`, whose
:func:`~monai_ood.evaluation.ood_metrics` gives the AUROC in the legends (so a figure and a table agree).
Drawn with matplotlib's object API (:class:`~matplotlib.figure.Figure` on a ``FigureCanvasAgg``, the Agg
backend), not pyplot: no display is needed and an application's backend stays untouched. Every PNG is
written through :func:`monai_ood.files.atomic_write` and replaces an existing file (benchmark re-runs).

Sizes are fixed (no tight bounding box), at ``DPI``: a ROC figure is ``ROC_INCHES`` square (600 x 600
pixels); a histogram figure has ``min(groups, HIST_COLUMNS)`` panels of ``PANEL_INCHES`` per row.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from monai_ood.evaluation import ood_metrics, risk_coverage
from monai_ood.files import atomic_write

__all__ = [
    "DPI",
    "degree_calibration_plot",
    "HIST_COLUMNS",
    "PANEL_INCHES",
    "ROC_INCHES",
    "method_plots",
    "risk_coverage_plot",
    "roc_curves",
    "score_histograms",
    "slug",
]

DPI = 100
ROC_INCHES = 6.0
PANEL_INCHES = (4.0, 3.0)  # width, height of one histogram panel
HIST_COLUMNS = 4
TITLE_INCHES = 0.4  # added to a histogram figure's height for its title
CLIP_QUANTILES = (0.005, 0.995)
_IND_COLOUR = "0.45"


def slug(name: str) -> str:
    """A file-name stem for ``name``: lower case, runs of other characters than ``a-z0-9`` as one ``-``.

    Example:
        >>> slug("MC dropout (T=10)")
        'mc-dropout-t-10'

    Raises:
        ValueError: ``name`` has no letter or digit.
    """
    stem = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
    if not stem:
        raise ValueError(f"cannot make a file name from {name!r}: it has no letter or digit")
    return stem


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("the benchmark plots need matplotlib: pip install 'monai-ood[bench]'") from error
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path) -> Path:
    def write(temporary: Path) -> None:
        figure.savefig(temporary, format="png", dpi=DPI)

    return atomic_write(path, write, overwrite=True)


def _scores(name: str, scores) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"{name} scores must be a non-empty set of finite numbers, got {values.size} values")
    return values


def _groups(ood_scores_by_group) -> dict[str, np.ndarray]:
    if not isinstance(ood_scores_by_group, Mapping) or not ood_scores_by_group:
        raise ValueError(f"ood_scores_by_group must be a non-empty dict, got {ood_scores_by_group!r}"[:200])
    return {str(name): _scores(f"group {name!r}", scores) for name, scores in ood_scores_by_group.items()}


def roc_curves(ind_scores, ood_scores_by_group: Mapping[str, np.ndarray], path, title: str) -> Path:
    """One PNG with the ROC curve of each OOD group against the InD scores, and the chance diagonal.

    Args:
        ind_scores: the InD image scores ``(n,)``.
        ood_scores_by_group: group name (e.g. ``"C1"``, ``"lesion"``) to its OOD image scores.
        path: the PNG file; replaced if it exists.
        title: the figure title.

    Returns:
        The written path.

    Raises:
        ValueError: no group, or empty or non-finite scores.
        ImportError: matplotlib or scikit-learn is missing (``pip install 'monai-ood[bench]'``).
    """
    from sklearn.metrics import roc_curve

    ind, groups = _scores("InD", ind_scores), _groups(ood_scores_by_group)
    figure = _figure(ROC_INCHES, ROC_INCHES)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance (AUROC 0.5)")
    for name, ood in groups.items():
        labels = np.concatenate([np.zeros(ind.size), np.ones(ood.size)])
        fpr, tpr, _ = roc_curve(labels, np.concatenate([ind, ood]))
        auroc = ood_metrics(ind, ood)["auroc"]
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (n={ood.size}): AUROC {auroc:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(f"false positive rate (InD flagged, n={ind.size})")
    ax.set_ylabel("true positive rate (OOD caught)")
    ax.set_title(title, fontsize=11)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(figure, path)


def score_histograms(
    ind_scores,
    ood_scores_by_group: Mapping[str, np.ndarray],
    path,
    title: str,
    bins: int = 40,
    clip_quantiles: tuple[float, float] = CLIP_QUANTILES,
) -> Path:
    """One PNG with a panel per OOD group: the InD and the group's score densities on shared bins.

    Scores can spread over orders of magnitude (a far-OOD image), so each panel's bins span the
    ``clip_quantiles`` of the InD and group scores pooled, and scores outside are clipped into the first
    and last bins (the x-axis label says so); densities, as the sets differ in size.

    Args:
        ind_scores: the InD image scores ``(n,)``.
        ood_scores_by_group: group name to its OOD image scores.
        path: the PNG file; replaced if it exists.
        title: the figure title.
        bins: the number of bins per panel.
        clip_quantiles: lower and upper quantile of the bin range, ``0 <= low < high <= 1``.

    Returns:
        The written path.

    Raises:
        ValueError: no group, empty or non-finite scores, ``bins < 1`` or bad quantiles.
        ImportError: matplotlib is missing (``pip install 'monai-ood[bench]'``).
    """
    low_q, high_q = clip_quantiles
    if not 0.0 <= low_q < high_q <= 1.0:
        raise ValueError(f"clip_quantiles must satisfy 0 <= low < high <= 1, got {clip_quantiles!r}")
    if int(bins) < 1:
        raise ValueError(f"bins must be >= 1, got {bins!r}")
    ind, groups = _scores("InD", ind_scores), _groups(ood_scores_by_group)
    columns = min(len(groups), HIST_COLUMNS)
    rows = math.ceil(len(groups) / columns)
    figure = _figure(columns * PANEL_INCHES[0], rows * PANEL_INCHES[1] + TITLE_INCHES)
    figure.suptitle(title, fontsize=11)
    clipped = "" if (low_q, high_q) == (0.0, 1.0) else f", clipped to the {low_q:.1%}-{high_q:.1%} quantiles"
    for k, (name, ood) in enumerate(groups.items()):
        ax = figure.add_subplot(rows, columns, k + 1)
        low, high = np.quantile(np.concatenate([ind, ood]), [low_q, high_q])
        if high <= low:  # every score equal: a unit-wide range around it
            low, high = low - 0.5, high + 0.5
        edges = np.linspace(low, high, int(bins) + 1)
        for label, values, colour in (
            (f"InD (n={ind.size})", ind, _IND_COLOUR),
            (f"{name} (n={ood.size})", ood, f"C{k % 10}"),
        ):
            ax.hist(
                np.clip(values, low, high), bins=edges, density=True, alpha=0.55, color=colour, label=label
            )
        ax.set_title(f"{name}: AUROC {ood_metrics(ind, ood)['auroc']:.3f}", fontsize=9)
        ax.set_xlabel(f"score (higher = more OOD{clipped})", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return _save(figure, path)


def risk_coverage_plot(scores, risks, path, title: str) -> Path:
    """One PNG of the risk-coverage curve: images kept in increasing score, the mean risk (e.g.
    ``1 - Dice``) of the kept ones at each coverage, with the AURC of
    :func:`monai_ood.evaluation.risk_coverage` and the random baseline (the mean risk).

    Args:
        scores: image scores ``(n,)``, higher = more OOD.
        risks: the risk of each image ``(n,)``, e.g. ``1 - Dice``.
        path: the PNG file; replaced if it exists.
        title: the figure title.

    Returns:
        The written path.

    Raises:
        ValueError: as :func:`monai_ood.evaluation.risk_coverage`, or non-finite values.
    """
    scores, risks = _scores("image", scores), _scores("risk", risks)
    summary = risk_coverage(scores, risks)
    order = np.argsort(scores, kind="stable")
    coverage = np.arange(1, scores.size + 1) / scores.size
    selective = np.cumsum(risks[order]) / np.arange(1, scores.size + 1)
    figure = _figure(ROC_INCHES, ROC_INCHES * 0.75)
    ax = figure.add_subplot()
    ax.plot(coverage, selective, linewidth=1.5, label=f"score: AURC {summary['aurc']:.4f}")
    ax.axhline(
        summary["random"],
        linestyle="--",
        color="0.6",
        linewidth=1,
        label=f"random (mean risk): {summary['random']:.4f}",
    )
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"coverage (fraction of the {scores.size} images kept, lowest scores first)")
    ax.set_ylabel("selective risk (mean risk of the kept images)")
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(figure, path)


def degree_calibration_plot(degrees_by_label: Mapping[str, np.ndarray], path, title: str) -> Path:
    """One PNG of the OOD degree's calibration: for in-distribution images held out from its fit, the
    observed fraction with a degree above each threshold ``t`` against the promised ``1 - t``.

    Two panels: every threshold (linear axes), and the upper tail ``t >= 0.8`` on a log scale, where a
    triage threshold is set. The grey band is the central 95% range of the observed fraction if the promise
    held exactly (binomial, for the first label's number of images).

    Args:
        degrees_by_label: a label (e.g. ``"seed 0"``) to the OOD degrees of held-out InD images.
        path: the PNG file; replaced if it exists.
        title: the figure title.

    Returns:
        The written path.

    Raises:
        ValueError: no labels, or empty or non-finite degrees.
    """
    from scipy.stats import binom

    groups = _groups(degrees_by_label)
    figure = _figure(2 * ROC_INCHES * 0.8, ROC_INCHES * 0.75)
    left, right = figure.subplots(1, 2)
    n = next(iter(groups.values())).size
    for ax, (low, high, log) in ((left, (0.0, 1.0, False)), (right, (0.8, 0.995, True))):
        t = np.linspace(low, high, 400)
        expected = 1.0 - t
        band_low, band_high = binom.interval(0.95, n, expected)
        ax.fill_between(
            t, band_low / n, band_high / n, color="0.85", label=f"95% range if calibrated (n={n})"
        )
        ax.plot(t, expected, linestyle="--", color="0.3", linewidth=1, label="promised: 1 - t")
        for label, degrees in groups.items():
            observed = (degrees[None, :] > t[:, None]).mean(axis=1)
            if log:
                observed = np.where(observed > 0, observed, np.nan)
            ax.plot(t, observed, linewidth=1.5, label=f"{label} (n={degrees.size})")
        ax.set_xlim(low, high)
        ax.set_xlabel("degree threshold t")
        ax.set_ylabel("fraction of InD images with degree > t")
        if log:
            ax.set_yscale("log")
            ax.set_ylim(max(0.5 / n, 1e-3), 0.3)
        else:
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, which="both")
    left.set_title("every threshold", fontsize=10)
    right.set_title("upper tail (log scale)", fontsize=10)
    left.legend(fontsize=7)
    figure.suptitle(title, fontsize=11)
    return _save(figure, path)


def method_plots(
    method_name: str, ind_scores, sets: Mapping[str, tuple[str, np.ndarray]], folder: str | os.PathLike
) -> list[Path]:
    """A method's ROC and histogram figures, one curve and one panel per OOD category.

    The scores of a category's sets are pooled, so the AUROC in the legend is that of the pooled sets,
    not the mean of per-set AUROCs that the tables report per category.

    Args:
        method_name: the method, e.g. ``"prototype head"``; the files are named by its :func:`slug`.
        ind_scores: the InD image scores.
        sets: set name to ``(category, scores)``, e.g. ``{"noise": ("C1", [...]), "lesion": ("lesion", [...])}``.
        folder: where to write ``<slug>_roc.png`` and ``<slug>_hist.png`` (created if missing).

    Returns:
        ``[roc_path, hist_path]``.

    Raises:
        ValueError: no sets, empty or non-finite scores, or a name without letters or digits.
    """
    if not isinstance(sets, Mapping) or not sets:
        raise ValueError(
            f"sets must be a non-empty dict of set name to (category, scores), got {sets!r}"[:200]
        )
    by_category = defaultdict(list)
    for name, (category, scores) in sets.items():
        by_category[str(category)].append(_scores(f"set {name!r}", scores))
    groups = {category: np.concatenate(by_category[category]) for category in sorted(by_category)}
    stem, folder = slug(method_name), Path(folder)
    title = f"{method_name}: InD vs OOD category (OOD = positive)"
    return [
        roc_curves(ind_scores, groups, folder / f"{stem}_roc.png", title),
        score_histograms(ind_scores, groups, folder / f"{stem}_hist.png", title),
    ]
