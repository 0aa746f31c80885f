"""Data of the 2D bundles: training/validation slices in memory, and the volumes inference scores.

Training items are made exactly as for ``monai-ood train``: the embedded brain data
(:func:`monai_ood.data.load_brain_dataset`) by default, or the volumes of a MONAI datalist cut into
slices by :func:`monai_ood.data.datalist_to_slices`, both with one
:class:`~monai_ood.preprocessing.SlicePreprocessing` (anatomical slicing axis, in-plane spacing, slice
size, per-slice intensity window). Inference slices every volume with the same
:class:`~monai_ood.preprocessing.SlicePreprocessing` (through :func:`monai_ood.inference.score_image`,
as ``monai-ood score`` does), so oblique or anisotropic volumes are resampled onto the same anatomical
grid in every step.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.utils import look_up_option

from ..preprocessing import SlicePreprocessing

__all__ = ["find_datalist", "inference_items", "load_slices"]

logger = logging.getLogger(__name__)

_BRAIN_SPLITS = {"training": "train", "train": "train", "validation": "validation", "test": "test"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def find_datalist(dataset_dir: str | os.PathLike | None) -> str | None:
    """``dataset_dir/dataset.json`` (the Medical Segmentation Decathlon layout), or ``None`` for no folder.

    Raises:
        FileNotFoundError: if ``dataset_dir`` is given but holds no ``dataset.json``.
    """
    if dataset_dir is None or str(dataset_dir) == "":
        return None
    path = Path(dataset_dir).expanduser() / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset_dir {str(dataset_dir)!r} has no dataset.json (a MONAI/Decathlon datalist with "
            "'training' [and 'validation'] lists of image/label files); pass --datalist path/to/datalist.json"
        )
    return str(path)


def _datalist_keys(datalist: str | os.PathLike) -> list[str]:
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"datalist JSON not found: {str(path)!r}")
    content = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(content, Mapping):
        raise ValueError(f"datalist {str(path)!r} must be a JSON object with lists such as 'training'")
    return list(content)


def _datalist_volumes(datalist: str | os.PathLike, split: str, validation_fraction: float) -> list[dict]:
    """The volumes of one split; without a 'validation' list, the last volumes of 'training' are held out."""
    from ..data.datalist import load_datalist

    keys = _datalist_keys(datalist)
    if split in ("training", "validation") and "training" in keys and "validation" not in keys:
        training = load_datalist(datalist, "training")
        if len(training) < 2:
            raise ValueError(
                f"datalist {str(datalist)!r} has no 'validation' list and only {len(training)} training "
                "volume(s): add a 'validation' list, or at least 2 training volumes to hold one out"
            )
        held_out = min(len(training) - 1, max(1, round(len(training) * validation_fraction)))
        logger.info(
            "datalist %s has no 'validation' list: the last %d of %d training volumes validate",
            datalist,
            held_out,
            len(training),
        )
        return training[-held_out:] if split == "validation" else training[:-held_out]
    if split in keys:
        return load_datalist(datalist, split)
    raise ValueError(f"split {split!r} not found in datalist {str(datalist)!r}; it has {keys}")


def load_slices(
    split: str = "training",
    datalist: str | os.PathLike | None = None,
    preprocessing: SlicePreprocessing | None = None,
    num_classes: int | None = None,
    validation_fraction: float = 0.2,
    min_foreground_fraction: float = 0.0,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Labelled 2D slices of one split, in memory: ``[{"image": (1, H, W) float32, "label": (1, H, W) int64}]``.

    Args:
        split: ``"training"``, ``"validation"`` or ``"test"`` (the datalist keys).
        datalist: a MONAI datalist JSON of image/label volumes (paths relative to the JSON's folder);
            ``None`` = the embedded brain data (MNI152 axial slices, 4 tissue classes, 6:2:2 split).
            Without a ``"validation"`` list, the last ``validation_fraction`` of the training volumes
            validate (at least one).
        preprocessing: slicing axis, in-plane spacing, slice size, intensity window; default
            ``SlicePreprocessing()`` (axial, 2 mm, 112 x 96, percentiles (1, 99)).
        num_classes: label values must lie in ``[0, num_classes)`` (datalists only).
        validation_fraction: see ``datalist``.
        min_foreground_fraction: drop datalist slices with less labelled foreground than this.
        cache_dir: cache folder of the embedded brain data.

    Raises:
        FileNotFoundError, ValueError: for a missing datalist or file, an unknown split, unlabelled
            volumes, or invalid images/labels.
    """
    preprocessing = preprocessing or SlicePreprocessing()
    if datalist is None:
        from ..benchmark.pool import load_brain_dataset

        brain_split = look_up_option(split, _BRAIN_SPLITS)
        items = load_brain_dataset(cache_dir=cache_dir, preprocessing=preprocessing)[brain_split]
    else:
        from ..data.datalist import datalist_to_slices

        volumes = _datalist_volumes(datalist, split, validation_fraction)
        unlabelled = [v["image"] for v in volumes if v.get("label") is None]
        if unlabelled:
            raise ValueError(
                f"the {split!r} volumes of {str(datalist)!r} need labels to train or validate; without: "
                f"{unlabelled[:3]}"
            )
        items = datalist_to_slices(volumes, preprocessing, num_classes, min_foreground_fraction)
    if not items:
        raise ValueError(f"no {split!r} slices (datalist {datalist!r}, preprocessing {preprocessing!r})")
    return [{"image": item["image"], "label": item["label"]} for item in items]


def inference_items(
    dataset_dir: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    split: str = "test",
) -> list[dict[str, str]]:
    """The volumes inference scores, as ``[{"image": path}, ...]``.

    * ``datalist`` given: the ``split`` list of that datalist (entries may be paths or dicts);
    * else ``dataset_dir`` given: its ``dataset.json``'s ``split`` list if it has one, otherwise every
      NIfTI file (``.nii``, ``.nii.gz``) directly inside ``dataset_dir``;
    * else the MNI152 2009a T1 shipped with nilearn (the volume the embedded training slices come from),
      so that inference runs out of the box.

    Raises:
        FileNotFoundError, ValueError: for a missing folder or datalist, no volume to score, or two
            volumes whose outputs would have the same name (the same file name stem).
    """
    from ..data.datalist import load_datalist
    from ..io import output_stem

    if datalist is not None:
        paths = [str(item["image"]) for item in load_datalist(datalist, split)]
    elif dataset_dir is not None:
        folder = Path(dataset_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset_dir {str(folder)!r} is not a folder")
        json_path = folder / "dataset.json"
        if json_path.is_file() and split in _datalist_keys(json_path):
            paths = [str(item["image"]) for item in load_datalist(json_path, split)]
        else:
            files = sorted(
                p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)
            )
            if not files:
                raise ValueError(
                    f"no NIfTI volume (.nii, .nii.gz) in {str(folder)!r} and no {split!r} list in a dataset.json there"
                )
            paths = [str(p) for p in files]
    else:
        from ..benchmark.pool import mni152_2009a_paths

        paths = [str(mni152_2009a_paths()["t1"])]
    stems: dict[str, str] = {}
    for path in paths:
        other = stems.setdefault(output_stem(path), path)
        if other != path:
            raise ValueError(
                f"{other!r} and {path!r} would write outputs of the same name ({output_stem(path)!r}): "
                "score them into different --output_dir folders"
            )
    return [{"image": path} for path in paths]
