"""The one calibration artifact of every front-end: a versioned record of the Weibull fit and of what it
calibrates.

``monai-ood calibrate`` stores it in ``model.pt`` (key ``calibration``), the bundles write it as
``models/calibration.json`` and nnU-Net as ``fold_<f>/ood_calibration.json``; all three are
:meth:`Calibration.to_dict` and are read by :meth:`Calibration.from_dict` / :meth:`Calibration.load`.

A Weibull fit is only meaningful for the map it was fitted on: the map of one detector (``map``, e.g.
``"fused"`` for the default detector, ``"head"`` for the paper's ``A(x)``) computed by one set of
weights (``fingerprint``, :func:`fingerprint` of the network and the detector). :meth:`Calibration.check`
refuses, in one line, a record of another format version, another map or other weights, so a stale
calibration is never applied silently after a re-training or a refit.

Format (JSON object)::

    {"format": "monai-ood-calibration", "version": 1,
     "map": "fused", "fingerprint": "<sha256 hex, 16 chars>", "front_end": "cli" | "bundle" | "nnunet",
     "weibull": {<WeibullCalibrator.to_dict()>}, "metadata": {...},
     "degree": {<DegreeCalibrator.to_dict()>} or null}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..files import atomic_write_text
from .degree import DegreeCalibrator
from .weibull import WeibullCalibrator

__all__ = ["CALIBRATION_FORMAT", "CALIBRATION_VERSION", "Calibration", "fingerprint"]

CALIBRATION_FORMAT = "monai-ood-calibration"
CALIBRATION_VERSION = 1
FRONT_ENDS = ("cli", "bundle", "nnunet")


def _feed(digest: Any, obj: Any) -> None:
    """Update ``digest`` with a canonical serialisation of ``obj`` (tensors by dtype, shape and bytes)."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().to("cpu").contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(obj, np.ndarray):
        _feed(digest, torch.from_numpy(np.ascontiguousarray(obj)))
    elif isinstance(obj, Mapping):
        digest.update(b"{")
        for key in sorted(obj, key=str):
            digest.update(repr(str(key)).encode())
            _feed(digest, obj[key])
        digest.update(b"}")
    elif isinstance(obj, (list, tuple)):
        digest.update(b"[")
        for item in obj:
            _feed(digest, item)
        digest.update(b"]")
    elif obj is None or isinstance(obj, (bool, int, float, str, np.generic)):
        digest.update(repr(obj.item() if isinstance(obj, np.generic) else obj).encode())
    elif hasattr(obj, "to_state"):
        _feed(digest, obj.to_state())
    else:
        raise TypeError(f"cannot fingerprint a {type(obj).__name__}")


def fingerprint(*parts: Any) -> str:
    """A short SHA-256 (16 hex digits) of networks (their state dicts), detectors (their ``to_state()``),
    tensors, arrays and plain data, in order: equal exactly when every weight and setting is equal.

    Example:
        >>> fingerprint(network, detector)  # what a calibration of the detector's map is bound to
        '3f9c...'
    """
    digest = hashlib.sha256()
    for part in parts:
        _feed(digest, part)
    return digest.hexdigest()[:16]


