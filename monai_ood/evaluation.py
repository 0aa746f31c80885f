"""Metrics of OOD detection, failure detection, localisation and segmentation, and the evaluation of a
checkpoint on the embedded benchmark (through :mod:`monai_ood.benchmark.harness`, as ``benchmarks/run.py``).

OOD is the positive class (the pytorch-ood / OpenOOD convention) and scores are "higher = more OOD".
The InD reference set is the test split plus its fixed-seed mild variants (``BENCHMARK.md``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

__all__ = [
    "ood_metrics",
    "dice_per_class",
    "dice_per_image",
    "risk_coverage",
    "severity_correlation",
    "DEGREE_THRESHOLDS",
    "degree_calibration",
    "degree_report",
    "evaluate_checkpoint",
    "pixel_auroc",
    "aupro",
    "localisation_metrics",
]


OOD_METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")


def ood_set_name(item) -> str:
    """The OOD set an :class:`~monai_ood.benchmark.ood_sets.OODItem` belongs to: its source name, or
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


DEGREE_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)


def degree_calibration(degrees, thresholds=DEGREE_THRESHOLDS) -> list[dict]:
    """How the OOD degrees of in-distribution images are spread, against what the degree promises.

    The degree's meaning (:mod:`monai_ood.calibration.degree`) is that a fraction ``1 - t`` of
    in-distribution images has a degree above ``t``. For each threshold ``t`` this gives that expected
    fraction, the observed fraction of ``degrees`` above ``t``, and the central 95% range of the observed
    fraction if the promise held exactly (binomial, ``n = len(degrees)``): an observed fraction outside it
    says the degree is miscalibrated on these images.

    Args:
        degrees: OOD degrees of in-distribution images not used to fit the degree (e.g. the test split).
        thresholds: the thresholds ``t`` in (0, 1).

    Returns:
        One dict per threshold: ``threshold, expected_above, observed_above, n_above, n, range95``.

    Raises:
        ValueError: no degrees, a non-finite degree, or a threshold outside (0, 1).
    """
    from scipy.stats import binom

    values = np.asarray(degrees, dtype=np.float64).ravel()
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"degrees must be a non-empty set of finite numbers, got {values.size} values")
    rows = []
    for t in thresholds:
        t = float(t)
        if not 0.0 < t < 1.0:
            raise ValueError(f"a degree threshold must lie in (0, 1), got {t!r}")
        n_above = int((values > t).sum())
        low, high = binom.interval(0.95, values.size, 1.0 - t)
        rows.append(
            {
                "threshold": t,
                "expected_above": 1.0 - t,
                "observed_above": n_above / values.size,
                "n_above": n_above,
                "n": int(values.size),
                "range95": [float(low) / values.size, float(high) / values.size],
            }
        )
    return rows


def degree_report(degree, ind_scores, set_scores=None, severity_groups=None, ind_subsets=None) -> dict:
    """The OOD degree of a detector measured on held-out images: its calibration and its ordering.

    Args:
        degree: a fitted :class:`~monai_ood.calibration.DegreeCalibrator` (fitted on validation scores).
        ind_scores: image scores of held-out in-distribution images.
        set_scores: OOD set name to its image scores (for the mean degree per set), or ``None``.
        severity_groups: artefact name to ``(scores, severities)`` with severity 0 for clean images, for
            the Spearman correlation of the degree with severity, or ``None``.
        ind_subsets: extra named subsets of ``ind_scores`` as boolean masks (e.g. the clean test slices
            without their mild variants), each with its own calibration rows.

    Returns:
        A JSON-ready dict: ``calibration`` (rows of :func:`degree_calibration` on ``ind_scores``),
        ``ind_mean``, ``subsets`` (name to calibration rows), ``mean_by_set`` and ``severity_spearman``.
    """
    ind_degrees = degree.transform(np.asarray(ind_scores, dtype=np.float64))
    masks = {name: np.asarray(mask, dtype=bool) for name, mask in (ind_subsets or {}).items()}
    return {
        "calibration": degree_calibration(ind_degrees),
        "ind_mean": float(ind_degrees.mean()),
        "subsets": {
            name: degree_calibration(ind_degrees[mask]) for name, mask in masks.items() if mask.any()
        },
        "mean_by_set": {
            name: float(degree.transform(np.asarray(scores, dtype=np.float64)).mean())
            for name, scores in (set_scores or {}).items()
        },
        "severity_spearman": {
            artefact: severity_correlation(degree.transform(np.asarray(scores, dtype=np.float64)), severities)
            for artefact, (scores, severities) in sorted((severity_groups or {}).items())
        },
    }


