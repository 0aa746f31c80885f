"""One evaluation path for the benchmark (``benchmarks/run.py``) and ``monai-ood evaluate``.

The sets (:func:`benchmark_sets`) and the metrics (:func:`evaluate`) are built here once; a method enters
as a *scorer*: a function from preprocessed slices ``(N, 1, H, W)`` to a :class:`Scores` (an image score,
higher = more OOD, and, where the method has them, a pixel score map and a segmentation). Two scorers
are provided: :func:`detector_scorer` (any :class:`~monai_ood.detectors.Detector`, with the segmentation
network whose failures it should predict) and :func:`checkpoint_scorer` (a ``model.pt`` as ``monai-ood
score`` runs it: the image score of the head and the calibrated map A_xi).

What :func:`evaluate` measures (BENCHMARK.md v2, "Metrics"; OOD is the positive class):

* per OOD set: AUROC, FPR@95TPR, AUPR-IN, AUPR-OUT against the InD reference (the test split and its
  fixed-seed mild variants), the set's mean score and size; per category (C1, C2, C3, lesion) the mean
  over its sets; ``mean``: the mean over the C1-C3 sets (the lesion set is reported on its own);
* ``severity_spearman``: per artefact, Spearman's rho between the image score and the severity (0 = the
  clean slices the artefacts were made from, 1, 2, 3);
* ``failure``: on those clean slices and their artefact versions (their labels stay valid), the
  risk-coverage curve of 1 - Dice when images are kept by increasing score: AURC (lower is better),
  Spearman(score, 1 - Dice) and the random AURC;
* ``localisation``: on the lesion set, pixel AUROC and AUPRO of the score map inside the brain (maps
  only: a monotone calibration such as A_xi = WeibullCDF(A) leaves both unchanged);
* ``dice``: per class and mean foreground Dice of the scorer's segmentation on the InD reference;
* ``ind.warped_vs_clean_auroc``: :func:`warp_sensitivity`, how much one mild warp alone moves the score;
* ``scores``: every image score (InD and per set), so that plots and new metrics never need a re-run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..evaluation import (
    OOD_METRICS,
    category_means,
    dice_per_class,
    dice_per_image,
    ood_metrics,
    ood_set_name,
    risk_coverage,
    severity_correlation,
)

__all__ = [
    "BenchmarkSets",
    "Scorer",
    "Scores",
    "benchmark_sets",
    "checkpoint_scorer",
    "detector_scorer",
    "evaluate",
]

#: The categories averaged into ``mean`` (the lesion set is a localisation test, reported on its own).
MEAN_CATEGORIES = ("C1", "C2", "C3")


@dataclass
class Scores:
    """What a method gives for ``N`` slices: ``image_score`` ``(N,)`` (higher = more OOD), optionally a
    ``score_map`` ``(N, H, W)`` and a ``segmentation`` ``(N, H, W)``."""

    image_score: np.ndarray
    score_map: np.ndarray | None = None
    segmentation: np.ndarray | None = None


Scorer = Callable[[np.ndarray], Scores]


@dataclass
class BenchmarkSets:
    """The benchmark's images, preprocessed: the InD reference, the OOD sets and the artefacts' base.

    Attributes:
        ind: InD reference items (the test split and its mild variants), dicts with ``image``, ``label``.
        ood: set name (:func:`~monai_ood.evaluation.ood_set_name`) -> its OOD items.
        artefact_base: the clean InD test items the artefact (and lesion) sets were made from.
        sources: which offline sources were installed (:func:`monai_ood.benchmark.sources.available_sources`).
    """

    ind: list[dict[str, Any]]
    ood: dict[str, list[Any]]
    artefact_base: list[dict[str, Any]]
    sources: dict[str, bool] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Set sizes and categories, and the sources present (for the results file)."""
        return {
            "ind": len(self.ind),
            "artefact_base": len(self.artefact_base),
            "sets": {
                name: {"category": items[0].category, "n": len(items)} for name, items in self.ood.items()
            },
            "sources": dict(self.sources),
        }


