"""Weibull calibration of OoD score maps (Cho, Park, Choo 2023, Sec. 3.3, Eq. 9).

The auxiliary prototypical classifier produces a score map ``A(x)`` of distances between pixel
embeddings and their closest class anchors. Large distances dominate a direct visualisation, so
the paper fits a Weibull distribution to the ``A(x)[i, j]`` values of hold-out validation data and
uses its CDF as a scaled score map in ``[0, 1]``::

    A_xi(x)[i, j] = WeibullCDF(A(x)[i, j])        (Eq. 9)

:class:`WeibullCalibrator` fits a two-parameter Weibull (location fixed at 0, because distances are
non-negative) by maximum likelihood and applies its CDF to numpy arrays or torch tensors.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from scipy import optimize

from ..files import atomic_write_text

__all__ = ["NotFittedError", "WeibullCalibrator"]

_TYPE = "weibull_min"
_VERSION = 1
_BLOCK = 1 << 20  # values per subsampling block
_SEED_SALT = 0x5EED_CA1B  # see fit()


class NotFittedError(RuntimeError):
    """Raised when a :class:`WeibullCalibrator` is used before :meth:`WeibullCalibrator.fit`."""


def _to_numpy_chunk(chunk: Any, index: int) -> np.ndarray:
    """Convert one input chunk into a flat, real-valued numpy array (no copy when possible)."""
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.detach()
        if chunk.dtype in (torch.float16, torch.bfloat16):
            # numpy has no bfloat16; float32 holds both half formats exactly.
            chunk = chunk.float()
        arr = chunk.cpu().numpy()
    else:
        arr = np.asarray(chunk)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(
            f"fit() chunk {index} has unsupported dtype {arr.dtype}; expected real-valued scores."
        )
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    return arr.reshape(-1)


def _iter_chunks(values: Any) -> Iterable[Any]:
    """Yield the chunks of ``values``: a single array/tensor, or the items of an iterable of them."""
    if isinstance(values, (np.ndarray, torch.Tensor, np.generic, int, float)):
        yield values
        return
    if isinstance(values, (list, tuple)) and all(isinstance(v, (int, float, np.generic)) for v in values):
        # A flat list of numbers is one chunk, not len(values) one-element chunks.
        yield np.asarray(values)
        return
    if isinstance(values, (str, bytes, dict)):
        raise ValueError(
            f"fit() expects an array, a tensor or an iterable of them, got {type(values).__name__}."
        )
    try:
        iterator = iter(values)
    except TypeError:
        raise ValueError(
            f"fit() expects an array, a tensor or an iterable of them, got {type(values).__name__}."
        ) from None
    yield from iterator


def _solve_weibull_mle(x: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood shape and scale of a 2-parameter Weibull (loc = 0) for positive ``x``.

    The scale is profiled out (``scale**k = mean(x**k)``), leaving the shape equation
    ``g(k) = sum(x**k ln x) / sum(x**k) - 1/k - mean(ln x) = 0``. ``g`` is strictly increasing
    (``g'(k) = weighted Var(ln x) + 1/k**2 > 0``), so the root is unique. Newton's method
    (:func:`scipy.optimize.root_scalar`) converges in a few steps from the log-moment estimate;
    :func:`scipy.optimize.brentq` on an expanding bracket is the fallback.
    """
    y = np.log(x, dtype=np.float64)
    # Shift by max(log x) so that exp(k * y) <= 1: no overflow for any shape k.
    shift = float(y.max())
    y -= shift
    mean_y = float(y.mean())
    y_sq = y * y
    n = y.size
    w = np.empty_like(y)  # reused buffer: fresh 8-byte-per-value arrays per call cost page faults

    def moments(k: float) -> tuple[float, float, float]:
        np.multiply(y, k, out=w)
        np.exp(w, out=w)
        return float(w.sum()), float(np.dot(w, y)), float(np.dot(w, y_sq))

    def g(k: float) -> float:
        s0, s1, _ = moments(k)
        return s1 / s0 - 1.0 / k - mean_y

    def g_and_slope(k: float) -> tuple[float, float]:
        s0, s1, s2 = moments(k)
        m1 = s1 / s0
        return m1 - 1.0 / k - mean_y, (s2 / s0 - m1 * m1) + 1.0 / (k * k)

    # Log-moment start: Var(log x) = pi^2 / (6 k^2); usually within ~10% of the MLE.
    k0 = math.pi / (math.sqrt(6.0) * float(y.std()))
    shape = None
    with np.errstate(all="ignore"):
        try:
            res = optimize.root_scalar(
                g_and_slope, x0=k0, fprime=True, method="newton", xtol=1e-12, maxiter=50
            )
            if res.converged and math.isfinite(res.root) and res.root > 0 and abs(g(res.root)) < 1e-9:
                shape = float(res.root)
        except (ArithmeticError, ValueError, RuntimeError):
            shape = None
    if shape is None:
        lo, hi = k0 / 2.0, k0 * 2.0
        for _ in range(200):
            if g(lo) < 0.0:
                break
            lo /= 4.0
        for _ in range(200):
            if g(hi) > 0.0:
                break
            hi *= 4.0
        shape = float(optimize.brentq(g, lo, hi, xtol=1e-14, rtol=1e-12, maxiter=200))
    s0, _, _ = moments(shape)
    # scale = (mean(x**k))**(1/k), evaluated in log space around the shift.
    scale = math.exp(shift + math.log(s0 / n) / shape)
    return shape, scale


