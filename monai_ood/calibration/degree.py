"""The OOD degree: an image score read against the validation images' scores, as a number in [0, 1].

Meaning: a degree ``d`` says that a fraction ``d`` of in-distribution (validation) images score lower
than this one: ``0.5`` is a typical image, ``0.99`` is more atypical than 99 % of validation images.
Up to the ``1 - tail_fraction`` quantile of the validation scores it is their empirical distribution
(mid-rank plotting positions ``(i - 0.5) / n``, linear in between); above it, a generalised Pareto
distribution fitted to the validation scores' exceedances (the peaks-over-threshold model of extreme
value theory, :func:`scipy.stats.genpareto`) carries it on, so the degree keeps rising beyond the
largest validation score instead of stopping at 1 there.

What it assumes: that the validation images are drawn like the in-distribution images the model will
see (same scanners, protocols, anatomy), and that the image score orders images by how atypical they
are. What it does not mean: it is not the probability that the segmentation is wrong, nor that the image
is out of distribution; a degree of 0.99 is expected for 1 % of in-distribution images. Past the
validation maximum it is an extrapolation of the fitted tail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["DegreeCalibrator"]

_TYPE = "pot_genpareto"
_VERSION = 1


class DegreeCalibrator:
    """Fit on validation image scores, then :meth:`transform` any image score to its OOD degree.

    Args:
        tail_fraction: the share of the validation scores above the threshold ``u`` whose exceedances
            fit the tail (0.2: the top fifth).
        min_samples: fewest validation scores to fit on.

    Example:
        >>> degree = DegreeCalibrator().fit(validation_scores)
        >>> degree.transform([0.1, 2.5, 40.0])   # typical, atypical, far beyond validation
    """

    def __init__(self, tail_fraction: float = 0.2, min_samples: int = 10) -> None:
        if not 0.0 < float(tail_fraction) < 1.0:
            raise ValueError(f"tail_fraction must lie in (0, 1), got {tail_fraction!r}")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 3:
            raise ValueError(f"min_samples must be an int >= 3, got {min_samples!r}")
        self.tail_fraction = float(tail_fraction)
        self.min_samples = min_samples
        self.scores_: np.ndarray | None = None
        self.threshold_: float | None = None
        self.threshold_level_: float | None = None
        self.shape_: float | None = None
        self.scale_: float | None = None

    @property
    def is_fitted(self) -> bool:
        return self.scores_ is not None

    def fit(self, scores: Any) -> DegreeCalibrator:
        """Fit on the validation images' scores (a 1D array-like of finite numbers).

        Raises:
            ValueError: fewer than ``min_samples`` scores, a non-finite score, or all scores equal.
        """
        from scipy import stats

        values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
        if values.size < self.min_samples:
            raise ValueError(
                f"the OOD degree needs at least {self.min_samples} validation image scores, got {values.size}"
            )
        if not np.isfinite(values).all():
            raise ValueError("validation image scores must be finite")
        if values[-1] == values[0]:
            raise ValueError("all validation image scores are equal: the degree cannot be fitted")
        n = values.size
        level = 1.0 - self.tail_fraction
        threshold = float(np.quantile(values, level))
        excess = values[values > threshold] - threshold
        shape, scale = 0.0, float(excess.mean()) if excess.size else float(np.std(values))
        if excess.size >= 5:
            try:
                shape, _, scale = stats.genpareto.fit(excess, floc=0.0)
            except (ValueError, RuntimeError, FloatingPointError):  # a degenerate fit: an exponential tail
                shape, scale = 0.0, float(excess.mean())
        # a bounded tail (shape < 0) would reach 1 at a finite score: keep it unbounded (exponential)
        if not (math.isfinite(shape) and math.isfinite(scale)) or shape < 0.0 or scale <= 0.0:
            shape, scale = 0.0, max(float(excess.mean()) if excess.size else 0.0, 1e-12)
        self.scores_ = values
        self.threshold_ = threshold
        self.threshold_level_ = float(np.interp(threshold, values, (np.arange(n) + 0.5) / n))
        self.shape_, self.scale_ = float(shape), float(scale)
        return self

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise ValueError("the DegreeCalibrator is not fitted: call fit(validation_scores) first")

    def transform(self, scores: Any) -> np.ndarray:
        """The OOD degree of each score, in [0, 1) (float64, the input's shape)."""
        from scipy import stats

        self._check_fitted()
        s = np.asarray(scores, dtype=np.float64)
        n = self.scores_.size
        body = np.interp(s, self.scores_, (np.arange(n) + 0.5) / n, left=0.0)
        tail = self.threshold_level_ + (1.0 - self.threshold_level_) * stats.genpareto.cdf(
            s - self.threshold_, self.shape_, loc=0.0, scale=self.scale_
        )
        return np.where(s > self.threshold_, tail, body)

    def __call__(self, scores: Any) -> np.ndarray:
        return self.transform(scores)

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "type": _TYPE,
            "version": _VERSION,
            "tail_fraction": self.tail_fraction,
            "min_samples": self.min_samples,
            "scores": [float(v) for v in self.scores_],
            "threshold": self.threshold_,
            "threshold_level": self.threshold_level_,
            "shape": self.shape_,
            "scale": self.scale_,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DegreeCalibrator:
        if not isinstance(d, Mapping) or d.get("type") != _TYPE or d.get("version") != _VERSION:
            raise ValueError(f"not an OOD degree calibration of version {_VERSION}")
        obj = cls(tail_fraction=d["tail_fraction"], min_samples=d["min_samples"])
        scores = np.asarray(d["scores"], dtype=np.float64)
        if (
            scores.ndim != 1
            or scores.size < 2
            or not np.isfinite(scores).all()
            or (np.diff(scores) < 0).any()
        ):
            raise ValueError("the OOD degree calibration's validation scores must be sorted finite numbers")
        values = [float(d[k]) for k in ("threshold", "threshold_level", "shape", "scale")]
        if not all(math.isfinite(v) for v in values) or values[3] <= 0 or not 0 <= values[1] <= 1:
            raise ValueError("the OOD degree calibration has invalid tail parameters")
        obj.scores_ = scores
        obj.threshold_, obj.threshold_level_, obj.shape_, obj.scale_ = values
        return obj

    def __repr__(self) -> str:
        if not self.is_fitted:
            return f"{type(self).__name__}(not fitted)"
        return (
            f"{type(self).__name__}(n={self.scores_.size}, threshold={self.threshold_:.4g}, "
            f"tail shape={self.shape_:.3g}, scale={self.scale_:.3g})"
        )