def benchmark_sets(
    preprocessing=None, seed: int = 0, cache_dir=None, artefact_limit: int | None = None
) -> BenchmarkSets:
    """Build the InD reference and every available OOD set of BENCHMARK.md at ``preprocessing``.

    Args:
        preprocessing: the model's :class:`~monai_ood.preprocessing.SlicePreprocessing` (default one).
        seed: seed of the InD test variants, the artefact parameters and the lesions.
        cache_dir: cache of the embedded InD pool.
        artefact_limit: use only the first this many test slices for the artefact and lesion sets
            (``None``: all; a smoke test uses a few).

    Returns:
        The sets; a source that is not installed is skipped with a warning naming its install command.
    """
    from ..preprocessing import SlicePreprocessing
    from .ood_sets import load_ood_sets
    from .pool import brain_test_variants, load_brain_dataset
    from .sources import available_sources

    preprocessing = preprocessing or SlicePreprocessing()
    test = load_brain_dataset(cache_dir=cache_dir, preprocessing=preprocessing)["test"]
    ind = list(test) + list(brain_test_variants(test, seed=seed))
    base = list(test) if artefact_limit is None else list(test[:artefact_limit])
    sets: dict[str, list[Any]] = defaultdict(list)
    for item in load_ood_sets(base, preprocessing=preprocessing, seed=seed):
        sets[ood_set_name(item)].append(item)
    return BenchmarkSets(ind, dict(sorted(sets.items())), base, available_sources())


def _stack(images: Sequence[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.stack([np.asarray(i, dtype=np.float32) for i in images]))


def detector_scorer(detector, segmenter: torch.nn.Module | None = None, batch_size: int = 32) -> Scorer:
    """A scorer from a :class:`~monai_ood.detectors.Detector` (image score and its map, if any) and the
    segmentation network ``segmenter`` whose failures it should predict (argmax of its logits)."""

    @torch.no_grad()
    def score(images: np.ndarray) -> Scores:
        scores, maps, segmentation, num_batches = [], [], [], 0
        if segmenter is not None:
            segmenter.eval()
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size])
            out = detector(batch)
            num_batches += 1
            scores.append(out.image_score.double().cpu().numpy())
            if out.score_map is not None:
                maps.append(out.score_map[:, 0].float().cpu().numpy())
            if segmenter is not None:
                device = next(segmenter.parameters()).device
                segmentation.append(segmenter(batch.to(device)).argmax(1).to(torch.uint8).cpu().numpy())
        return Scores(
            np.concatenate(scores),
            np.concatenate(maps) if maps and len(maps) == num_batches else None,
            np.concatenate(segmentation) if segmentation else None,
        )

    return score


def checkpoint_scorer(loaded, batch_size: int = 32) -> Scorer:
    """A scorer from a loaded checkpoint (:func:`monai_ood.engines.load_model`), as ``monai-ood score``
    runs it: the head's image score, the calibrated map A_xi (A where there is no calibration) and the
    segmentation."""
    from ..inference import score_slices

    def score(images: np.ndarray) -> Scores:
        out = score_slices(loaded.net, images, loaded.calibrator, batch_size, loaded.detector)
        score_map = out["calibrated_map"] if out["calibrated_map"] is not None else out["score_map"]
        return Scores(out["image_score"].astype(np.float64), score_map, out["segmentation"])

    return score


def warp_sensitivity(ind_scores, variants: Sequence[str | None]) -> float | None:
    """AUROC of the InD reference's warped variants against its clean slices (0.5: the score ignores the
    one mild warp; above: warped InD images look more OOD, the resampling shortcut of BENCHMARK.md's
    pitfalls). ``variants`` is each item's ``"variant"`` (``None`` for a clean slice); ``None`` when
    either group is empty."""
    warped = np.array([v is not None for v in variants])
    scores = np.asarray(ind_scores, dtype=np.float64)
    if warped.all() or not warped.any():
        return None
    return ood_metrics(scores[~warped], scores[warped])["auroc"]


def _finite(scores: np.ndarray, what: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"the method gave NaN or infinite scores for {what}")
    return scores