def evaluate_checkpoint(
    checkpoint, cache_dir=None, device=None, seed: int = 0, batch_size: int = 32, plots=None
) -> dict:
    """Evaluate a checkpoint on the embedded benchmark, through the benchmark's own harness.

    The sets and metrics are those of ``benchmarks/run.py`` (:mod:`monai_ood.benchmark.harness`): the InD
    reference (test split of the pool and its mild variants) against every available OOD set, the
    artefacts' severity correlation, failure detection, and lesion localisation of the calibrated map
    A_xi; the checkpoint is run as ``monai-ood score`` runs it.

    Args:
        checkpoint: ``model.pt`` of ``monai-ood train``.
        cache_dir: cache of the embedded pool.
        device: where to run (``None``: cuda when available).
        seed: seed of the test variants, artefacts and lesions.
        batch_size: slices per forward pass.
        plots: a folder for ROC curves per category and score histograms (PNG), or ``None``.

    Returns:
        A JSON-ready dict: ``ood_sets`` (per set ``category, n, mean_score, auroc, fpr95, aupr_in,
        aupr_out``), ``categories``, ``mean``, ``severity_spearman``, ``failure``, ``localisation``,
        ``dice``, ``ind``, ``sets`` (sizes and the sources present), ``plots`` and the settings.
    """
    from .benchmark.harness import benchmark_sets, checkpoint_scorer, evaluate
    from .engines.checkpoint import load_model

    loaded = load_model(checkpoint, device=device)  # None: cuda when available
    sets = benchmark_sets(loaded.preprocessing, seed=seed, cache_dir=cache_dir)
    num_classes = loaded.net.num_classes
    row = evaluate(
        checkpoint_scorer(loaded, batch_size), sets, num_classes, loaded.class_names, degree=loaded.degree
    )
    written = _plots(row["scores"], row["sets"], loaded.degree, plots)
    return {
        "checkpoint": str(checkpoint),
        "seed": seed,
        "sets": sets.summary(),
        "ind": row["ind"],
        "dice": row["dice"],
        "ood_sets": row["sets"],
        "categories": row["categories"],
        "mean": row["mean"],
        "severity_spearman": row["severity_spearman"],
        "failure": row["failure"],
        "localisation": row["localisation"],
        "degree": row["degree"],
        "scores": row["scores"],
        "plots": written,
    }


def _plots(scores: dict, sets: dict, degree, folder) -> list[str]:
    """The figures of an evaluation, the same for the embedded benchmark and your own folders: ROC curves
    and score histograms per category, and the OOD degree's calibration on the InD images (when the
    checkpoint has a degree)."""
    if folder is None:
        return []
    from .benchmark.plots import degree_calibration_plot, method_plots

    by_set = {name: (v["category"], np.asarray(scores[name])) for name, v in sets.items()}
    written = method_plots("checkpoint", np.asarray(scores["ind"]), by_set, folder)
    if degree is not None:
        written.append(
            degree_calibration_plot(
                {"InD images": degree.transform(np.asarray(scores["ind"], dtype=np.float64))},
                Path(folder) / "checkpoint_degree_calibration.png",
                "OOD degree on the InD images (calibrated on the validation images)",
            )
        )
    return [str(p) for p in written]


def _folder_inputs(source) -> list:
    """The input files of a folder (or one file), or the ``image`` entries of a MONAI datalist JSON."""
    from .io import find_inputs

    source = Path(source)
    if source.is_file() and source.suffix == ".json":
        import json

        from .data import load_datalist

        splits = [
            key
            for key, value in json.loads(source.read_text(encoding="utf-8")).items()
            if isinstance(value, list)
        ]
        return [Path(entry["image"]) for split in splits for entry in load_datalist(source, split)]
    return list(find_inputs(source))