@dataclass
class Calibration:
    """A Weibull calibration of one map of one model (see the module docstring).

    Args:
        weibull: the fitted :class:`~monai_ood.calibration.WeibullCalibrator` (``A_xi = weibull.cdf(A)``).
        map: which map it calibrates: ``"fused"`` (the default detector's) or ``"head"`` (the paper's
            ``A(x) = min_k D_M`` at the feature grid).
        fingerprint: :func:`fingerprint` of what computes the map (network, detector).
        front_end: who wrote it: ``"cli"``, ``"bundle"`` or ``"nnunet"``.
        metadata: free JSON-serialisable details (cases, fold, checkpoint name, number of values).
        degree: the OOD degree of the image score (:class:`~monai_ood.calibration.DegreeCalibrator`,
            fitted on the validation images' scores), or ``None``.
    """

    weibull: WeibullCalibrator
    map: str
    fingerprint: str
    front_end: str = "cli"
    metadata: dict[str, Any] = field(default_factory=dict)
    degree: DegreeCalibrator | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weibull, WeibullCalibrator) or not self.weibull.is_fitted:
            raise ValueError("weibull must be a fitted WeibullCalibrator")
        for name in ("map", "fingerprint"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.front_end not in FRONT_ENDS:
            raise ValueError(f"front_end must be one of {FRONT_ENDS}, got {self.front_end!r}")

    @classmethod
    def fit(
        cls,
        values: Iterable[Any],
        map: str,
        fingerprint: str,
        front_end: str = "cli",
        metadata: Mapping[str, Any] | None = None,
        **weibull_kwargs: Any,
    ) -> Calibration:
        """Fit the Weibull on ``values`` (maps: tensors or arrays, or an iterable of them) and record it."""
        weibull = WeibullCalibrator(**weibull_kwargs).fit(values)
        return cls(weibull, map, fingerprint, front_end, dict(metadata or {}))

    def transform(self, values: Any) -> Any:
        """``A_xi = WeibullCDF(values)`` (see :meth:`WeibullCalibrator.transform`)."""
        return self.weibull.transform(values)

    # ------------------------------------------------------------------ checks

    def check(self, map: str, fingerprint: str, source: str = "the calibration") -> Calibration:
        """``self`` if it calibrates ``map`` of the model with ``fingerprint``; else one-line ValueError."""
        if self.map != map:
            raise ValueError(
                f"{source} calibrates the {self.map!r} map, this model scores with the {map!r} map: "
                "calibrate again on the validation data"
            )
        if self.fingerprint != fingerprint:
            raise ValueError(
                f"{source} was fitted for other weights or another detector (fingerprint {self.fingerprint}, "
                f"this model {fingerprint}): the model was retrained or refitted since; calibrate again"
            )
        return self

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT,
            "version": CALIBRATION_VERSION,
            "map": self.map,
            "fingerprint": self.fingerprint,
            "front_end": self.front_end,
            "weibull": self.weibull.to_dict(),
            "metadata": dict(self.metadata),
            "degree": None if self.degree is None else self.degree.to_dict(),
        }

    @classmethod
    def from_dict(cls, record: Any, source: str = "the calibration") -> Calibration:
        """Read a record of :meth:`to_dict`; a record of another format or version is a one-line ValueError."""
        if not isinstance(record, Mapping):
            raise ValueError(f"{source} is not a calibration record (a {type(record).__name__})")
        if record.get("format") != CALIBRATION_FORMAT:
            if record.get("type") == "weibull_min":
                raise ValueError(
                    f"{source} is a bare Weibull fit from before the calibration record (format version "
                    f"{CALIBRATION_VERSION}), which does not say which map and weights it calibrates: "
                    "calibrate again"
                )
            raise ValueError(f"{source} is not a monai-ood calibration (format {record.get('format')!r})")
        version = record.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version != CALIBRATION_VERSION:
            raise ValueError(
                f"{source} has calibration format version {version!r}; this monai-ood reads version "
                f"{CALIBRATION_VERSION}: calibrate again with this version (or use the monai-ood that wrote it)"
            )
        try:
            metadata = record.get("metadata") or {}
            if not isinstance(metadata, Mapping):
                raise ValueError("metadata must be an object")
            return cls(
                WeibullCalibrator.from_dict(dict(record["weibull"])),
                record["map"],
                record["fingerprint"],
                record.get("front_end", "cli"),
                dict(metadata),
                None if record.get("degree") is None else DegreeCalibrator.from_dict(record["degree"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source} is not a valid calibration record: {error}") from error

    def save(self, path: str | os.PathLike) -> Path:
        """Write the record as JSON, atomically (replacing an existing file)."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        return atomic_write_text(path, text, overwrite=True)

    @classmethod
    def load(
        cls, path: str | os.PathLike, map: str | None = None, fingerprint: str | None = None
    ) -> Calibration:
        """Read a record written by :meth:`save`; with ``map`` / ``fingerprint``, also :meth:`check` it.

        Raises:
            FileNotFoundError: if there is no file.
            ValueError: an unreadable file, another format or version, another map or other weights.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no calibration at {str(path)!r}")
        source = repr(str(path))
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{source} is not valid JSON ({error}): calibrate again") from error
        calibration = cls.from_dict(record, source)
        if map is not None or fingerprint is not None:
            calibration.check(
                calibration.map if map is None else map,
                calibration.fingerprint if fingerprint is None else fingerprint,
                source,
            )
        return calibration

    def __repr__(self) -> str:
        return (
            f"Calibration(map={self.map!r}, fingerprint={self.fingerprint!r}, front_end={self.front_end!r}, "
            f"{self.weibull!r})"
        )
