"""DICOM outputs for PACS users: A_xi as a Parametric Map, the segmentation as DICOM SEG (highdicom).

``monai-ood score --format dicom`` writes, for a DICOM input (a series folder or a DICOM file), two
DICOM objects into the output folder, each one multi-frame file that can be sent to a PACS as it is:

* ``<stem>_score_calibrated.dcm``: the calibrated OOD map A_xi in [0, 1] as a **Parametric Map**
  (:class:`highdicom.pm.ParametricMap`, SOP class 1.2.840.10008.5.1.4.1.1.30). The values are stored as
  16-bit unsigned integers, ``round(A_xi * 65535)``, with a Real World Value Mapping of slope 1/65535
  (``A_xi``, no units): readers that apply the mapping get A_xi to within 0.5/65535 (7.6e-6); the
  stored window (0..65535) shows the whole range. The uncalibrated map A(x) has no DICOM output
  (score with ``--format nifti`` for it).
* ``<stem>_seg.dcm``: the segmentation as **DICOM SEG** (:class:`highdicom.seg.Segmentation`, binary),
  one segment per foreground class, numbered as the model's classes (segment k = class k), labelled
  with the checkpoint's class names and coloured as in the 3D Slicer label table
  (:func:`monai_ood.io.slicer.label_colors`). Class 0 (background) is where no segment is set, as SEG
  does; frames without any voxel of a segment are left out.

Both belong to the source's study and patient (copied from the source), share its Frame of Reference,
reference every source instance (the Referenced Series Sequence, and per frame the source image it was
derived from), and lie at the input's exact geometry: each frame has the Image Position (Patient) of
the source slice it derives from (highdicom orders the frames along the slice normal), with the
source's orientation and pixel spacing. Each gets a new
series (``monai-ood A_xi OOD map`` / ``monai-ood segmentation``); content qualification is RESEARCH.

Readers, as tested on a multi-slice CT series (``tests/io/test_dicom_output.py``): pydicom (pixels,
per-frame positions, references), highdicom (``segread``, ``pmread``) and dcm2niix (the Parametric
Map onto the input's world geometry). SimpleITK 2.5 (its GDCM 3.0) does not know the Parametric Map
SOP class and reads a SEG only as a stack of frames without their geometry, so ITK-based tools need the
NIfTI or NRRD outputs.

A non-DICOM input has no study, patient or series to reference; making them up would put a result under
an invented patient, so ``--format dicom`` refuses such inputs before any work.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from monai_ood.files import AtomicFileSet
from monai_ood.io.images import DICOM_SUFFIXES, IMAGE_SUFFIXES, _is_dicom_folder, _series_ids, _suffix

__all__ = [
    "DICOM_OUTPUTS",
    "DICOM_SUFFIX",
    "STORED_MAX",
    "is_dicom_input",
    "parametric_map",
    "read_source_series",
    "segmentation_object",
    "write_dicom_outputs",
]

DICOM_SUFFIX = ".dcm"
#: the outputs of :class:`~monai_ood.inference.ScoredImage` that have a DICOM form
DICOM_OUTPUTS = ("segmentation", "calibrated_map")
#: A_xi = stored value / STORED_MAX (the Parametric Map's Real World Value Mapping)
STORED_MAX = 65535
_SERIES_DESCRIPTIONS = {
    "calibrated_map": "monai-ood A_xi OOD map",
    "segmentation": "monai-ood segmentation",
}
# a derived series is numbered after its source's: source + offset (a PACS lists them side by side)
_SERIES_OFFSETS = {"calibrated_map": 9001, "segmentation": 9002}
# a coding scheme of our own for the segment types (DICOM: local schemes start with "99")
_CODING_SCHEME = "99MONAIOOD"
# the highdicom errors a source can cause (a missing or malformed attribute): one line in the table
_SOURCE_ERRORS = (ValueError, AttributeError, KeyError)


def is_dicom_input(path: str | os.PathLike) -> bool:
    """Whether an input of :func:`monai_ood.io.find_inputs` is DICOM: a series folder or a DICOM file.

    A file counts as DICOM by its suffix (``.dcm``, ``.ima``), or, without an image suffix, by the
    ``DICM`` marker of the DICOM file format (e.g. ``IM0001``).
    """
    path = Path(path)
    if path.is_dir():
        return _is_dicom_folder(path)
    if _suffix(path, IMAGE_SUFFIXES):
        return False
    if _suffix(path, DICOM_SUFFIXES):
        return True
    from pydicom.misc import is_dicom

    try:
        return bool(is_dicom(path))
    except OSError:
        return False


def read_source_series(path: str | os.PathLike) -> list:
    """The headers (no pixel data) of the DICOM files :func:`monai_ood.io.read_image` reads for ``path``.

    Args:
        path: a DICOM file, or a series folder (of several series, the largest, as ``read_image`` does).

    Returns:
        :class:`pydicom.Dataset` headers, in the order of the image's slices (GDCM's sort along the
        slice normal), so that slice k of the image is ``sources[k]``.

    Raises:
        ValueError: the folder holds no DICOM series, or a file is not DICOM.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if path.is_dir():
        series_ids = _series_ids(path)
        if not series_ids:
            raise ValueError(f"{str(path)!r} is a folder without a DICOM series")
        files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), sid) for sid in series_ids}
        names = list(files[max(series_ids, key=lambda sid: len(files[sid]))])
    else:
        names = [str(path)]
    try:
        return [pydicom.dcmread(name, stop_before_pixels=True) for name in names]
    except InvalidDicomError as error:
        raise ValueError(f"{str(path)!r} is not DICOM: {error}") from error