def parse_ood_set(text: str) -> tuple[str, str, str]:
    """``NAME=PATH[:CATEGORY]`` or ``PATH`` (the name is the folder's) -> ``(name, path, category)``."""
    name, _, rest = text.rpartition("=") if "=" in text else ("", "", text)
    path, _, category = rest.partition(":") if ":" in rest and not Path(rest).exists() else (rest, "", "")
    path = path.strip()
    if not path:
        raise ValueError(f"--ood {text!r}: give a folder, NAME=FOLDER or NAME=FOLDER:CATEGORY")
    return name.strip() or Path(path).name, path, category.strip() or "OOD"


def evaluate_folders(
    checkpoint,
    ind,
    ood_sets,
    labels=None,
    device=None,
    batch_size: int = 16,
    plots=None,
) -> dict:
    """Evaluate a checkpoint on your own data: InD images against one or more OOD sets.

    Every image is scored as ``monai-ood score`` scores it (volume-level image score, the checkpoint's
    detector); each OOD set gets AUROC, FPR@95TPR and AUPR-IN/OUT against the InD images (OOD = positive),
    each category the mean over its sets; with ``labels`` (a folder of label volumes named like the
    images, e.g. ``case01.nii.gz`` for ``case01.nii.gz`` or ``case01_0000.nii.gz``), failure detection
    (AURC of the image score against ``1 - Dice``) over every labelled image.

    Args:
        checkpoint: ``model.pt``.
        ind: the InD images: a folder, a file, or a MONAI datalist JSON.
        ood_sets: ``[(name, path, category), ...]`` (see :func:`parse_ood_set`).
        labels: a folder of label volumes, or ``None``.
        device, batch_size: where and how to run.
        plots: a folder for the ROC and histogram figures (PNG), or ``None``.

    Returns:
        A JSON-ready dict: ``ind`` (n, mean score), ``ood_sets`` (per set ``category, n, mean_score,
        auroc, fpr95, aupr_in, aupr_out``), ``categories``, ``failure`` (or ``None``), ``failed``
        (inputs that could not be scored, with the error), ``scores``, ``plots``.

    Raises:
        ValueError: no InD or no OOD images could be scored, or an OOD set without images.
    """
    from .engines.checkpoint import load_model
    from .inference import score_image
    from .io import output_stem, read_image

    loaded = load_model(checkpoint, device=device)
    if loaded.calibration_error is not None:
        raise ValueError(loaded.calibration_error)
    failed: list[dict] = []
    dice_of: dict[str, float] = {}
    score_of: dict[str, float] = {}
    label_files = {}
    if labels is not None:
        label_files = {output_stem(p): p for p in _folder_inputs(labels)}

    def scores_of(paths) -> list[float]:
        scores = []
        for path in paths:
            try:
                image = read_image(path)
                scored = score_image(
                    loaded.net, image, loaded.preprocessing, loaded.calibrator, batch_size, loaded.detector
                )
            except (ValueError, OSError, RuntimeError) as error:
                failed.append({"input": str(path), "error": " ".join(str(error).split())})
                continue
            scores.append(scored.image_score)
            score_of[str(path)] = scored.image_score
            stem = output_stem(path)
            label = label_files.get(stem) or label_files.get(stem.rsplit("_", 1)[0])
            if label is not None:
                import SimpleITK as sitk

                prediction = sitk.GetArrayFromImage(scored.segmentation)
                truth = sitk.GetArrayFromImage(read_image(label))
                if prediction.shape != truth.shape:
                    raise ValueError(f"{label}: the label has another shape than {path}")
                dice = dice_per_image(prediction[None], truth.astype(np.int64)[None], loaded.net.num_classes)
                dice_of[str(path)] = float(dice[0])
        return scores

    ind_paths = _folder_inputs(ind)
    ind_scores = np.asarray(scores_of(ind_paths))
    if ind_scores.size == 0:
        raise ValueError(f"no InD image of {str(ind)!r} could be scored")
    sets, scores = {}, {"ind": ind_scores.tolist()}
    for name, path, category in ood_sets:
        if name in sets or name == "ind":
            raise ValueError(f"two OOD sets are named {name!r}: name them NAME=FOLDER")
        set_scores = np.asarray(scores_of(_folder_inputs(path)))
        if set_scores.size == 0:
            raise ValueError(f"no image of the OOD set {name!r} ({path}) could be scored")
        sets[name] = {"category": category, "n": int(set_scores.size), "mean_score": float(set_scores.mean())}
        sets[name].update(ood_metrics(ind_scores, set_scores))
        scores[name] = set_scores.tolist()
    failure = None
    if dice_of:
        paths = list(dice_of)
        failure = risk_coverage([score_of[p] for p in paths], [1.0 - dice_of[p] for p in paths])
        failure["n"] = len(paths)
    degree = None
    if loaded.degree is not None:
        degree = degree_report(loaded.degree, ind_scores, {name: scores[name] for name in sets})
    written = _plots(scores, sets, loaded.degree, plots)
    return {
        "checkpoint": str(checkpoint),
        "ind": {"source": str(ind), "n": int(ind_scores.size), "mean_score": float(ind_scores.mean())},
        "ood_sets": sets,
        "categories": category_means(sets),
        "failure": failure,
        "degree": degree,
        "failed": failed,
        "scores": scores,
        "plots": written,
    }


