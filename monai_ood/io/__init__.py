"""Reading inputs, writing outputs a 3D Slicer user can overlay on them, and the Slicer helper files."""

from monai_ood.io.images import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    OUTPUT_SUFFIXES,
    GeometryWarning,
    affine_from_image,
    atomic_write,
    find_inputs,
    output_stem,
    read_image,
    same_geometry,
    write_image,
)
from monai_ood.io.slicer import (
    default_class_names,
    heatmap_colors,
    heatmap_ctbl,
    label_colors,
    labels_ctbl,
    loader_script,
    write_slicer_files,
)

__all__ = [
    "DICOM_SUFFIXES",
    "GeometryWarning",
    "IMAGE_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "affine_from_image",
    "atomic_write",
    "default_class_names",
    "find_inputs",
    "heatmap_colors",
    "heatmap_ctbl",
    "label_colors",
    "labels_ctbl",
    "loader_script",
    "output_stem",
    "read_image",
    "same_geometry",
    "write_image",
    "write_slicer_files",
]
