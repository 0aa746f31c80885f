"""Evaluate a trained checkpoint on the embedded benchmark data: OOD detection and segmentation.

OOD is the positive class (the pytorch-ood / OpenOOD convention) and scores are "higher = more OOD".
The InD reference set is the test split plus its fixed-seed mild variants (``BENCHMARK.md``); every OOD
set of :func:`monai_ood.data.ood_sources.load_ood_sets` is compared with it.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

__all__ = [
    "ood_metrics",
    "dice_per_class",
    "dice_per_image",
    "risk_coverage",
    "severity_correlation",
    "evaluate_checkpoint",
]


OOD_METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")


def ood_set_name(item) -> str:
    """The OOD set an :class:`~monai_ood.data.ood_sources.OODItem` belongs to: its source name, or
    ``"<artefact> severity <s>"`` for the artefact versions of InD test slices."""
    return item.name if item.artefact is None else f"{item.artefact} severity {item.severity}"


def category_means(sets: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per category (C1, C2, C3), the mean of each of :data:`OOD_METRICS` over its sets; ``sets`` maps a
    set name to a row with ``category`` and the metrics."""
    by_category = defaultdict(list)
    for row in sets.values():
        by_category[row["category"]].append(row)
    return {
        category: {metric: float(np.mean([row[metric] for row in rows])) for metric in OOD_METRICS}
        for category, rows in sorted(by_category.items())
    }


def ood_metrics(ind_scores, ood_scores) -> dict[str, float]:
    """AUROC, FPR@95TPR, AUPR-IN and AUPR-OUT with OOD as the positive class.

    FPR@95TPR is the fraction of InD images flagged at the lowest threshold that catches 95% of the OOD
    images.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    ind, ood = np.asarray(ind_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)
    if ind.size == 0 or ood.size == 0:
        raise ValueError(f"need InD and OOD scores, got {ind.size} and {ood.size}")
    if not (np.isfinite(ind).all() and np.isfinite(ood).all()):
        raise ValueError("scores contain NaN or Inf")
    labels = np.concatenate([np.zeros(ind.size), np.ones(ood.size)])
    scores = np.concatenate([ind, ood])
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "fpr95": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
        # AP is a weighted mean of precisions (<= 1); sklearn's summation can round to 1 + 2e-16
        "aupr_in": min(1.0, float(average_precision_score(1 - labels, -scores))),
        "aupr_out": min(1.0, float(average_precision_score(labels, scores))),
    }


def dice_per_class(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each foreground class over a whole set (pixels pooled), ``(num_classes - 1,)``; NaN if a
    class is absent from both."""
    prediction, label = np.asarray(prediction), np.asarray(label)
    dice = []
    for k in range(1, num_classes):
        p, t = prediction == k, label == k
        denominator = p.sum() + t.sum()
        dice.append(2.0 * (p & t).sum() / denominator if denominator else np.nan)
    return np.array(dice)


def dice_per_image(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean foreground Dice of each image ``(N, *spatial)`` over the classes present in its label or
    prediction; an image where both are empty scores 1 (nothing to find, nothing found)."""
    prediction, label = np.asarray(prediction), np.asarray(label)
    out = np.empty(len(prediction))
    for i, (p, t) in enumerate(zip(prediction, label, strict=True)):
        dice = dice_per_class(p, t, num_classes)
        out[i] = 1.0 if np.isnan(dice).all() else float(np.nanmean(dice))
    return out


def risk_coverage(scores, risks) -> dict[str, float]:
    """Failure detection: keep images in order of increasing OOD score; the selective risk at coverage
    k/n is the mean risk of the k lowest-scored images. Returns ``aurc`` (the mean selective risk over
    k = 1..n: the area under the risk-coverage curve, lower is better, Zenk et al. 2025),
    ``spearman`` (rank correlation of score and risk, higher is better) and the ``random`` AURC (the
    mean risk, what an uninformative score gets in expectation)."""
    from scipy.stats import spearmanr

    scores, risks = np.asarray(scores, dtype=np.float64), np.asarray(risks, dtype=np.float64)
    if scores.shape != risks.shape or scores.size < 2:
        raise ValueError(
            f"need matching score and risk vectors of length >= 2, got {scores.shape} and {risks.shape}"
        )
    order = np.argsort(scores, kind="stable")
    selective = np.cumsum(risks[order]) / np.arange(1, scores.size + 1)
    return {
        "aurc": float(selective.mean()),
        "spearman": float(spearmanr(scores, risks).statistic),
        "random": float(risks.mean()),
    }


def severity_correlation(scores, severities) -> float:
    """Spearman's rank correlation of image scores with artefact severity (0 = clean, 1, 2, 3)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(scores, dtype=np.float64), np.asarray(severities)).statistic)


def evaluate_checkpoint(checkpoint, cache_dir=None, device=None, seed: int = 0, batch_size: int = 32) -> dict:
    """Score the InD test set (and its mild variants) and every OOD set with a checkpoint.

    Returns:
        A JSON-ready dict: per OOD set ``{category, n, auroc, fpr95, aupr_in, aupr_out, mean_score}``,
        per category the mean over its sets, InD ``dice`` per class, and the command's settings.
    """
    from .data.brain import brain_test_variants, load_brain_dataset
    from .data.ood_sources import load_ood_sets
    from .engines.checkpoint import load_model
    from .inference import score_slices

    loaded = load_model(checkpoint, device=device)  # None: cuda when available
    test = load_brain_dataset(cache_dir=cache_dir, preprocessing=loaded.preprocessing)["test"]
    ind_items = list(test) + list(brain_test_variants(test, seed=seed))

    def run(images: np.ndarray) -> dict:
        return score_slices(loaded.net, images.astype(np.float32), loaded.calibrator, batch_size)

    ind = run(np.stack([item["image"] for item in ind_items]))
    labels = np.stack([item["label"][0] for item in ind_items])
    dice = dice_per_class(ind["segmentation"], labels, loaded.net.num_classes)

    ood_items = load_ood_sets(test, preprocessing=loaded.preprocessing, seed=seed)
    by_set = defaultdict(list)
    for item in ood_items:
        by_set[(ood_set_name(item), item.category)].append(item.image)
    sets = {}
    for (name, category), images in sorted(by_set.items()):
        scores = run(np.stack(images))["image_score"]
        sets[name] = {"category": category, "n": len(images), "mean_score": float(scores.mean())}
        sets[name].update(ood_metrics(ind["image_score"], scores))
    return {
        "checkpoint": str(checkpoint),
        "seed": seed,
        "ind": {"n": len(ind_items), "mean_score": float(ind["image_score"].mean())},
        "dice": {
            "per_class": dict(
                zip(
                    (loaded.class_names or [str(k) for k in range(loaded.net.num_classes)])[1:],
                    dice.tolist(),
                    strict=True,
                )
            ),
            "mean_foreground": float(np.nanmean(dice)),
        },
        "ood_sets": sets,
        "categories": category_means(sets),
    }