def evaluation_markdown(report: dict) -> str:
    """The report as a markdown table: one row per OOD set, then the category means."""
    source = report["ind"].get(
        "source", "the embedded benchmark's InD reference (test slices and mild variants)"
    )
    lines = [
        f"InD: {source} ({report['ind']['n']} images, mean score {report['ind']['mean_score']:.3f})",
        "",
        "| OOD set | category | n | AUROC | FPR@95TPR | AUPR-IN | AUPR-OUT |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["ood_sets"].items():
        lines.append(
            f"| {name} | {row['category']} | {row['n']} | {row['auroc']:.3f} | {row['fpr95']:.3f} | "
            f"{row['aupr_in']:.3f} | {row['aupr_out']:.3f} |"
        )
    for category, row in report["categories"].items():
        lines.append(f"| mean of {category} | {category} | | {row['auroc']:.3f} | {row['fpr95']:.3f} | | |")
    if report.get("failure"):
        f = report["failure"]
        labelled = f" ({f['n']} labelled images)" if "n" in f else ""
        lines += [
            "",
            f"Failure detection{labelled}: AURC {f['aurc']:.4f} (random {f['random']:.4f}; lower is better)",
        ]
    if report.get("severity_spearman"):
        rho = report["severity_spearman"]
        lines += [
            "",
            "Severity rho (Spearman, image score vs artefact severity 0-3): "
            + ", ".join(f"{name} {value:.3f}" for name, value in rho.items()),
        ]
    if report.get("localisation"):
        loc = report["localisation"]
        lines += [
            "",
            f"Localisation on {loc['set']!r} (A_xi inside the brain): pixel AUROC {loc['pixel_auroc']:.3f}, "
            f"AUPRO {loc['aupro']:.3f}",
        ]
    if report.get("dice"):
        lines += ["", f"Mean foreground Dice on the InD images: {report['dice']['mean_foreground']:.3f}"]
    if report.get("degree"):
        rows = report["degree"]["calibration"]
        lines += [
            "",
            f"OOD degree on the {rows[0]['n']} InD images (a fraction 1 - t should lie above t if they are "
            "drawn like the validation images; in brackets the 95% range of that fraction):",
            "",
            "| degree > t | promised | observed |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['threshold']:g} | {r['expected_above']:.2f} | {r['observed_above']:.3f} "
            f"[{r['range95'][0]:.3f}, {r['range95'][1]:.3f}] |"
            for r in rows
        ]
    if report.get("failed"):
        lines += ["", f"Not scored: {len(report['failed'])} input(s), see evaluation.json"]
    return "\n".join(lines) + "\n"


def _localisation_inputs(score_maps, masks, valid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked ``(scores, lesion, inside)`` arrays of one shape ``(N, *spatial)``: float64 scores, the lesion
    mask inside ``valid``, and ``valid`` (all true when ``None``)."""
    scores = np.asarray(score_maps, dtype=np.float64)
    if scores.ndim < 2:
        raise ValueError(f"score_maps must be (N, *spatial) with a spatial axis, got shape {scores.shape}")
    checked = {}
    for name, array in (("masks", masks), ("valid", valid)):
        if array is None and name == "valid":
            continue
        array = np.asarray(array)
        if array.shape != scores.shape:
            raise ValueError(f"{name} must have the shape of score_maps {scores.shape}, got {array.shape}")
        if array.dtype != bool and not np.isin(array, (0, 1)).all():
            raise ValueError(
                f"{name} must be boolean (or 0/1), got values {np.unique(array)[:5].tolist()}..."
            )
        checked[name] = array.astype(bool)
    inside = checked.get("valid", np.ones(scores.shape, bool))
    where = "" if valid is None else " inside valid"
    bad = np.count_nonzero(~np.isfinite(scores[inside]))
    if bad:
        raise ValueError(f"score_maps contain {bad} NaN or Inf values{where}")
    lesion = checked["masks"] & inside
    if not lesion.any():
        raise ValueError(f"masks contain no lesion pixel{where}")
    if lesion.sum() == inside.sum():
        raise ValueError(f"no non-lesion pixel{where}: the FPR is undefined")
    return scores, lesion, inside


def _localisation_curves(score_maps, masks, valid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FPR, pixel TPR and PRO at every distinct score of the valid pixels, highest threshold first.

    One sort of the valid pixels by decreasing score: the pixels at or above a threshold are a prefix, so
    the counts at every threshold are cumulative sums taken at the end of each run of tied scores. Each
    curve starts at ``(0, 0, 0)`` (threshold above every score) and ends at ``(1, 1, 1)``.
    """
    from scipy import ndimage

    scores, lesion, inside = _localisation_inputs(score_maps, masks, valid)
    # Regions: connected components of each image's lesion mask, full connectivity (8 in 2D, 26 in 3D)
    # as MVTec's reference code (structure = ones((3, 3))) and anomalib (cv2, connectivity 8).
    structure = ndimage.generate_binary_structure(scores.ndim - 1, scores.ndim - 1)
    regions = np.zeros(scores.shape, np.int64)
    count = 0
    for i in range(len(scores)):
        labelled, n = ndimage.label(lesion[i], structure=structure)
        regions[i] = np.where(labelled > 0, labelled + count, 0)
        count += n
    region_of = regions[inside]
    sizes = np.bincount(region_of, minlength=count + 1).astype(np.float64)
    # Each lesion pixel adds 1 / (regions * its region's size) to PRO when it passes the threshold.
    overlap_weight = np.where(region_of > 0, 1.0 / (count * sizes[region_of]), 0.0)

    values = scores[inside]
    order = np.argsort(-values, kind="stable")
    values, positive, overlap_weight = values[order], region_of[order] > 0, overlap_weight[order]
    ends = np.append(np.flatnonzero(np.diff(values)), values.size - 1)  # last index of each tie run
    tp = np.cumsum(positive)[ends]
    fp = (ends + 1) - tp
    pro = np.cumsum(overlap_weight)[ends]
    fpr = np.concatenate([[0.0], fp / fp[-1]])
    tpr = np.concatenate([[0.0], tp / tp[-1]])
    pro = np.concatenate([[0.0], pro / pro[-1]])  # pro[-1] is 1 up to rounding
    return fpr, tpr, pro


def _area(x: np.ndarray, y: np.ndarray, limit: float = 1.0) -> float:
    """Trapezoidal area under ``y(x)`` for ``x`` in ``[0, limit]``, ``x`` non-decreasing from 0 to 1,
    with ``y`` interpolated linearly at ``limit``."""
    k = int(np.searchsorted(x, limit, side="right"))  # x[:k] <= limit; k >= 1 as x[0] = 0
    xs, ys = x[:k], y[:k]
    if xs[-1] < limit:
        y_limit = y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1])
        xs, ys = np.append(xs, limit), np.append(ys, y_limit)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def _check_fpr_limit(fpr_limit) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return float(fpr_limit)