def evaluate(
    scorer: Scorer,
    sets: BenchmarkSets,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    degree=None,
) -> dict[str, Any]:
    """Every metric of one method on the benchmark's sets (see the module docstring).

    Args:
        scorer: the method (:func:`detector_scorer`, :func:`checkpoint_scorer` or any function of that form).
        sets: :func:`benchmark_sets`.
        num_classes: classes of the segmentation, background included.
        class_names: names of the classes (background first) for the Dice table.
        degree: a :class:`~monai_ood.calibration.DegreeCalibrator` fitted on the method's validation image
            scores, for the OOD degree's calibration on the InD test images and its severity correlation
            (``row["degree"]``, :func:`monai_ood.evaluation.degree_report`), or ``None``.

    Returns:
        A JSON-ready dict: ``ind``, ``sets``, ``categories``, ``mean``, ``severity_spearman``, ``failure``,
        ``localisation``, ``dice``, ``degree`` and ``scores`` (``failure``, ``localisation`` and ``dice`` are
        ``None`` when the method gives no segmentation or no map, ``degree`` without a ``degree``).
    """
    from ..evaluation import degree_report, localisation_metrics

    names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    ind = scorer(_stack([i["image"] for i in sets.ind]))
    ind_scores = _finite(ind.image_score, "the InD test images")
    row: dict[str, Any] = {
        "ind": {
            "n": len(ind_scores),
            "mean_score": float(ind_scores.mean()),
            "warped_vs_clean_auroc": warp_sensitivity(ind_scores, [i.get("variant") for i in sets.ind]),
        },
        "sets": {},
        "scores": {"ind": ind_scores.tolist()},
        "dice": None,
        "failure": None,
        "localisation": None,
    }
    if ind.segmentation is not None:
        dice = dice_per_class(ind.segmentation, np.stack([i["label"][0] for i in sets.ind]), num_classes)
        row["dice"] = {
            "per_class": dict(zip(names[1:], dice.tolist(), strict=True)),
            "mean_foreground": float(np.nanmean(dice)),
        }

    base = scorer(_stack([i["image"] for i in sets.artefact_base]))
    base_scores = _finite(base.image_score, "the clean artefact base")
    by_artefact: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    failure = {"scores": list(base_scores), "segmentation": [], "labels": []}
    if base.segmentation is not None:
        failure["segmentation"].extend(base.segmentation)
        failure["labels"].extend(i["label"][0] for i in sets.artefact_base)
    for name, items in sets.ood.items():
        out = scorer(_stack([i.image for i in items]))
        scores = _finite(out.image_score, f"the set {name!r}")
        row["scores"][name] = scores.tolist()
        row["sets"][name] = {
            "category": items[0].category,
            "n": len(items),
            "mean_score": float(scores.mean()),
            **ood_metrics(ind_scores, scores),
        }
        if items[0].artefact is not None:
            by_artefact[items[0].artefact][0].extend(scores)
            by_artefact[items[0].artefact][1].extend([items[0].severity] * len(items))
            failure["scores"].extend(scores)
            if out.segmentation is not None:
                failure["segmentation"].extend(out.segmentation)
                failure["labels"].extend(i.label[0] for i in items)
        masks = [getattr(i, "mask", None) for i in items]
        if out.score_map is not None and masks and all(m is not None for m in masks):
            valid = np.stack([i.label[0] > 0 for i in items]) if items[0].label is not None else None
            row["localisation"] = {
                "set": name,
                **localisation_metrics(out.score_map, np.stack([np.asarray(m)[0] > 0 for m in masks]), valid),
            }
    # each artefact's scores with the clean base's as severity 0
    severity_groups = {
        artefact: (list(base_scores) + scores, [0] * len(base_scores) + severities)
        for artefact, (scores, severities) in sorted(by_artefact.items())
    }
    row["severity_spearman"] = {
        artefact: severity_correlation(*group) for artefact, group in severity_groups.items()
    }
    row["degree"] = None
    if degree is not None:
        row["degree"] = degree_report(
            degree,
            ind_scores,
            {name: row["scores"][name] for name in sets.ood},
            severity_groups,
            ind_subsets={"clean test slices": [i.get("variant") is None for i in sets.ind]},
        )
    if failure["segmentation"] and len(failure["segmentation"]) == len(failure["scores"]):
        risks = 1.0 - dice_per_image(
            np.stack(failure["segmentation"]), np.stack(failure["labels"]), num_classes
        )
        row["failure"] = risk_coverage(failure["scores"], risks)
    row["categories"] = category_means(row["sets"])
    mean_sets = [v for v in row["sets"].values() if v["category"] in MEAN_CATEGORIES]
    row["mean"] = {m: float(np.mean([v[m] for v in mean_sets])) for m in OOD_METRICS} if mean_sets else {}
    return row