def _frames(sources: Sequence) -> int:
    return sum(int(getattr(ds, "NumberOfFrames", 1) or 1) for ds in sources)


def _check_grid(image: sitk.Image, sources: Sequence) -> None:
    """Refuse an image that is not on the source's grid: other frame size, frame count or positions."""
    size = image.GetSize()
    depth = size[2] if image.GetDimension() == 3 else 1
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in sources}
    if shapes != {(size[1], size[0])} or _frames(sources) != depth:
        raise ValueError(
            f"the output grid ({depth} slices of {size[1]} x {size[0]}) does not match the source series "
            f"({_frames(sources)} frames of {sorted(shapes)} rows x columns)"
        )
    if image.GetDimension() != 3 or len(sources) != depth or depth < 2:
        return
    # slice k of the image must be the k-th source slice: the frames copy the sources' positions
    placed = np.array([image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(depth)])
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in sources])
    off = float(np.linalg.norm(placed - positions, axis=1).max())
    if off > 0.5 * image.GetSpacing()[2]:
        raise ValueError(
            f"the source slices lie up to {off:.3g} mm away from the image's slices (spacing "
            f"{image.GetSpacing()[2]:.3g} mm): the image was not read from this series in this order"
        )


def _volume(image: sitk.Image) -> np.ndarray:
    """The voxels as DICOM frames: ``(frames, rows, columns)``."""
    array = sitk.GetArrayViewFromImage(image)
    return array[None] if array.ndim == 2 else array


def _series_number(sources: Sequence, key: str) -> int:
    try:
        number = int(sources[0].SeriesNumber)
    except (AttributeError, TypeError, ValueError):
        number = 0
    return number + _SERIES_OFFSETS[key]


def _equipment() -> dict:
    from monai_ood import __version__

    return {
        "manufacturer": "monai-ood",
        "manufacturer_model_name": "monai-ood",
        "software_versions": __version__,
        "device_serial_number": "0",
    }


def _finish(dataset, key: str):
    dataset.SeriesDescription = _SERIES_DESCRIPTIONS[key]
    return dataset