def pixel_auroc(score_maps, masks, valid=None) -> float:
    """Pixel-level AUROC of score maps against lesion masks, all images' pixels pooled.

    Lesion pixels are the positive class and higher scores mean more OOD; tied scores count half, as in
    :func:`sklearn.metrics.roc_auc_score` (which gives the same value on the flattened valid pixels).

    Args:
        score_maps: ``(N, *spatial)`` scores, e.g. the calibrated maps A_xi ``(N, H, W)``.
        masks: ``(N, *spatial)`` boolean (or 0/1) lesion masks.
        valid: ``(N, *spatial)`` boolean mask of the pixels to evaluate (e.g. the brain mask); pixels
            outside it are ignored, lesion or not. ``None``: every pixel.

    Returns:
        The AUROC in [0, 1]; 0.5 for an uninformative map.

    Raises:
        ValueError: shapes differ, a mask is not boolean, a valid score is NaN or Inf, or the valid pixels
            hold no lesion pixel or no non-lesion pixel.

    Example:
        >>> masks = np.zeros((1, 4, 4), bool); masks[0, :2, :2] = True
        >>> pixel_auroc(masks.astype(float), masks)
        1.0
    """
    fpr, tpr, _ = _localisation_curves(score_maps, masks, valid)
    return _area(fpr, tpr)


