"""Model checkpoints (``model.pt``) and resumable training states (``last.pt``).

Both files are dicts of plain Python types and tensors only, so they load with
``torch.load(path, weights_only=True)``: no pickled classes, nothing executed on load. Everything that
is not a tensor or a plain type is converted on the way in (numpy RNG states become int64 tensors) and
rebuilt on the way out.

``model.pt``, read by ``monai-ood score`` (format ``"monai-ood-model"``, version 1)::

    {
        "format": "monai-ood-model", "version": 1,
        "state_dict": net.state_dict(),              # on the CPU
        "model_config": {"preset", "spatial_dims", "in_channels", "out_channels", "head_channels",
                         "network_kwargs", "wrapper_kwargs"},
        "preprocessing": SlicePreprocessing/VolumePreprocessing.to_dict(),
        "calibration": WeibullCalibrator.to_dict() or None,
        "class_names": list[str] or None,
        "detector": FusedDetector.to_state() or None, # the fitted default detector (absent: the head scores)
        "metrics": dict,                              # e.g. the validation Dice the model was selected by
        "monai_ood_version": str,
    }

``model_config`` keeps sequences as lists (the same dict can be written as JSON); :func:`build_network`
turns lists back into tuples, the form MONAI's layer specs such as ``norm=("instance", {...})`` expect.

``last.pt`` (format ``"monai-ood-training-state"``) holds whatever :mod:`monai_ood.engines.training`
needs to continue a run, including the RNG states from :func:`capture_rng_state`.

Every write goes to a temporary file in the destination folder and is moved into place with
:func:`os.replace`, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform
from torch import nn

from .. import __version__
from ..calibration import Calibration, WeibullCalibrator, fingerprint
from ..files import atomic_write
from ..networks.presets import create_prototype_network
from ..preprocessing import SlicePreprocessing, VolumePreprocessing, preprocessing_from_dict

__all__ = [
    "MODEL_FORMAT",
    "TRAINING_STATE_FORMAT",
    "FORMAT_VERSION",
    "LoadedModel",
    "build_network",
    "capture_rng_state",
    "cpu_state_dict",
    "load_model",
    "model_map",
    "load_training_state",
    "make_model_config",
    "resolve_device",
    "restore_rng_state",
    "save_model",
    "save_training_state",
    "detector_from_state",
    "load_detector",
    "save_detector",
    "set_calibration",
    "set_detector",
    "set_weights",
]

MODEL_FORMAT = "monai-ood-model"
TRAINING_STATE_FORMAT = "monai-ood-training-state"
FORMAT_VERSION = 1

_MODEL_CONFIG_KEYS = (
    "preset",
    "spatial_dims",
    "in_channels",
    "out_channels",
    "head_channels",
    "network_kwargs",
    "wrapper_kwargs",
)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``cuda`` when available and ``device`` is ``None`` or ``"auto"``, else ``cpu``.

    Raises:
        ValueError: for a CUDA device on a machine without CUDA, or an unknown device string.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:<index>' or None, got {device!r}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine")
    return resolved


# ---------------------------------------------------------------- model configuration


def _lists(value: Any) -> Any:
    """Tuples to lists, recursively: the JSON-compatible form stored in ``model_config``."""
    if isinstance(value, Mapping):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _tuples(value: Any) -> Any:
    """Lists back to tuples, recursively, for the network constructors (MONAI's specs are tuples)."""
    if isinstance(value, Mapping):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def make_model_config(
    preset: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    head_channels: int,
    network_kwargs: Mapping[str, Any] | None = None,
    wrapper_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``model_config`` dict stored in checkpoints: the arguments of :func:`create_prototype_network`.

    Sequences are stored as lists (JSON-compatible); :func:`build_network` rebuilds tuples.
    """
    return {
        "preset": str(preset),
        "spatial_dims": int(spatial_dims),
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "head_channels": int(head_channels),
        "network_kwargs": _lists(dict(network_kwargs or {})),
        "wrapper_kwargs": _lists(dict(wrapper_kwargs or {})),
    }


def _check_model_config(config: Any, source: str) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: model_config must be a dict, got {type(config).__name__}")
    missing = [k for k in _MODEL_CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"{source}: model_config is missing {missing}; it has {sorted(config)}")
    for key in ("spatial_dims", "in_channels", "out_channels", "head_channels"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{source}: model_config[{key!r}] must be a positive int, got {value!r}")
    for key in ("network_kwargs", "wrapper_kwargs"):
        if not isinstance(config[key], Mapping):
            raise ValueError(f"{source}: model_config[{key!r}] must be a dict, got {config[key]!r}")
    return dict(config)


def build_network(model_config: Mapping[str, Any]) -> nn.Module:
    """Build the (untrained) :class:`~monai_ood.networks.PrototypeOODNet` described by ``model_config``."""
    config = _check_model_config(model_config, "build_network")
    return create_prototype_network(
        config["preset"],
        spatial_dims=config["spatial_dims"],
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        head_channels=config["head_channels"],
        network_kwargs=_tuples(config["network_kwargs"]),
        **_tuples(config["wrapper_kwargs"]),
    )


# ---------------------------------------------------------------- atomic files


def _atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda temporary: torch.save(obj, temporary), overwrite=True)


def _load_dict(path: str | os.PathLike, expected_format: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True`` and check its format and version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    # A damaged or foreign file fails in many ways (UnpicklingError, KeyError, EOFError, RuntimeError...).
    except Exception as err:
        raise ValueError(
            f"{str(path)!r} is not a monai-ood checkpoint (torch.load with weights_only=True failed: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from err
    found = data.get("format") if isinstance(data, dict) else None
    if found != expected_format:
        hint = ""
        if found == TRAINING_STATE_FORMAT:
            hint = " (this is a resumable training state, last.pt: pass the run's model.pt instead)"
        elif found == MODEL_FORMAT:
            hint = " (this is a model checkpoint, model.pt, not a training state)"
        elif found is None:
            hint = " (e.g. a plain state dict or another program's checkpoint)"
        raise ValueError(f"{str(path)!r} is not a {expected_format!r} checkpoint: format is {found!r}{hint}")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has {expected_format} version {version!r}; this monai-ood ({__version__}) "
            f"reads versions 1..{FORMAT_VERSION}"
        )
    return data


# ---------------------------------------------------------------- model.pt


@dataclass
class LoadedModel:
    """A model read by :func:`load_model`.

    Attributes:
        net: the :class:`~monai_ood.networks.PrototypeOODNet`, in eval mode, on the requested device.
        model_config: the arguments it was built from (see :func:`make_model_config`).
        preprocessing: how its inputs are made (:class:`~monai_ood.preprocessing.SlicePreprocessing` or
            :class:`~monai_ood.preprocessing.VolumePreprocessing`).
        calibrator: the fitted :class:`~monai_ood.calibration.WeibullCalibrator` of the model's map, or
            ``None`` (none stored, or the stored one is stale: see ``calibration_error``).
        class_names: names of the output classes, or ``None``.
        metrics: what was recorded with the model (e.g. its validation Dice and epoch).
        path: the file it was read from.
        detector: the fitted :class:`~monai_ood.detectors.FusedDetector` on the network's backbone (the
            image score, map and segmentation of ``monai-ood score``), or ``None``: then the prototype
            head scores.
        calibration: the stored :class:`~monai_ood.calibration.Calibration` record (``calibrator`` is its
            Weibull) when it calibrates this model's map with these weights, else ``None``.
        calibration_error: why a stored calibration was not taken (another format version, another map,
            other weights), in one line that says to calibrate again; ``None`` otherwise.
    """

    net: nn.Module
    model_config: dict[str, Any]
    preprocessing: SlicePreprocessing | VolumePreprocessing
    calibrator: WeibullCalibrator | None
    class_names: list[str] | None
    metrics: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    detector: Any = None
    calibration: Calibration | None = None
    calibration_error: str | None = None

    @property
    def degree(self) -> Any:
        """The OOD degree of the image score (:class:`~monai_ood.calibration.DegreeCalibrator`), or ``None``."""
        return None if self.calibration is None else self.calibration.degree


def model_map(detector: Any) -> str:
    """The name of the map a model scores with: ``"fused"`` (its detector's) or ``"head"`` (the paper's)."""
    return "head" if detector is None else "fused"


def _calibration_record(
    calibration: Calibration | WeibullCalibrator | None,
    state_dict: Any,
    detector_state: Any,
    degree: Any = None,
) -> dict[str, Any] | None:
    """The record stored under ``calibration``: a bare Weibull fit (and its image-score ``degree``) is
    bound to these weights and detector."""
    if calibration is None:
        return None
    if isinstance(calibration, WeibullCalibrator):
        calibration = Calibration(
            calibration,
            model_map(detector_state),
            fingerprint(state_dict, detector_state),
            "cli",
            degree=degree,
        )
    return calibration.to_dict()


def cpu_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """``net.state_dict()`` on the CPU, so a saved file does not depend on the device it was trained on."""
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def save_model(
    path: str | os.PathLike,
    net: nn.Module,
    model_config: Mapping[str, Any],
    preprocessing: SlicePreprocessing | VolumePreprocessing | Mapping[str, Any],
    calibration: WeibullCalibrator | None = None,
    class_names: list[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    detector: Any = None,
) -> Path:
    """Write a model checkpoint (``model.pt``) atomically.

    Args:
        path: destination file; its folder is created if needed.
        net: the trained network (its ``state_dict`` is stored on the CPU).
        model_config: from :func:`make_model_config`.
        preprocessing: the preprocessing object (or its ``to_dict()``).
        calibration: a :class:`~monai_ood.calibration.Calibration` of this model's map, or a fitted Weibull
            calibrator (recorded as calibrating the map of ``net`` with ``detector``), or ``None``.
        class_names: one name per output class, or ``None``.
        metrics: plain values to record (numbers, strings, lists, dicts).
        detector: a fitted :class:`~monai_ood.detectors.FusedDetector` on ``net``, or ``None``.

    Returns:
        ``path``.

    Raises:
        ValueError: on an invalid ``model_config`` or a ``class_names`` of the wrong length.
    """
    config = _check_model_config(_lists(dict(model_config)), f"save_model({str(path)!r})")
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        if len(class_names) != config["out_channels"]:
            raise ValueError(
                f"class_names must name all {config['out_channels']} output classes, got {class_names!r}"
            )
    checkpoint = {
        "format": MODEL_FORMAT,
        "version": FORMAT_VERSION,
        "state_dict": cpu_state_dict(net),
        "model_config": config,
        "preprocessing": dict(preprocessing)
        if isinstance(preprocessing, Mapping)
        else preprocessing.to_dict(),
        "calibration": None,
        "class_names": class_names,
        "metrics": dict(metrics or {}),
        "detector": None if detector is None else detector.to_state(),
        "monai_ood_version": __version__,
    }
    checkpoint["calibration"] = _calibration_record(
        calibration, checkpoint["state_dict"], checkpoint["detector"]
    )
    return _atomic_save(checkpoint, path)


def _state_dict_mismatch(net: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """A readable description of the differences between ``net``'s state dict and ``state_dict``."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs network {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    parts = []
    for title, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if keys:
            shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
            parts.append(f"{title}: {shown}")
    return "; ".join(parts) or None


def _non_finite_keys(value: Any, prefix: str) -> list[str]:
    """The keys (``a.b[0].c``) of the floating-point tensors and floats under ``value`` that hold NaN or Inf."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            return [] if bool(torch.isfinite(value).all()) else [prefix]
        return []
    if isinstance(value, float):
        return [] if np.isfinite(value) else [prefix]
    if isinstance(value, Mapping):
        return [
            k for key, item in value.items() for k in _non_finite_keys(item, f"{prefix}.{key}".lstrip("."))
        ]
    if isinstance(value, (list, tuple)):
        return [k for i, item in enumerate(value) for k in _non_finite_keys(item, f"{prefix}[{i}]")]
    return []


def _shown(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check_finite_checkpoint(data: Mapping[str, Any], source: str) -> None:
    """Refuse a model checkpoint whose weights or stored detector hold NaN or Inf values.

    Such a model scores every image NaN; it comes from a training run that diverged (or a damaged file).
    """
    bad = _non_finite_keys(dict(data["state_dict"]), "")
    if bad:
        raise ValueError(
            f"{source!r} is a damaged checkpoint: NaN or Inf values in {len(bad)} weight tensor(s) "
            f"({_shown(bad)}); the training that wrote it probably diverged (or the file was altered): "
            "retrain, e.g. with a lower learning rate, or use an earlier model.pt"
        )
    detector = data.get("detector")
    if isinstance(detector, Mapping):
        bad = _non_finite_keys(detector, "detector")  # every tensor and number it stores
        if bad:
            raise ValueError(
                f"{source!r} is a damaged checkpoint: its stored detector holds NaN or Inf values "
                f"({_shown(bad)}); the fit that wrote it went wrong (or the file was altered): fit the "
                "detector again (monai-ood fit --checkpoint ...)"
            )


def load_model(path: str | os.PathLike, device: str | torch.device | None = None) -> LoadedModel:
    """Read a model checkpoint written by :func:`save_model`.

    Args:
        path: the ``model.pt`` file.
        device: where to put the network; ``None`` picks ``cuda`` if available, else ``cpu``.

    Returns:
        A :class:`LoadedModel` whose ``net`` is in eval mode on ``device``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a monai-ood model checkpoint (names the file), its state dict
            does not fit the network its ``model_config`` describes (lists the keys), or its weights or
            stored detector hold NaN or Inf values (a diverged training run: names the first tensors).
    """
    device = resolve_device(device)
    data = _load_dict(path, MODEL_FORMAT, map_location=device)
    source = str(path)
    missing = [
        k
        for k in ("state_dict", "model_config", "preprocessing", "calibration", "class_names")
        if k not in data
    ]
    if missing:
        raise ValueError(f"{source!r} is a damaged monai-ood model checkpoint: missing {missing}")
    config = _check_model_config(data["model_config"], source)
    try:
        net = build_network(config)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{source!r}: cannot build the network of its model_config {config!r}: {err}"
        ) from err
    mismatch = _state_dict_mismatch(net, data["state_dict"])
    if mismatch:
        raise ValueError(
            f"{source!r}: the stored weights do not fit the {config['preset']!r} network: {mismatch}"
        )
    _check_finite_checkpoint(data, source)
    net.load_state_dict(data["state_dict"])
    net.to(device).eval()
    try:
        preprocessing = preprocessing_from_dict(data["preprocessing"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source!r}: invalid preprocessing entry: {err}") from err
    detector = None
    if data.get("detector") is not None:
        try:
            detector = detector_from_state(net, data["detector"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{source!r}: invalid detector entry: {err}") from err
    calibration, calibration_error = None, None
    if data["calibration"] is not None:
        try:
            calibration = Calibration.from_dict(data["calibration"], f"the calibration in {source!r}").check(
                model_map(detector),
                fingerprint(data["state_dict"], data.get("detector")),
                f"the calibration in {source!r}",
            )
        except ValueError as err:
            calibration_error = str(err)
    return LoadedModel(
        net=net,
        model_config=config,
        preprocessing=preprocessing,
        calibrator=None if calibration is None else calibration.weibull,
        class_names=None if data["class_names"] is None else list(data["class_names"]),
        metrics=dict(data.get("metrics") or {}),
        path=Path(path),
        detector=detector,
        calibration=calibration,
        calibration_error=calibration_error,
    )


def set_weights(path: str | os.PathLike, net: nn.Module, metrics: Mapping[str, Any] | None = None) -> Path:
    """Replace the weights (state dict) in the model checkpoint at ``path`` (rewritten atomically), e.g.
    after post-hoc fitting of the prototypes, and add ``metrics`` to its recorded ones; everything else
    in the file is kept.

    Raises:
        FileNotFoundError, ValueError: if ``path`` is missing or not a monai-ood model checkpoint, or if
            ``net``'s state dict does not match the stored one's keys and shapes.
    """
    data = _load_dict(path, MODEL_FORMAT)
    state = cpu_state_dict(net)
    stored = data["state_dict"]
    if set(state) != set(stored) or any(state[k].shape != stored[k].shape for k in state):
        raise ValueError(f"set_weights: the network does not match the one stored in {str(path)!r}")
    data["state_dict"] = state
    if metrics:
        data["metrics"] = {**dict(data.get("metrics") or {}), **dict(metrics)}
    return _atomic_save(data, path)


def set_detector(path: str | os.PathLike, detector: Any) -> Path:
    """Store a fitted :class:`~monai_ood.detectors.FusedDetector` in the model checkpoint at ``path``
    (rewritten atomically; ``None`` removes it, and the prototype head scores again). A stored
    calibration is dropped with a new detector (it calibrated the previous map): calibrate again.

    Raises:
        FileNotFoundError, ValueError: if ``path`` is missing or not a monai-ood model checkpoint.
    """
    data = _load_dict(path, MODEL_FORMAT)
    data["detector"] = None if detector is None else detector.to_state()
    data["calibration"] = None
    return _atomic_save(data, path)


def detector_from_state(network: nn.Module, state: Mapping[str, Any]) -> Any:
    """Rebuild a stored detector on ``network``: its class is looked up by the stored ``name`` in the
    detector registry (:data:`monai_ood.detectors.DETECTORS`), so a new storable detector needs only its
    registry entry and ``to_state`` / ``from_state``."""
    from ..detectors import DETECTORS  # deferred: the detectors import the engines' neighbours

    name = state.get("name") if isinstance(state, Mapping) else None
    cls = DETECTORS.get(name)
    if cls is None or not hasattr(cls, "from_state"):
        storable = sorted(key for key, value in DETECTORS.items() if hasattr(value, "from_state"))
        raise ValueError(
            f"the stored detector {name!r} is not one monai-ood can rebuild (storable: {storable})"
        )
    return cls.from_state(network, state)


def save_detector(path: str | os.PathLike, detector: Any) -> Path:
    """Write a fitted :class:`~monai_ood.detectors.FusedDetector` as its own file (atomically), for the
    front-ends whose weights live elsewhere: the bundles (``models/detector.pt``) and nnU-Net
    (``fold_<f>/ood_detector.pt``). ``monai-ood`` models keep it inside ``model.pt`` (:func:`set_detector`).
    """
    state = detector.to_state()
    bad = _non_finite_keys(state, "detector")
    if bad:
        raise ValueError(f"the detector holds NaN or Inf values ({_shown(bad)}): its fit went wrong")
    return _atomic_save(state, path)


def load_detector(path: str | os.PathLike, network: nn.Module) -> Any:
    """The detector written by :func:`save_detector`, rebuilt on ``network`` (read with ``weights_only``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an unreadable or foreign file, NaN or Inf values, or a detector whose layers
            ``network`` does not have.
    """
    from ..detectors.fused import DETECTOR_FORMAT

    state = _load_dict(path, DETECTOR_FORMAT)
    bad = _non_finite_keys(state, "detector")
    if bad:
        raise ValueError(
            f"{str(path)!r} holds NaN or Inf values ({_shown(bad)}): its fit went wrong; fit the detector again"
        )
    try:
        return detector_from_state(network, state)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{str(path)!r} does not fit this network: {err}") from err


def set_calibration(
    path: str | os.PathLike, calibrator: Calibration | WeibullCalibrator | None, degree: Any = None
) -> Path:
    """Store ``calibrator`` in the model checkpoint at ``path`` (rewritten atomically; ``None`` removes it):
    a :class:`~monai_ood.calibration.Calibration`, or a Weibull fit of the stored model's map (recorded
    with the stored weights' and detector's fingerprint).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it is not a monai-ood model checkpoint.
        NotFittedError: if ``calibrator`` is not fitted.
    """
    data = _load_dict(path, MODEL_FORMAT)
    data["calibration"] = _calibration_record(calibrator, data["state_dict"], data.get("detector"), degree)
    return _atomic_save(data, path)


# ---------------------------------------------------------------- RNG states


def _random_states(root: Any) -> list[np.random.RandomState]:
    """The ``R`` generators of every randomizable transform under ``root``, in a fixed order.

    Walks ``Compose.transforms`` and the attributes of every MONAI transform (e.g. ``RandAffined`` ->
    ``RandAffine`` -> ``RandAffineGrid``, ``OutlierSynthesisd`` -> ``OutlierSynthesis``), sorted by
    attribute name; generators shared by several transforms are listed once. Two identically built
    pipelines give the same order, which is what restoring relies on.
    """
    states: list[np.random.RandomState] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
            return
        if not isinstance(obj, (Transform, Randomizable)) or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable) and id(obj.R) not in seen:
            seen.add(id(obj.R))
            states.append(obj.R)
        for key in sorted(vars(obj)):
            visit(vars(obj)[key])

    visit(root)
    return states


def _numpy_state_to_dict(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached_gaussian = state
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_dict(d: Mapping[str, Any]) -> tuple:
    keys = np.asarray(d["keys"].cpu().numpy(), dtype=np.uint32)
    return (d["name"], keys, int(d["pos"]), int(d["has_gauss"]), float(d["cached_gaussian"]))


def capture_rng_state(transforms: Any = None) -> dict[str, Any]:
    """Every RNG state a training run draws from, as plain types and tensors (``weights_only``-safe).

    Args:
        transforms: a transform (e.g. the training ``Compose``) whose randomizable parts' ``R`` states
            are saved too. With DataLoader workers these copies are not the ones in use (each worker's
            are re-seeded from the torch RNG at every epoch); saving them costs nothing.

    Returns:
        ``{"python", "numpy", "torch", "cuda", "transforms"}``.
    """
    return {
        "python": random.getstate(),
        "numpy": _numpy_state_to_dict(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "transforms": [_numpy_state_to_dict(r.get_state()) for r in _random_states(transforms)],
    }


def restore_rng_state(state: Mapping[str, Any], transforms: Any = None) -> None:
    """Restore what :func:`capture_rng_state` saved.

    Raises:
        ValueError: if ``transforms`` has a different number of random generators than were saved (the
            pipeline changed since the state was written).
    """
    generators = _random_states(transforms)
    saved = list(state.get("transforms", []))
    if len(saved) != len(generators):
        raise ValueError(
            f"the saved state has {len(saved)} transform random generator(s) but the pipeline has "
            f"{len(generators)}: the augmentation pipeline changed since the state was saved"
        )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np.random.set_state(_numpy_state_from_dict(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = list(state.get("cuda", []))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    elif cuda:
        warnings.warn(
            f"the saved state has CUDA RNG states of {len(cuda)} GPU(s) that this machine cannot take; "
            "continuing without them (the run stays valid but is not bit-identical)",
            stacklevel=2,
        )
    for generator, generator_state in zip(generators, saved, strict=True):
        generator.set_state(_numpy_state_from_dict(generator_state))


# ---------------------------------------------------------------- last.pt


def save_training_state(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write a resumable training state (``last.pt``) atomically.

    Args:
        path: destination file.
        state: plain types and tensors only (model/optimizer/scheduler state dicts, counters, the
            output of :func:`capture_rng_state`, ...); ``format`` and ``version`` are added.
    """
    return _atomic_save(
        {
            "format": TRAINING_STATE_FORMAT,
            "version": FORMAT_VERSION,
            "monai_ood_version": __version__,
            **state,
        },
        path,
    )


def load_training_state(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a training state written by :func:`save_training_state` (``weights_only=True``).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it is not a monai-ood training state.
    """
    return _load_dict(path, TRAINING_STATE_FORMAT, map_location=map_location)