class WeibullCalibrator:
    """Maps OoD score-map values to ``[0, 1]`` with a fitted Weibull CDF (Cho et al. 2023, Eq. 9).

    A two-parameter Weibull distribution (location fixed at 0, since distances are ``>= 0``) is
    fitted by maximum likelihood to the score-map values ``A(x)[i, j]`` of hold-out validation
    data. :meth:`transform` then returns ``A_xi(x) = WeibullCDF(A(x))``, which changes quickly
    from 0 to 1 near the boundary between normal and anomalous regions.

    Zero values (a pixel embedding exactly on an anchor) are allowed but dropped from the
    likelihood, because the Weibull log-likelihood needs ``log(x)``; clamping them to a tiny
    positive value would instead add huge ``log`` terms that drag the shape estimate towards 0.
    They are counted in :attr:`num_zeros`, and :meth:`transform` maps 0 to a CDF of 0 as expected.

    To keep memory bounded when streaming large validation sets, and the fit fast, at most
    ``max_samples`` positive values are kept: a uniform random subset chosen with a seeded
    generator. The subset only depends on the order of the values, not on how they are split
    into chunks, so fitting chunks gives exactly the same result as fitting their concatenation.

    Args:
        max_samples: Maximum number of positive values used in the maximum-likelihood fit; larger
            inputs are uniformly subsampled. ``None`` uses every value (memory grows with the
            input). With the default of 10**6 the relative standard error of the shape estimate
            from subsampling is about 0.1%.
        seed: Seed of the subsampling generator, so that repeated fits are reproducible.
        min_samples: Minimum number of positive values needed for a fit (at least 2).

    Attributes:
        shape: Weibull shape parameter ``k`` (``None`` before fitting).
        scale: Weibull scale parameter ``lambda`` (``None`` before fitting).
        num_samples: Number of input values seen by :meth:`fit`, zeros included.
        num_zeros: Number of exact zeros, excluded from the likelihood.
        num_fit_samples: Number of values actually used in the likelihood (after dropping zeros
            and subsampling).

    Example:
        >>> import numpy as np
        >>> from scipy import stats
        >>> val_scores = stats.weibull_min.rvs(2.0, scale=3.0, size=10_000, random_state=0)
        >>> calibrator = WeibullCalibrator().fit(val_scores)
        >>> round(calibrator.shape, 1), round(calibrator.scale, 1)
        (2.0, 3.0)
        >>> # A_xi = WeibullCDF(A), Eq. (9); the CDF at the scale is 1 - 1/e for any shape.
        >>> scaled = calibrator(np.array([0.0, calibrator.scale, 30.0]))
        >>> np.round(scaled, 2)
        array([0.  , 0.63, 1.  ])
    """

    def __init__(self, max_samples: int | None = 1_000_000, seed: int = 0, min_samples: int = 10) -> None:
        if max_samples is not None and (isinstance(max_samples, bool) or int(max_samples) < 2):
            raise ValueError(f"max_samples must be None or an integer >= 2, got {max_samples!r}.")
        if isinstance(min_samples, bool) or int(min_samples) < 2:
            raise ValueError(f"min_samples must be an integer >= 2, got {min_samples!r}.")
        if max_samples is not None and int(max_samples) < int(min_samples):
            raise ValueError(f"max_samples ({max_samples}) must be >= min_samples ({min_samples}).")
        self.max_samples = None if max_samples is None else int(max_samples)
        self.seed = int(seed)
        self.min_samples = int(min_samples)
        self.shape: float | None = None
        self.scale: float | None = None
        self.num_samples: int = 0
        self.num_zeros: int = 0
        self.num_fit_samples: int = 0

    # ------------------------------------------------------------------ fitting

    @property
    def is_fitted(self) -> bool:
        """Whether :attr:`shape` and :attr:`scale` are available."""
        return self.shape is not None and self.scale is not None

    def fit(self, values: Any) -> WeibullCalibrator:
        """Fits the Weibull distribution to validation score-map values by maximum likelihood.

        Args:
            values: A numpy array, a torch tensor (any device, any shape; values are flattened)
                or an iterable of such chunks, e.g. a generator over validation score maps, so
                that they never need to be concatenated in memory.

        Returns:
            ``self``, fitted.

        Raises:
            ValueError: If the input is empty, contains NaN/Inf or negative values, has fewer
                than ``min_samples`` positive values, or all positive values are equal.
        """
        # Seeded per call, so refitting the same data gives the same subset. The salt keeps the
        # key stream distinct from default_rng(seed): data simulated with that generator (e.g.
        # weibull_min.rvs(random_state=default_rng(0))) would otherwise get keys equal to the very
        # uniforms that produced it, and the smallest keys would pick the smallest values.
        rng = np.random.default_rng([self.seed, _SEED_SALT])
        cap = self.max_samples
        kept_values: list[np.ndarray] = []
        kept_keys: list[np.ndarray] = []
        num_kept = 0
        threshold = math.inf  # keys >= threshold can never enter the subset once it is full
        num_total = num_zeros = num_positive = 0
        pos_min, pos_max = math.inf, -math.inf  # over all positive values, not just the subset

        for index, chunk in enumerate(_iter_chunks(values)):
            arr = _to_numpy_chunk(chunk, index)
            if arr.size == 0:
                continue
            num_total += arr.size
            finite = np.isfinite(arr)
            if not finite.all():
                num_nan = int(np.isnan(arr).sum())
                num_inf = int(arr.size - finite.sum()) - num_nan
                raise ValueError(
                    f"fit() input contains {num_nan} NaN and {num_inf} Inf value(s) in chunk {index}; "
                    "the Weibull fit needs finite scores."
                )
            chunk_min = arr.min()
            if chunk_min < 0:
                raise ValueError(
                    f"fit() input contains {int((arr < 0).sum())} negative value(s) in chunk {index} "
                    f"(min = {float(chunk_min)!r}); distances/scores must be >= 0."
                )
            positive = arr[arr > 0] if chunk_min == 0 else arr
            num_zeros += arr.size - positive.size
            num_positive += positive.size
            if positive.size == 0:
                continue
            pos_min = min(pos_min, float(positive.min()))
            pos_max = max(pos_max, float(positive.max()))
            if cap is None:
                kept_values.append(positive)
                continue
            # Bottom-k sampling: each value gets a uniform key from one seeded stream (consumed in
            # value order), and the cap smallest keys are kept. The kept set is independent of
            # how the input is chunked. Blocks bound the key memory and the argpartition size.
            for start in range(0, positive.size, _BLOCK):
                block = positive[start : start + _BLOCK]
                keys = rng.random(block.size)
                if threshold < math.inf:
                    mask = keys < threshold
                    keys, block = keys[mask], block[mask]
                kept_values.append(block)
                kept_keys.append(keys)
                num_kept += block.size
                if num_kept > 2 * cap:
                    kept_values, kept_keys = self._compact(kept_values, kept_keys, cap)
                    num_kept = cap
                    threshold = float(kept_keys[0].max())

        if num_total == 0:
            raise ValueError("fit() received empty input: no values to fit a Weibull distribution to.")
        if num_positive == 0:
            raise ValueError(
                f"fit() input is constant: all {num_total} value(s) are zero (no spread to fit a Weibull "
                "distribution to; zeros are excluded from the likelihood)."
            )
        if num_positive < self.min_samples:
            raise ValueError(
                f"fit() needs at least {self.min_samples} positive values, got {num_positive} "
                f"({num_total} value(s), {num_zeros} of them zero)."
            )
        if pos_min == pos_max:
            raise ValueError(
                f"fit() input is constant: all {num_positive} positive values equal {pos_min!r} "
                "(no spread to fit a Weibull distribution to)."
            )
        if cap is not None and num_positive > cap:
            kept_values, kept_keys = self._compact(kept_values, kept_keys, cap)
            # Sort the subset by key so its order (and thus the float sums) does not depend on
            # the compaction history, making chunked and concatenated fits bit-identical.
            order = np.argsort(kept_keys[0], kind="stable")
            data = kept_values[0][order]
        else:
            data = np.concatenate(kept_values) if len(kept_values) > 1 else kept_values[0]

        self.shape, self.scale = _solve_weibull_mle(data)
        self.num_samples = int(num_total)
        self.num_zeros = int(num_zeros)
        self.num_fit_samples = int(data.size)
        return self

    @staticmethod
    def _compact(
        values: list[np.ndarray], keys: list[np.ndarray], cap: int
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Keeps the ``cap`` values with the smallest keys."""
        all_keys = np.concatenate(keys)
        all_values = np.concatenate(values)
        idx = np.argpartition(all_keys, cap - 1)[:cap]
        return [all_values[idx]], [all_keys[idx]]

    # ------------------------------------------------------------------ applying

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError("WeibullCalibrator is not fitted yet; call fit() or load() first.")

    def transform(self, scores: Any) -> Any:
        """Scales scores to ``[0, 1]`` with the fitted Weibull CDF: ``A_xi = WeibullCDF(A)`` (Eq. 9).

        Computes ``1 - exp(-(x / scale) ** shape)`` as ``-expm1(-(x / scale) ** shape)``, which stays
        accurate for small scores. Negative scores map to 0 and ``+Inf`` maps to 1.

        Args:
            scores: Score map as a torch tensor (any device; computed with torch ops, so it is
                differentiable), a numpy array, or a Python/numpy scalar.

        Returns:
            The CDF values, with the type, shape, device and dtype of ``scores``. Integer inputs
            are promoted to ``torch.get_default_dtype()`` (torch) or float64 (numpy), and Python
            scalars give a Python float.

        Raises:
            NotFittedError: If the calibrator has not been fitted.
            ValueError: If ``scores`` contains NaN.
        """
        self._check_fitted()
        if isinstance(scores, torch.Tensor):
            return self._transform_torch(scores)
        arr = np.asarray(scores)
        if arr.dtype == np.bool_ or not (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        ):
            raise ValueError(f"transform() expects real-valued scores, got dtype {arr.dtype}.")
        if np.isnan(arr).any():
            raise ValueError(f"transform() input contains {int(np.isnan(arr).sum())} NaN value(s).")
        out_dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(np.float64)
        # float64 internally: exact enough for every output dtype, and numpy is not the hot path.
        x = np.maximum(arr.astype(np.float64, copy=False), 0.0)
        cdf = -np.expm1(-((x / self.scale) ** self.shape))
        if isinstance(scores, (int, float)):
            return float(cdf)
        if isinstance(scores, np.generic):
            return out_dtype.type(cdf)
        return cdf.astype(out_dtype, copy=False)

    def _transform_torch(self, scores: torch.Tensor) -> torch.Tensor:
        if scores.dtype == torch.bool or scores.is_complex():
            raise ValueError(f"transform() expects real-valued scores, got dtype {scores.dtype}.")
        if torch.isnan(scores).any():
            raise ValueError(f"transform() input contains {int(torch.isnan(scores).sum())} NaN value(s).")
        out_dtype = scores.dtype if scores.is_floating_point() else torch.get_default_dtype()
        # Half formats lose too much precision in pow/expm1; compute those in float32.
        compute_dtype = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
        x = scores.to(compute_dtype).clamp(min=0)
        cdf = -torch.expm1(-((x / self.scale) ** self.shape))
        return cdf.to(out_dtype)

    def __call__(self, scores: Any) -> Any:
        """Alias of :meth:`transform`."""
        return self.transform(scores)

    def cdf_threshold(self, probability: float) -> float:
        """Returns the score at which the fitted CDF equals ``probability`` (the Weibull quantile).

        Useful for triage: e.g. ``cdf_threshold(0.99)`` is the score exceeded by only 1% of the
        validation values, under the fitted model.

        Args:
            probability: Target CDF value in ``[0, 1]``.

        Returns:
            ``scale * (-log(1 - probability)) ** (1 / shape)``; 0 for probability 0 and ``inf``
            for probability 1.

        Raises:
            NotFittedError: If the calibrator has not been fitted.
            ValueError: If ``probability`` is not a number in ``[0, 1]``.
        """
        self._check_fitted()
        try:
            p = float(probability)
        except (TypeError, ValueError):
            raise ValueError(f"probability must be a number in [0, 1], got {probability!r}.") from None
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            raise ValueError(f"probability must be in [0, 1], got {probability!r}.")
        if p == 1.0:
            return math.inf
        return float(self.scale * (-math.log1p(-p)) ** (1.0 / self.shape))

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Returns the fitted parameters as a JSON-serialisable dict.

        Returns:
            Dict with ``type`` (``"weibull_min"``), ``version``, ``shape``, ``scale``, ``loc`` (0.0),
            ``num_samples``, ``num_zeros``, ``num_fit_samples``, ``max_samples``, ``seed`` and
            ``min_samples``.

        Raises:
            NotFittedError: If the calibrator has not been fitted.
        """
        self._check_fitted()
        return {
            "type": _TYPE,
            "version": _VERSION,
            "shape": float(self.shape),
            "scale": float(self.scale),
            "loc": 0.0,
            "num_samples": int(self.num_samples),
            "num_zeros": int(self.num_zeros),
            "num_fit_samples": int(self.num_fit_samples),
            "max_samples": self.max_samples,
            "seed": self.seed,
            "min_samples": self.min_samples,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeibullCalibrator:
        """Builds a fitted calibrator from a dict produced by :meth:`to_dict`.

        Args:
            d: Parameter dict. ``type``, ``version``, ``shape``, ``scale``, ``loc`` and
                ``num_samples`` are required; the other keys are optional.

        Returns:
            A fitted :class:`WeibullCalibrator`.

        Raises:
            ValueError: If a key is missing or has an invalid value (e.g. non-positive shape or
                scale, a ``loc`` other than 0, an unknown type or a newer version).
        """
        if not isinstance(d, dict):
            raise ValueError(f"Weibull calibration must be a JSON object/dict, got {type(d).__name__}.")
        missing = [k for k in ("type", "version", "shape", "scale", "loc", "num_samples") if k not in d]
        if missing:
            raise ValueError(f"Weibull calibration is missing key(s) {missing}; got keys {sorted(d)}.")
        if d["type"] != _TYPE:
            raise ValueError(f"Weibull calibration has type {d['type']!r}, expected {_TYPE!r}.")
        version = d["version"]
        if not _is_int(version) or not 1 <= version <= _VERSION:
            raise ValueError(
                f"Unsupported Weibull calibration version {version!r} (supported: 1..{_VERSION})."
            )
        for key in ("shape", "scale"):
            value = d[key]
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Weibull calibration {key!r} must be a finite number > 0, got {value!r}.")
        if not _is_number(d["loc"]) or d["loc"] != 0:
            raise ValueError(
                f"Weibull calibration 'loc' must be 0.0 (2-parameter Weibull), got {d['loc']!r}."
            )
        counts = {}
        for key in ("num_samples", "num_zeros", "num_fit_samples"):
            value = d.get(key, 0)
            if not _is_int(value) or value < 0:
                raise ValueError(f"Weibull calibration {key!r} must be an integer >= 0, got {value!r}.")
            counts[key] = int(value)
        try:
            obj = cls(
                max_samples=d.get("max_samples", 1_000_000),
                seed=d.get("seed", 0),
                min_samples=d.get("min_samples", 10),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"Weibull calibration has invalid fit settings: {err}") from err
        obj.shape = float(d["shape"])
        obj.scale = float(d["scale"])
        obj.num_samples = counts["num_samples"]
        obj.num_zeros = counts["num_zeros"]
        obj.num_fit_samples = counts["num_fit_samples"]
        return obj

    def save(self, path: str | os.PathLike) -> None:
        """Writes the parameters to ``path`` as JSON, atomically.

        The JSON is written to a temporary file in the same directory and moved into place with
        :func:`os.replace`, so readers never see a half-written file.

        Args:
            path: Destination file; its directory must exist.

        Raises:
            NotFittedError: If the calibrator has not been fitted.
        """
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        atomic_write_text(path, text, overwrite=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WeibullCalibrator:
        """Reads a calibrator written by :meth:`save`.

        Args:
            path: JSON file.

        Returns:
            A fitted :class:`WeibullCalibrator`.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If the file is not valid JSON or has missing/invalid keys.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Weibull calibration file not found: {path!r}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"Weibull calibration file {path!r} is not valid JSON: {err}") from err
        try:
            return cls.from_dict(d)
        except ValueError as err:
            raise ValueError(f"Invalid Weibull calibration file {path!r}: {err}") from err

    def __repr__(self) -> str:
        if not self.is_fitted:
            return f"{type(self).__name__}(not fitted, max_samples={self.max_samples}, seed={self.seed})"
        return (
            f"{type(self).__name__}(shape={self.shape:.6g}, scale={self.scale:.6g}, "
            f"num_samples={self.num_samples}, num_fit_samples={self.num_fit_samples})"
        )


def _is_number(value: Any) -> bool:
    # JSON true/false parse as bool, a subclass of int: not a valid parameter.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
