"""Scoring terms: each one reads features it is handed (one encoder pass shared by all) and gives an
image score (higher = more OOD) and, where it has one, a score map.

The contract, as pytorch-ood's ``fit_features`` / ``predict_features``: a term never runs the network;
:class:`~monai_ood.detectors.fused.FusedDetector` runs it once per batch
(:func:`monai_ood.networks.capture.capture_features`) and hands every term the same :class:`Features`.

* ``fit_features(features)`` fits on one :class:`Features` or an iterable of them (streamed: a term keeps
  only what it needs per batch, so fitting on many images never holds their feature maps); returns
  ``self``.
* ``predict_features(features)`` returns a :class:`TermOutput`: ``image_score`` ``(B,)`` float64 and a
  ``score_map`` ``(B, 1, *feature_spatial)`` or ``None``.
* ``layers``: the network layers the term reads (empty for image-space terms).
* ``config()`` (plain values) and ``state()`` (tensors) rebuild a fitted term with
  :func:`term_from_state`, so a fitted detector is stored in ``model.pt`` and loaded with
  ``torch.load(..., weights_only=True)``.

Terms: :class:`StageStatisticsTerm` (channel mean and std of one stage, one Ledoit-Wolf Gaussian; the
FRODO-style term, and with ``("mean",)`` the single-Gaussian Mahalanobis of Gonzalez et al.),
:class:`ClassPrototypeTerm` (class prototypes with diagonal variances on one stage, Cho et al.'s
``A(x) = min_k D_M`` refitted post hoc with area-fraction labels: a class-conditional map at the stage's
resolution), :class:`IntensityTerm` (a coarse foreground intensity histogram, one Gaussian).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.utils import look_up_option

from ..calibration.weibull import NotFittedError
from ..networks.feature_grid import area_fractions
from ..networks.gaussian import fit_shrunk_gaussian, mahalanobis_distance

__all__ = [
    "TERMS",
    "ClassPrototypeTerm",
    "Features",
    "IntensityTerm",
    "StageStatisticsTerm",
    "Term",
    "TermOutput",
    "area_fractions",
    "channel_statistics",
    "foreground_histograms",
    "term_from_state",
]

STATISTICS = ("mean", "std")


@dataclass
class Features:
    """What one network pass gives the terms.

    Attributes:
        images: the input batch ``(B, C, *spatial)`` (intensity terms read it).
        stages: ``{layer name: (B, C_s, *S_s)}`` outputs of the captured layers.
        logits: the segmentation logits ``(B, K, *spatial)`` or ``None`` (encoder-only pass).
        labels: class indices ``(B, 1, *spatial)`` for fitting class prototypes, or ``None`` (then the
            prediction, ``logits.argmax``, is used; so it is for the items of a batch labelled ``-1``).
    """

    images: torch.Tensor
    stages: dict[str, torch.Tensor]
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def stage(self, layer: str) -> torch.Tensor:
        if layer not in self.stages:
            raise KeyError(f"the features hold no layer {layer!r}; they have {sorted(self.stages)}")
        return self.stages[layer]


@dataclass
class TermOutput:
    """One term's scores of a batch: ``image_score`` ``(B,)`` float64, ``score_map`` ``(B, 1, *S)``
    (the term's own resolution) or ``None``."""

    image_score: torch.Tensor
    score_map: torch.Tensor | None = None


class Term:
    """Base class: subclasses implement ``_begin`` / ``_add`` / ``_end`` (streamed fit), ``_predict``,
    ``config`` and ``state`` / ``_load``."""

    kind: str = "term"
    requires_fit: bool = True

    def __init__(self, layer: str | None = None) -> None:
        self.layer = layer
        self._fitted = False

    @property
    def layers(self) -> list[str]:
        return [] if self.layer is None else [self.layer]

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}:{self.layer}"

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    @property
    def has_map(self) -> bool:
        return False

    def fit_features(self, features: Features | Iterable[Features]) -> Term:
        """Fit on one :class:`Features` or an iterable of them (each visited once); returns ``self``."""
        if isinstance(features, Features):
            features = [features]
        self._begin()
        seen = 0
        for batch in features:
            self._add(batch)
            seen += int(batch.images.shape[0])
        self._end(seen)
        self._fitted = True
        return self

    def predict_features(self, features: Features) -> TermOutput:
        """Scores of one batch of features; higher = more OOD."""
        if not self._fitted:
            raise NotFittedError(f"the term {self.name!r} must be fitted first: call .fit_features(...)")
        return self._predict(features)

    # subclasses -----------------------------------------------------------------------------------------
    def _begin(self) -> None:
        raise NotImplementedError

    def _add(self, features: Features) -> None:
        raise NotImplementedError

    def _end(self, count: int) -> None:
        raise NotImplementedError

    def _predict(self, features: Features) -> TermOutput:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The constructor arguments, as plain values."""
        return {"layer": self.layer}

    def state(self) -> dict[str, torch.Tensor]:
        """The fitted values, as CPU tensors."""
        raise NotImplementedError

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def load_state(self, state: Mapping[str, torch.Tensor]) -> Term:
        """Restore the values of :meth:`state`; returns ``self`` (fitted)."""
        try:
            self._load(state)
        except KeyError as err:
            raise ValueError(f"the stored state of term {self.name!r} lacks {err}") from err
        self._fitted = True
        return self


# ------------------------------------------------------------------------------------------ helpers


def channel_statistics(features: torch.Tensor, statistics: Sequence[str] = STATISTICS) -> torch.Tensor:
    """``(B, C, *S)`` to ``(B, len(statistics) * C)`` float64: per channel the spatial ``mean`` and the
    population standard deviation ``std`` (``correction=0``), concatenated in the order given (computed
    in the features' dtype, returned as float64)."""
    # one pass in the features' own precision (float32 for a float32 network), then float64
    std, mean = torch.std_mean(features.detach().flatten(2), dim=2, correction=0)
    parts = {"mean": mean, "std": std}
    return torch.cat([parts[s].double() for s in statistics], dim=1)


def foreground_histograms(images: torch.Tensor, bins: int = 32, threshold: float = 1e-3) -> torch.Tensor:
    """Per image and channel, the density of intensities over ``[0, 1]`` inside the foreground (pixels
    whose maximum over channels exceeds ``threshold``): ``(B, C * bins)`` float64, channel-major.

    Intensities are clipped to ``[0, 1]``; ``bins`` equal bins as :func:`numpy.histogram` with
    ``range=(0, 1)`` (the last bin includes 1); an image without foreground gets zeros. Vectorised in
    torch (one ``scatter_add`` per batch), on the images' device."""
    x = images.detach().double().flatten(2)  # (B, C, N)
    mask = (x.max(dim=1).values > threshold).double()  # (B, N)
    index = (x.clamp(0.0, 1.0) * bins).long().clamp_max(bins - 1)  # (B, C, N)
    counts = torch.zeros(x.shape[0], x.shape[1], bins, dtype=torch.float64, device=x.device)
    counts.scatter_add_(2, index, mask[:, None, :].expand_as(x).contiguous())
    total = mask.sum(dim=1).clamp_min(1.0)[:, None, None]
    return (counts / (total / bins)).flatten(1)


def _gaussian_state(mean: torch.Tensor, cholesky: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"mean": mean.detach().double().cpu(), "cholesky": cholesky.detach().double().cpu()}


# ------------------------------------------------------------------------------------------- terms


class _GaussianTerm(Term):
    """A term that reduces each image to a vector (:meth:`vectors`), fits one Ledoit-Wolf Gaussian to the
    training vectors and scores the Mahalanobis distance (not squared) to it; no map."""

    def __init__(self, layer: str | None = None) -> None:
        super().__init__(layer)
        self.mean_: torch.Tensor | None = None
        self.cholesky_: torch.Tensor | None = None
        self.shrinkage_: float | None = None
        self._vectors: list[torch.Tensor] = []

    def vectors(self, features: Features) -> torch.Tensor:
        raise NotImplementedError

    def _begin(self) -> None:
        self._vectors = []

    def _add(self, features: Features) -> None:
        self._vectors.append(self.vectors(features).cpu())

    def _end(self, count: int) -> None:
        x = torch.cat(self._vectors).numpy() if self._vectors else np.zeros((0, 0))
        self._vectors = []
        if len(x) < 2:
            raise ValueError(f"the term {self.name!r} needs at least 2 training images, got {len(x)}")
        if not np.isfinite(x).all():
            raise ValueError(f"the vectors of the term {self.name!r} contain NaN or inf")
        gaussian = fit_shrunk_gaussian(x)
        self.mean_, self.cholesky_, self.shrinkage_ = gaussian.mean, gaussian.cholesky, gaussian.shrinkage

    def _predict(self, features: Features) -> TermOutput:
        v = self.vectors(features)
        return TermOutput(mahalanobis_distance(v, self.mean_.to(v.device), self.cholesky_.to(v.device)), None)

    def state(self) -> dict[str, torch.Tensor]:
        return _gaussian_state(self.mean_, self.cholesky_)

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        self.mean_, self.cholesky_ = state["mean"].double().cpu(), state["cholesky"].double().cpu()


class StageStatisticsTerm(_GaussianTerm):
    """Channel statistics of one encoder stage and one Ledoit-Wolf Gaussian over the training images;
    the score is the Mahalanobis distance (not squared) to it.

    Per image, the stage output ``(C, *S)`` becomes its channel ``mean`` and ``std`` over space (float64,
    ``2C`` values); the Gaussian's mean and shrunk covariance come from
    :func:`monai_ood.networks.gaussian.fit_shrunk_gaussian` (FRODO, Çallı et al.; Lambert et al. 2023).
    With ``statistics=("mean",)`` this is the single-Gaussian Mahalanobis score on globally pooled
    features of Gonzalez et al. (MICCAI 2021), the one implementation behind
    :class:`~monai_ood.detectors.MahalanobisDetector` and the feature-statistics detector. No map.

    Args:
        layer: dotted name of the stage in the network's ``named_modules()``.
        statistics: a non-empty subset of ``("mean", "std")``, in concatenation order.
    """

    kind = "statistics"

    def __init__(self, layer: str, statistics: Sequence[str] = STATISTICS) -> None:
        if isinstance(statistics, str) or not statistics:
            raise ValueError(f"statistics must be a non-empty sequence of {STATISTICS}, got {statistics!r}")
        statistics = tuple(look_up_option(s, STATISTICS) for s in statistics)
        if len(set(statistics)) != len(statistics):
            raise ValueError(f"statistics must not repeat, got {statistics!r}")
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer must be a module name, got {layer!r}")
        super().__init__(layer)
        self.statistics = statistics

    def vectors(self, features: Features) -> torch.Tensor:
        """The ``(B, D)`` float64 statistics of the stage."""
        return channel_statistics(features.stage(self.layer), self.statistics)

    def config(self) -> dict[str, Any]:
        return {"layer": self.layer, "statistics": list(self.statistics)}


class ClassPrototypeTerm(Term):
    """Class prototypes with diagonal variances on one stage, fitted post hoc; the map is
    ``A(x) = min_k D_M(f(x), mu_k)`` per feature cell (Cho et al. 2023, eq. 6, on the stage's raw
    features instead of a trained projection), the image score its mean over the cells (the paper's
    ``||A(x)||_1 / cells``).

    * Fit: every feature cell counts for every class with its **area fraction** (the share of the
      cell's pixels with that label, :func:`area_fractions`), so a minority class that never holds a
      cell's majority still gets a prototype (CSF at 1/16 resolution). ``mu_k`` and the diagonal
      variance ``var_k`` are the fraction-weighted mean and variance in float64; variances are floored at
      ``min_variance`` times the median variance (a constant channel would divide by zero). Labels: the
      ground truth when the features carry ``labels``, else the network's own prediction.
    * Distance: ``D_M = sqrt(mean_c (f_c - mu_kc)^2 / var_kc)``, the per-channel root mean square of
      the z-scores (the paper's ``D_M`` divided by ``sqrt(C)``: about 1 for a typical cell whatever the
      stage's width). Classes with no training weight are left out of the minimum.

    Args:
        layer: dotted name of the stage.
        num_classes: K (background included).
        min_variance: variance floor, relative to the median fitted variance.
    """

    kind = "prototypes"

    def __init__(self, layer: str, num_classes: int, min_variance: float = 1e-3) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if not 0.0 < float(min_variance) < 1.0:
            raise ValueError(f"min_variance must lie in (0, 1), got {min_variance!r}")
        super().__init__(layer)
        self.num_classes = num_classes
        self.min_variance = float(min_variance)
        self.means_: torch.Tensor | None = None  # (K, C)
        self.variances_: torch.Tensor | None = None  # (K, C)
        self.present_: torch.Tensor | None = None  # (K,) bool
        self._sums = self._squares = self._weights = None

    @property
    def has_map(self) -> bool:
        return True

    def _labels(self, features: Features) -> torch.Tensor:
        labels = features.labels
        if labels is not None and bool((labels >= 0).all()):
            return labels
        if features.logits is None:
            raise ValueError(f"the term {self.name!r} needs labels or the network's logits to fit")
        predicted = features.logits.argmax(dim=1, keepdim=True).to(torch.int64)
        return predicted if labels is None else torch.where(labels >= 0, labels.to(predicted), predicted)

    def _begin(self) -> None:
        self._sums = self._squares = self._weights = None

    def _add(self, features: Features) -> None:
        f = features.stage(self.layer).detach().double()  # (B, C, *S)
        weights = area_fractions(self._labels(features).to(f.device), self.num_classes, f.shape[2:])
        w, v = weights.flatten(2), f.flatten(2)  # (B, K, N), (B, C, N)
        sums = torch.einsum("bkn,bcn->kc", w, v).cpu()
        squares = torch.einsum("bkn,bcn->kc", w, v * v).cpu()
        total = w.sum(dim=(0, 2)).cpu()
        if self._sums is None:
            self._sums, self._squares, self._weights = sums, squares, total
        else:
            self._sums += sums
            self._squares += squares
            self._weights += total

    def _end(self, count: int) -> None:
        if self._sums is None or count < 1:
            raise ValueError(f"the term {self.name!r} needs at least 1 training image")
        present = self._weights > 0
        if not present.any():
            raise ValueError(f"the term {self.name!r}: no class has any training weight")
        denominator = self._weights.clamp_min(1e-12)[:, None]
        mean = self._sums / denominator
        variance = (self._squares / denominator - mean * mean).clamp_min(0.0)
        if not (torch.isfinite(mean).all() and torch.isfinite(variance).all()):
            raise ValueError(f"the features of stage {self.layer!r} contain NaN or inf")
        floor = max(float(variance[present].median()) * self.min_variance, 1e-12)
        self.means_, self.variances_, self.present_ = mean, variance.clamp_min(floor), present
        self._sums = self._squares = self._weights = None

    def class_distances(self, features: Features) -> torch.Tensor:
        """``(B, K, *S)`` distances of every cell to every class prototype (absent classes: ``inf``), in
        the features' precision."""
        f = features.stage(self.layer).detach()
        v = f.flatten(2)  # (B, C, N), in the features' precision (float32: the map's cost stays small)
        mean = self.means_.to(f.device, v.dtype)  # (K, C)
        inv = (1.0 / self.variances_).to(f.device, v.dtype)
        # sum_c (v - mu)^2 / var, expanded into three matrix products (no (B, K, C, N) intermediate)
        z2 = (
            torch.einsum("bcn,kc->bkn", v * v, inv)
            - 2.0 * torch.einsum("bcn,kc->bkn", v, mean * inv)
            + (mean * mean * inv).sum(dim=1)[None, :, None]
        )
        distances = (z2.clamp_min(0.0) / v.shape[1]).sqrt().reshape(f.shape[0], -1, *f.shape[2:])
        absent = ~self.present_.to(f.device)
        if absent.any():
            distances[:, absent] = float("inf")
        return distances

    def _predict(self, features: Features) -> TermOutput:
        score_map = self.class_distances(features).min(dim=1, keepdim=True).values
        return TermOutput(score_map.flatten(1).double().mean(dim=1), score_map)

    def config(self) -> dict[str, Any]:
        return {"layer": self.layer, "num_classes": self.num_classes, "min_variance": self.min_variance}

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "means": self.means_.cpu(),
            "variances": self.variances_.cpu(),
            "present": self.present_.cpu(),
        }

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        means, variances = state["means"].double().cpu(), state["variances"].double().cpu()
        if means.shape[0] != self.num_classes or means.shape != variances.shape:
            raise ValueError(
                f"the stored prototypes of {self.name!r} have shape {tuple(means.shape)}, "
                f"expected ({self.num_classes}, C)"
            )
        self.means_, self.variances_, self.present_ = means, variances, state["present"].bool().cpu()