def aupro(score_maps, masks, valid=None, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region overlap (PRO) curve up to ``fpr_limit`` (Bergmann et al.,
    "The MVTec Anomaly Detection Dataset", IJCV 2021), as MVTec's reference code and anomalib compute it.

    The regions are the connected components of each image's lesion mask (``scipy.ndimage.label`` with
    full connectivity: 8 neighbours in 2D, 26 in 3D), restricted to the ``valid`` pixels. At a threshold
    t, PRO(t) is the mean over all regions of all images of the fraction of the region's pixels with score
    >= t (each region counts once, whatever its size), and FPR(t) is the fraction of valid non-lesion
    pixels, pooled over images, with score >= t. The curve is evaluated exactly, at every distinct score
    (one sort of the valid pixels, so any input size is exact; no threshold grid), joined by straight
    lines (so tied scores count half, as in AUROC), integrated over FPR in ``[0, fpr_limit]`` with PRO
    interpolated at the limit, and divided by ``fpr_limit``.

    A perfect map scores 1; a map ranking every lesion pixel below every other pixel scores 0; a random
    map (scores independent of the masks) has PRO(t) ~= FPR(t) and scores ~= ``fpr_limit / 2`` (0.15 at
    the default 0.3), not 0.5 as AUROC.

    Args:
        score_maps: ``(N, *spatial)`` scores, e.g. the calibrated maps A_xi ``(N, H, W)``.
        masks: ``(N, *spatial)`` boolean (or 0/1) lesion masks; an image may have no lesion.
        valid: ``(N, *spatial)`` boolean mask of the pixels to evaluate (e.g. the brain mask); pixels
            outside it are ignored, lesion or not. ``None``: every pixel.
        fpr_limit: the upper FPR bound of the integration, in (0, 1]; 0.3 as in MVTec AD.

    Returns:
        The AUPRO in [0, 1].

    Raises:
        ValueError: shapes differ, a mask is not boolean, a valid score is NaN or Inf, the valid pixels
            hold no lesion pixel or no non-lesion pixel, or ``fpr_limit`` is outside (0, 1].

    Example:
        >>> masks = np.zeros((1, 4, 4), bool); masks[0, :2, :2] = True
        >>> aupro(masks.astype(float), masks)
        1.0
    """
    limit = _check_fpr_limit(fpr_limit)
    fpr, _, pro = _localisation_curves(score_maps, masks, valid)
    return _area(fpr, pro, limit) / limit


def localisation_metrics(score_maps, masks, valid=None, fpr_limit: float = 0.3) -> dict[str, float]:
    """:func:`pixel_auroc` and :func:`aupro` from one sort of the pixels.

    Args:
        score_maps: ``(N, *spatial)`` scores.
        masks: ``(N, *spatial)`` boolean (or 0/1) lesion masks.
        valid: ``(N, *spatial)`` boolean mask of the pixels to evaluate, or ``None`` for all.
        fpr_limit: the FPR bound of the AUPRO.

    Returns:
        ``{"pixel_auroc": ..., "aupro": ...}``.

    Raises:
        ValueError: as :func:`aupro`.
    """
    limit = _check_fpr_limit(fpr_limit)
    fpr, tpr, pro = _localisation_curves(score_maps, masks, valid)
    return {"pixel_auroc": _area(fpr, tpr), "aupro": _area(fpr, pro, limit) / limit}