def parametric_map(image: sitk.Image, sources: Sequence):
    """The A_xi map as a DICOM Parametric Map derived from ``sources`` (uint16, slope 1/65535).

    Args:
        image: A_xi on the input's grid (values in [0, 1]; rounding excursions are clipped).
        sources: the input's headers, :func:`read_source_series`.

    Returns:
        A :class:`highdicom.pm.ParametricMap` (a :class:`pydicom.Dataset`).

    Raises:
        ValueError: NaN/Inf values, values outside [0, 1] by more than rounding, an image not on the
            sources' grid, or sources highdicom cannot derive an image from (e.g. no Frame of Reference).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    _check_grid(image, sources)
    values = _volume(image)
    if not np.isfinite(values).all():
        raise ValueError("cannot write a map with NaN or Inf values")
    if values.min() < -1e-6 or values.max() > 1 + 1e-6:
        raise ValueError(f"A_xi must lie in [0, 1], got [{values.min():.6g}, {values.max():.6g}]")
    stored = np.round(np.clip(values, 0.0, 1.0) * STORED_MAX).astype(np.uint16)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="A_xi",
        lut_explanation="monai-ood calibrated OOD map A_xi in [0, 1]",
        unit=codes.UCUM.NoUnits,
        value_range=(0, STORED_MAX),
        slope=1.0 / STORED_MAX,
        intercept=0.0,
    )
    try:
        result = hd.pm.ParametricMap(
            source_images=list(sources),
            pixel_array=stored,
            series_instance_uid=generate_uid(),
            series_number=_series_number(sources, "calibrated_map"),
            sop_instance_uid=generate_uid(),
            instance_number=1,
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[
                hd.VOILUTTransformation(window_center=STORED_MAX / 2, window_width=STORED_MAX)
            ],
            content_description="OOD map A_xi: 0 typical, 1 beyond validation",
            content_label="MONAI_OOD_AXI",
            **_equipment(),
        )
    except _SOURCE_ERRORS as error:
        raise ValueError(f"cannot derive a Parametric Map from the source series: {error}") from error
    return _finish(result, "calibrated_map")


def _segment_descriptions(present: Sequence[int], class_names: Sequence[str], num_classes: int) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from monai_ood import __version__
    from monai_ood.io.slicer import label_colors

    colors = label_colors(num_classes)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="monai-ood", family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=k,
            segment_label=str(class_names[k])[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=hd.sr.CodedConcept(f"class{k}", _CODING_SCHEME, str(class_names[k])[:64]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*(int(c) for c in colors[k][:3])),
        )
        for k in present
    ]


def segmentation_object(
    labels: sitk.Image,
    sources: Sequence,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
):
    """The segmentation as a binary DICOM SEG derived from ``sources``, one segment per foreground class.

    Args:
        labels: class indices on the input's grid (0 = background, not a segment).
        sources: the input's headers, :func:`read_source_series`.
        class_names: one name per class, background first (default: ``background, class_1, ...`` or
            the embedded data's names for 4 classes).
        num_classes: classes of the model, background included (default: the largest label + 1, at
            least 2); every foreground class is a segment, also one the prediction does not use.

    Returns:
        A :class:`highdicom.seg.Segmentation` (a :class:`pydicom.Dataset`).

    Raises:
        ValueError: labels that are negative, fractional or beyond ``num_classes``, too few class names,
            an image not on the sources' grid, or sources highdicom cannot derive an image from.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    from monai_ood.io.slicer import default_class_names

    _check_grid(labels, sources)
    values = _volume(labels)
    if np.issubdtype(values.dtype, np.floating) and not np.array_equal(values, np.round(values)):
        raise ValueError("a label image must hold whole numbers; got fractional values")
    low, high = int(values.min()), int(values.max())
    num_classes = max(2, high + 1) if num_classes is None else int(num_classes)
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {low}..{high}")
    class_names = list(class_names) if class_names is not None else default_class_names(num_classes)
    if len(class_names) < num_classes:
        raise ValueError(f"{num_classes} classes need as many names, got {class_names!r}")
    segments = list(range(1, num_classes))
    pixels = values.astype(np.uint8 if num_classes <= 256 else np.uint16)
    try:
        result = hd.seg.Segmentation(
            source_images=list(sources),
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_segment_descriptions(segments, class_names, num_classes),
            series_instance_uid=generate_uid(),
            series_number=_series_number(sources, "segmentation"),
            sop_instance_uid=generate_uid(),
            instance_number=1,
            content_label="MONAI_OOD_SEG",
            content_description="monai-ood segmentation",
            **_equipment(),
        )
    except _SOURCE_ERRORS as error:
        raise ValueError(f"cannot derive a DICOM SEG from the source series: {error}") from error
    return _finish(result, "segmentation")


def write_dicom_outputs(
    scored,
    paths: Mapping[str, Path],
    source: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> list[Path]:
    """Write a scored input's DICOM outputs as one set: all of them appear, or after an error none.

    Args:
        scored: a :class:`~monai_ood.inference.ScoredImage` of the DICOM input ``source``.
        paths: where each output goes, keys of :data:`DICOM_OUTPUTS` (``calibrated_map`` only when the
            model is calibrated); existing files are replaced (the caller vets them before any work).
        source: the DICOM input (file or series folder) the image was read from; never written to.
        class_names: the checkpoint's class names (background first), or ``None``.
        num_classes: the model's classes, background included.

    Returns:
        The files written.

    Raises:
        ValueError: a key without a DICOM form, a target that is a source file, or outputs that do not
            fit the source (see :func:`parametric_map`, :func:`segmentation_object`).
        OSError: the files cannot be written.
    """
    unknown = sorted(set(paths) - set(DICOM_OUTPUTS))
    if unknown:
        raise ValueError(f"no DICOM form for {unknown}; DICOM outputs are {list(DICOM_OUTPUTS)}")
    if "calibrated_map" in paths and not scored.has_calibrated_map:
        raise ValueError("there is no calibrated map to write: the model has no calibration")
    sources = read_source_series(source)
    source_files = {Path(ds.filename).resolve() for ds in sources}
    for target in paths.values():
        if Path(target).resolve() in source_files:
            raise ValueError(f"refusing to write {str(target)!r}: it is a file of the input {str(source)!r}")
    makers = {
        "calibrated_map": lambda: parametric_map(scored.calibrated_map, sources),
        "segmentation": lambda: segmentation_object(scored.segmentation, sources, class_names, num_classes),
    }
    with AtomicFileSet(overwrite=True) as files:
        for key, target in paths.items():
            dataset = makers[key]()  # one full-size output at a time
            files.write(
                target,
                lambda temporary, dataset=dataset: dataset.save_as(temporary, enforce_file_format=True),
            )
            del dataset
    return [Path(p) for p in paths.values()]
