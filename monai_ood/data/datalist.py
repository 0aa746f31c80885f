"""Any user dataset as 2D slices: a MONAI-style datalist JSON of image/label volumes.

The datalist is the Medical Segmentation Decathlon format that :func:`monai.data.load_decathlon_datalist`
reads::

    {"training": [{"image": "imagesTr/case1.nii.gz", "label": "labelsTr/case1.nii.gz"}, ...],
     "validation": [...], "test": ["imagesTs/case9.nii.gz", ...]}

Paths are relative to the JSON's folder unless ``base_dir`` is given. Every volume is read with
SimpleITK (NIfTI, NRRD, MHA, ...) and cut into slices by :func:`monai_ood.preprocessing.volume_to_slices`,
the same code path as the embedded brain data and as scoring, so a model trained on these slices sees
at scoring time exactly what it saw in training.

Example:
    >>> items = load_datalist("dataset.json", split="training")  # doctest: +SKIP
    >>> slices = datalist_to_slices(items, SlicePreprocessing(), num_classes=4)  # doctest: +SKIP
    >>> slices[0]["image"].shape, slices[0]["label"].dtype  # doctest: +SKIP
    ((1, 112, 96), dtype('int64'))
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from monai_ood.preprocessing import SlicePreprocessing, slice_positions, volume_to_slices

__all__ = [
    "check_label_values",
    "check_same_extent",
    "datalist_to_slices",
    "load_datalist",
    "read_volume",
]


def load_datalist(
    path: str | os.PathLike, split: str = "training", base_dir: str | os.PathLike | None = None
):
    """Read one split of a MONAI datalist JSON and check that every file exists.

    Args:
        path: the datalist JSON.
        split: the key of the list to read (``"training"``, ``"validation"``, ``"test"``, ...).
        base_dir: folder the relative paths start from; defaults to the JSON's folder.

    Returns:
        A list of dicts with absolute ``"image"`` (and, where given, ``"label"``) paths, plus any
        other keys of the entries unchanged.

    Raises:
        FileNotFoundError: if the JSON or a listed image/label file does not exist.
        ValueError: if ``split`` is not in the JSON or an entry has no ``"image"``.
    """
    from monai.data import load_decathlon_datalist

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist JSON not found: {str(path)!r}")
    try:
        items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=split, base_dir=base_dir)
    except ValueError as err:  # MONAI's message for a missing key is "Data list <key> not specified in ..."
        raise ValueError(f"split {split!r} not found in datalist {str(path)!r}: {err}") from err
    for number, item in enumerate(items):
        if "image" not in item:
            raise ValueError(
                f"entry {number} of split {split!r} in {str(path)!r} has no 'image', got {item!r}"
            )
        for key in ("image", "label"):
            if key in item and not Path(item[key]).is_file():
                raise FileNotFoundError(
                    f"{key} file of entry {number} of split {split!r} in {str(path)!r} not found: {item[key]!r}"
                )
    return items


def read_volume(path: str | os.PathLike, what: str = "image") -> sitk.Image:
    """Read an image or label file with SimpleITK (NIfTI, NRRD, MHA, ...).

    Args:
        path: the file.
        what: ``"image"`` or ``"label"``, for error messages.

    Returns:
        The image with its geometry.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if SimpleITK cannot read it.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ValueError(f"cannot read {what} file {str(path)!r} with SimpleITK: {err}") from err


def _world_box(image: sitk.Image) -> np.ndarray:
    """Axis-aligned world bounding box ``(2, 3)`` of the voxels' outer edges (not their centres).

    Outer edges make two grids over the same field of view at different resolutions have the same box.
    """
    size = image.GetSize()
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        for corner in itertools.product(*[(-0.5, s - 0.5) for s in size])
    ]
    corners = np.array(corners)
    if corners.shape[1] == 2:  # a 2D image lies in the z = 0 plane
        corners = np.pad(corners, ((0, 0), (0, 1)))
    return np.stack([corners.min(0), corners.max(0)])


def check_same_extent(
    image: sitk.Image, label: sitk.Image, tolerance_voxels: float = 1.0, name: str = ""
) -> None:
    """Check that a label covers the same physical region as its image.

    A label at another resolution is fine (it is resampled by nearest neighbour onto the slicing grid);
    a label with another field of view, or without the image's origin/direction (e.g. written without
    its geometry), is not: resampling would silently misplace it.

    Args:
        image: the image.
        label: its label map.
        tolerance_voxels: allowed difference of the world bounding boxes, in voxels of the coarser grid.
        name: what to call the pair in the error message (e.g. the file name).

    Raises:
        ValueError: if the world bounding boxes differ by more than the tolerance.
    """
    if tolerance_voxels < 0:
        raise ValueError(f"tolerance_voxels must be non-negative, got {tolerance_voxels!r}")
    box_image, box_label = _world_box(image), _world_box(label)
    tolerance = tolerance_voxels * max(*image.GetSpacing(), *label.GetSpacing()) + 1e-3
    difference = float(np.abs(box_image - box_label).max())
    if difference > tolerance:
        raise ValueError(
            f"image and label{' ' + name if name else ''} do not cover the same physical region "
            f"(bounding boxes differ by {difference:.2f} mm > {tolerance:.2f} mm): image box "
            f"{np.round(box_image, 2).tolist()}, size {image.GetSize()}, spacing {image.GetSpacing()}; "
            f"label box {np.round(box_label, 2).tolist()}, size {label.GetSize()}, spacing "
            f"{label.GetSpacing()}"
        )


