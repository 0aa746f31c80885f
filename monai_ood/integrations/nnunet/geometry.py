"""Bring a map from nnU-Net's preprocessed grid back onto the input image and write it there.

nnU-Net preprocesses a case by transposing its axes (``plans.transpose_forward``), cropping it to the
bounding box of its non-zero voxels and resampling it to the configuration's spacing; its segmentation
export undoes the three steps. :func:`map_to_original_array` undoes them for a float map the same way
(``resampling_fn_probabilities``, linear by default; 0 outside the crop, where nnU-Net's segmentation
is background too). :func:`map_to_input_image` then places the array on the input's grid as the dataset's
reader/writer class does for segmentations, and :func:`write_map` writes it with
:func:`monai_ood.io.write_image`, which copies a NIfTI input's affine verbatim.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import SimpleITK as sitk
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from ...io import write_image

__all__ = ["map_to_input_image", "map_to_original_array", "write_map"]

SUPPORTED_READER_WRITERS = ("SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO", "NibabelIOWithReorient")


def map_to_original_array(
    score_map: torch.Tensor | np.ndarray, properties: Mapping[str, Any], plans_manager, configuration_manager
) -> np.ndarray:
    """Undo nnU-Net's resampling, cropping and transposition of a map on the preprocessed grid.

    Args:
        score_map: ``(*preprocessed_spatial)`` float map of one case.
        properties: the case's ``data_properties`` from nnU-Net's preprocessing.
        plans_manager: nnU-Net's ``PlansManager`` of the model.
        configuration_manager: its ``ConfigurationManager`` of the configuration.

    Returns:
        A float32 array in the reader/writer's array order, shape ``shape_before_cropping`` transposed back
        (what nnU-Net's segmentation export hands to ``write_seg``).
    """
    if not isinstance(score_map, torch.Tensor):
        score_map = torch.from_numpy(np.asarray(score_map))
    spacing_transposed = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    shape_after_cropping = properties["shape_after_cropping_and_before_resampling"]
    current_spacing = (
        configuration_manager.spacing
        if len(configuration_manager.spacing) == len(shape_after_cropping)
        else [spacing_transposed[0], *configuration_manager.spacing]
    )
    resampled = configuration_manager.resampling_fn_probabilities(
        score_map[None].float(), shape_after_cropping, current_spacing, spacing_transposed
    )
    resampled = np.asarray(resampled.cpu() if isinstance(resampled, torch.Tensor) else resampled)[0]
    full = np.zeros(properties["shape_before_cropping"], dtype=np.float32)
    full = insert_crop_into_image(full, resampled.astype(np.float32), properties["bbox_used_for_cropping"])
    if isinstance(full, torch.Tensor):
        full = full.numpy()
    return np.ascontiguousarray(full.transpose(plans_manager.transpose_backward))


def _image_from_affine(array_zyx: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    """A SimpleITK image of a ``(z, y, x)`` array placed by a NIfTI (RAS) affine."""
    image = sitk.GetImageFromArray(array_zyx)
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine_ras, dtype=np.float64)[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:, 3]])
    return image


def _reader_writer_kind(reader_writer: type | str) -> str:
    names = [reader_writer] if isinstance(reader_writer, str) else [c.__name__ for c in reader_writer.__mro__]
    for kind in ("SimpleITKIOWithReorient", "NibabelIOWithReorient", "SimpleITKIO", "NibabelIO"):
        if kind in names:
            return kind
    raise NotImplementedError(
        f"score maps can be written for datasets read with {', '.join(SUPPORTED_READER_WRITERS)} (or "
        f"subclasses); this one uses {names[0]}"
    )


def map_to_input_image(
    array: np.ndarray, properties: Mapping[str, Any], reader_writer: type | str
) -> sitk.Image:
    """Place an array from :func:`map_to_original_array` on the input's grid.

    Mirrors ``write_seg`` of nnU-Net's reader/writer classes: SimpleITK arrays get the stored spacing,
    origin and direction (and are turned back to the original orientation for ``SimpleITKIOWithReorient``);
    nibabel arrays are put back into the file's voxel order and placed by its affine.

    Args:
        array: the map in the reader/writer's array order.
        properties: the case's ``data_properties``.
        reader_writer: the dataset's reader/writer class (``plans_manager.image_reader_writer_class``) or
            its name.

    Raises:
        NotImplementedError: for readers other than :data:`SUPPORTED_READER_WRITERS` (2D natural images, TIFF).
    """
    array = np.asarray(array, dtype=np.float32)
    kind = _reader_writer_kind(reader_writer)
    if kind in ("SimpleITKIO", "SimpleITKIOWithReorient"):
        stuff = properties["sitk_stuff"]
        if len(stuff["spacing"]) == 2:
            array = array[0]
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(stuff["spacing"])
        image.SetOrigin(stuff["origin"])
        image.SetDirection(stuff["direction"])
        if kind == "SimpleITKIOWithReorient":
            image = sitk.DICOMOrient(image, stuff["original_orientation"])
        return image
    if kind == "NibabelIO":
        # NibabelIO transposes the file's (x, y, z) data to (z, y, x): already SimpleITK's array order
        return _image_from_affine(array, properties["nibabel_stuff"]["original_affine"])
    # NibabelIOWithReorient: back from RAS to the file's orientation, as its write_seg does
    stuff = properties["nibabel_stuff"]
    reoriented = nibabel.Nifti1Image(array.transpose((2, 1, 0)), affine=stuff["reoriented_affine"])
    back = ornt_transform(axcodes2ornt("RAS"), io_orientation(stuff["original_affine"]))
    original = reoriented.as_reoriented(back)
    return _image_from_affine(np.ascontiguousarray(np.asarray(original.dataobj).T), original.affine)


def write_map(
    image: sitk.Image,
    path: str | os.PathLike,
    reference_path: str | os.PathLike | None = None,
    description: str | None = None,
) -> Path:
    """Write a map atomically as NIfTI (or NRRD by suffix) on the input's grid, replacing an older one.

    With ``reference_path`` (the case's first input file) on the same voxel grid, a NIfTI input's affine
    is copied verbatim, so the map's header equals the input's bit for bit (see
    :func:`monai_ood.io.write_image`, which checks that ITK places both on the same grid).
    """
    if reference_path is not None:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(reference_path))
        reader.ReadImageInformation()
        size = tuple(s for s in reader.GetSize() if s != 1)
        if size != tuple(s for s in image.GetSize() if s != 1):
            reference_path = None
    return write_image(
        image, path, reference_path=reference_path, kind="map", overwrite=True, description=description
    )