class IntensityTerm(_GaussianTerm):
    """A coarse intensity histogram inside the foreground and one Ledoit-Wolf Gaussian over the training
    images' histograms; the score is the Mahalanobis distance (IHF, Vasiliuk et al. 2023, without the
    PCA). Reads the preprocessed images (intensities in ``[0, 1]``), no network layer.

    Coarse on purpose (``bins <= 50``): a fine histogram keys on quantisation combs and on whether an
    image was interpolated (BENCHMARK.md, "Quantisation shortcut"); fit it on images that went through
    the same interpolation as test images (the fused detector adds warped copies).

    Args:
        bins: histogram bins over ``[0, 1]`` (2..50).
        threshold: foreground = pixels whose maximum over channels exceeds it.
    """

    kind = "intensity"

    def __init__(self, bins: int = 32, threshold: float = 1e-3) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= 50:
            raise ValueError(f"bins must be an int in [2, 50] (a coarse histogram), got {bins!r}")
        if not 0.0 <= float(threshold) < 1.0:
            raise ValueError(f"threshold must lie in [0, 1), got {threshold!r}")
        super().__init__(None)
        self.bins = bins
        self.threshold = float(threshold)

    def vectors(self, features: Features) -> torch.Tensor:
        return foreground_histograms(features.images, self.bins, self.threshold)

    def config(self) -> dict[str, Any]:
        return {"bins": self.bins, "threshold": self.threshold}


#: the registry: a new term is one class here plus one entry
TERMS: dict[str, type[Term]] = {
    cls.kind: cls for cls in (StageStatisticsTerm, ClassPrototypeTerm, IntensityTerm)
}


def term_from_state(entry: Mapping[str, Any]) -> Term:
    """Rebuild a fitted term from ``{"kind", "config", "state"}`` (what the fused detector stores)."""
    kind = entry.get("kind")
    if kind not in TERMS:
        raise ValueError(f"unknown term kind {kind!r}; known: {sorted(TERMS)}")
    return TERMS[kind](**dict(entry.get("config") or {})).load_state(entry.get("state") or {})