def check_label_values(label: sitk.Image, num_classes: int | None = None, name: str = "") -> None:
    """Check that a label map holds integer class indices in ``[0, num_classes)``.

    Args:
        label: the label map.
        num_classes: number of classes K, or ``None`` to check only integrality and non-negativity.
        name: what to call the label in the error message.

    Raises:
        ValueError: for non-finite, non-integer, negative or too large values.
    """
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"label{' ' + name if name else ''} must be scalar, got {label.GetNumberOfComponentsPerPixel()} "
            "components per pixel"
        )
    values = np.unique(sitk.GetArrayViewFromImage(label))
    where = f"label{' ' + name if name else ''}"
    if not np.isfinite(values).all():
        raise ValueError(f"{where} contains NaN or Inf values")
    if not np.array_equal(values, np.round(values)):
        raise ValueError(f"{where} must hold integer class indices, got values {values[:10].tolist()!r}")
    if num_classes is None:
        bad, bound = values[values < 0], ">= 0"
    else:
        bad, bound = values[(values < 0) | (values >= num_classes)], f"in [0, {num_classes})"
    if bad.size:
        raise ValueError(f"{where} values must be {bound}, got {bad[:10].tolist()!r}")


def _check_finite(image: sitk.Image, path: str) -> None:
    if not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        raise ValueError(f"image {path!r} contains NaN or Inf values")
    # SimpleITK's NIfTI reader silently turns NaN and Inf into 0, so float NIfTI data is checked
    # again as stored, with nibabel (integer data cannot hold NaN or Inf).
    if path.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        stored = nib.load(path)
        if (
            np.issubdtype(stored.get_data_dtype(), np.floating)
            and not np.isfinite(np.asanyarray(stored.dataobj)).all()
        ):
            raise ValueError(f"image {path!r} contains NaN or Inf values (SimpleITK would read them as 0)")


def datalist_to_slices(
    items: Sequence[dict[str, Any]],
    preprocessing: SlicePreprocessing | None = None,
    num_classes: int | None = None,
    min_foreground_fraction: float = 0.0,
) -> list[dict[str, Any]]:
    """Cut every volume of a datalist into preprocessed 2D slices, like the brain dataset's items.

    Args:
        items: entries from :func:`load_datalist` (``"image"`` path, optional ``"label"`` path).
        preprocessing: the slicing and intensity preprocessing; defaults to ``SlicePreprocessing()``.
        num_classes: if given, label values must lie in ``[0, num_classes)``.
        min_foreground_fraction: drop labelled slices whose fraction of non-zero label pixels is below
            this (0 keeps every slice); slices of unlabelled items are always kept.

    Returns:
        One dict per slice: ``"image"`` float32 ``(1, H, W)`` in [0, 1], ``"label"`` int64
        ``(1, H, W)`` (only for labelled items), ``"slice"`` index in the grid, ``"position_mm"`` along
        the slicing axis, and ``"source"`` (the image path).

    Raises:
        FileNotFoundError: for a missing file.
        ValueError: for NaN/Inf images, label values outside ``[0, num_classes)``, or a label that does
            not cover the image's physical region.
    """
    preprocessing = preprocessing or SlicePreprocessing()
    if not isinstance(preprocessing, SlicePreprocessing):
        raise ValueError(f"preprocessing must be a SlicePreprocessing, got {preprocessing!r}")
    if not 0.0 <= min_foreground_fraction < 1.0:
        raise ValueError(f"min_foreground_fraction must be in [0, 1), got {min_foreground_fraction!r}")
    out: list[dict[str, Any]] = []
    for item in items:
        if "image" not in item:
            raise ValueError(f"datalist entry has no 'image', got {item!r}")
        image_path = str(item["image"])
        image = read_volume(image_path, "image")
        _check_finite(image, image_path)
        label = None
        if item.get("label") is not None:
            label = read_volume(item["label"], "label")
            check_label_values(label, num_classes, name=repr(str(item["label"])))
            check_same_extent(image, label, name=f"{image_path!r} / {str(item['label'])!r}")
        slices, labels, grid = volume_to_slices(image, preprocessing, label)
        positions = slice_positions(grid)
        for index in range(len(slices)):
            entry: dict[str, Any] = {
                "image": slices[index],
                "slice": index,
                "position_mm": float(positions[index]),
                "source": image_path,
            }
            if labels is not None:
                if min_foreground_fraction > 0 and (labels[index] > 0).mean() < min_foreground_fraction:
                    continue
                entry["label"] = labels[index]
            out.append(entry)
    return out
