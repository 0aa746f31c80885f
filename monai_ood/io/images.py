"""Reading inputs and writing outputs as files a 3D Slicer user can overlay on the input.

Images are handled as SimpleITK images (ITK's LPS world, like :mod:`monai_ood.preprocessing`). Outputs
are brought back onto the input's own grid with :func:`monai_ood.preprocessing.resample_to_reference`
and written here:

* NIfTI (``.nii``, ``.nii.gz``; the default) is written with nibabel. When the input itself is a NIfTI
  file, its affine is copied verbatim, so the output's geometry is bit-equal to the input's and the
  two overlay exactly in any viewer; otherwise the affine comes from the image geometry (LPS -> RAS).
  ``qform = sform`` with code 1 (scanner); maps are float32 with intent ``estimate`` (1001), labels
  are uint8/int16 with intent ``label`` (1002), and ``cal_min``/``cal_max`` give viewers a window.
* NRRD (``.nrrd``) is written with SimpleITK, gzip-compressed.

Geometry is never invented: a DICOM series whose slice positions are missing or uneven is refused
(:class:`ValueError`), and a NIfTI input's grid follows nibabel's rules (``img.affine``: the sform if
its code is set, else the qform, else the pixdim-only "best affine"), with a :class:`GeometryWarning`
when no code is set (orientation unknown, assumed) or when qform and sform disagree (the sform is used).
A NIfTI whose affine is sheared (non-orthonormal, which ITK cannot carry) is resampled (linear) onto
the closest orthonormal grid covering it, with a warning; NIfTI outputs written with that input as
``reference_path`` are resampled back onto the input's own sheared grid and carry its affine.

Every write is atomic (a temporary file in the output folder, then :func:`os.replace`), refuses to
replace an existing file unless asked to, and never writes onto the input it was computed from.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from monai_ood.files import atomic_write

__all__ = [
    "DICOM_SUFFIXES",
    "GeometryWarning",
    "IMAGE_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "affine_from_image",
    "atomic_write",
    "find_inputs",
    "output_stem",
    "read_image",
    "same_geometry",
    "write_image",
]

# Longest first, so ".nii.gz" wins over ".gz"-less matches when stripping suffixes.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".ima")
OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_KINDS = ("map", "label")
# NIfTI's descrip field is char[80]; 79 bytes keep room for the terminating NUL some readers expect.
_DESCRIP_BYTES = 79
# A NIfTI input's affine is copied verbatim only if ITK (hence 3D Slicer) then reads the output on the
# grid it was computed on; this is the largest corner displacement (mm) put down to float32 rounding.
_PLACEMENT_TOLERANCE_MM = 1e-3
# Slice spacings of a DICOM series may differ from their median by this fraction (DICOM rounding).
_SLICE_SPACING_TOLERANCE = 0.01
# qform and sform "agree" if no voxel-to-world coefficient differs by more than this (mm).
_AFFINE_TOLERANCE_MM = 1e-3
# A NIfTI affine is orthonormal (ITK can carry it) if its normalised columns' dot products are below this.
_SHEAR_TOLERANCE = 1e-4


class GeometryWarning(UserWarning):
    """An input's geometry is uncertain or was changed to be readable (unknown orientation, etc.)."""


def _suffix(path: Path, suffixes: Sequence[str]) -> str | None:
    name = path.name.lower()
    return next((s for s in suffixes if name.endswith(s)), None)


def _is_hidden(path: Path) -> bool:
    # Dot files are temporary outputs of atomic_write, editor backups or macOS metadata, never inputs.
    return path.name.startswith(".")


@contextlib.contextmanager
def _quiet_itk():
    """Silence ITK's warnings on stderr (e.g. "No Series were found" while probing a folder)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _series_ids(folder: Path) -> tuple[str, ...]:
    with _quiet_itk():
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _is_dicom_folder(folder: Path) -> bool:
    try:
        entries = [p for p in folder.iterdir() if p.is_file() and not _is_hidden(p)]
    except OSError:
        return False
    if any(_suffix(p, DICOM_SUFFIXES) for p in entries):
        return True
    if not entries or all(_suffix(p, IMAGE_SUFFIXES) for p in entries):
        return False  # nothing GDCM could recognise; skip its scan of (possibly large) image files
    return len(_series_ids(folder)) > 0


# ----------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------


def _read_dicom_series(folder: Path) -> sitk.Image:
    series_ids = _series_ids(folder)
    if not series_ids:
        raise ValueError(
            f"{str(folder)!r} is a folder without a DICOM series; pass an image file (NIfTI, NRRD, "
            "MetaImage, DICOM) or a folder holding one DICOM series"
        )
    files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    chosen = max(series_ids, key=lambda sid: len(files[sid]))
    if len(series_ids) > 1:
        counts = ", ".join(f"{sid} ({len(files[sid])} files)" for sid in series_ids)
        warnings.warn(
            f"{str(folder)!r} holds {len(series_ids)} DICOM series: {counts}; reading the largest, {chosen}. "
            "Put each series in its own folder to choose another.",
            stacklevel=3,
        )
    _check_slice_positions(folder, files[chosen])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    return reader.Execute()


def _slice_geometry(file: str) -> tuple[np.ndarray, np.ndarray] | None:
    """ImagePositionPatient and the slice normal (from ImageOrientationPatient) of one DICOM file."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
        position = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        orientation = np.array([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
    except (RuntimeError, ValueError):
        return None
    if position.shape != (3,) or orientation.shape != (6,):
        return None
    return position, np.cross(orientation[:3], orientation[3:])


def _check_slice_positions(folder: Path, files: Sequence[str]) -> None:
    """Refuse a series whose slices are not evenly spaced along the slice normal (a gap or a repeat)."""
    if len(files) < 2:
        return
    geometries = [_slice_geometry(f) for f in files]
    if all(g is None for g in geometries):
        # e.g. secondary captures: a reader would stack them at a made-up origin and spacing
        raise ValueError(
            f"DICOM series {str(folder)!r}: none of its {len(files)} slices carries a position "
            "(ImagePositionPatient/ImageOrientationPatient), so where the slices lie and how far apart "
            "cannot be known; score the slices as separate 2D files instead"
        )
    if any(g is None for g in geometries):
        missing = [Path(f).name for f, g in zip(files, geometries, strict=True) if g is None]
        raise ValueError(
            f"DICOM series {str(folder)!r}: {len(missing)} slice(s) without a readable position "
            f"(ImagePositionPatient/ImageOrientationPatient), e.g. {missing[:3]}; the slice grid cannot "
            "be known. Remove or repair those files, or pass the slices you have as separate files"
        )
    normal = geometries[0][1]
    positions = np.sort([g[0] @ normal for g in geometries])
    steps = np.diff(positions)
    median = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - median) > _SLICE_SPACING_TOLERANCE * max(abs(median), 1e-6))
    if median <= 0 or len(bad):
        found = ", ".join(
            f"{positions[i]:.4g} -> {positions[i + 1]:.4g} mm ({steps[i]:.4g} mm)" for i in bad[:5]
        )
        raise ValueError(
            f"DICOM series {str(folder)!r} is not evenly sliced: {len(files)} slices, expected spacing "
            f"{median:.4g} mm along the slice normal, found {found} (a missing, corrupt or duplicate "
            "slice). Fill the gap (add the missing slices) or pass the slices you have as separate files"
        )


def _itk_reason(error: RuntimeError) -> str:
    """The useful part of a SimpleITK error: its ITK messages without source locations and addresses."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [re.sub(r"^ITK ERROR: \w+\(0x[0-9a-fA-F]+\):\s*", "", line) for line in lines]
    lines = [line for line in lines if not line.startswith("Exception thrown in SimpleITK")]
    reason = " ".join(lines) or type(error).__name__
    return reason if len(reason) <= 300 else reason[:297] + "..."


def _squeeze_trailing(image: sitk.Image) -> sitk.Image:
    """Drop trailing one-voxel dimensions beyond the third (e.g. a NIfTI stored as x, y, z, 1)."""
    while image.GetDimension() > 3 and image.GetSize()[-1] == 1:
        size = list(image.GetSize())
        size[-1] = 0  # Extract collapses a dimension of size 0
        image = sitk.Extract(
            image, size, [0] * image.GetDimension(), sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX
        )
    return image


def _lps(affine: np.ndarray) -> np.ndarray:
    """A NIfTI (RAS) voxel-to-world affine turned into ITK's LPS world."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)


def _is_sheared(affine: np.ndarray) -> bool:
    """Whether the affine's axes are not orthogonal (or degenerate): ITK cannot carry it as a direction."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    if np.any(norms == 0):
        return False  # degenerate (zero pixdim): leave it to ITK, which refuses it
    unit = columns / norms
    return bool(np.abs(unit.T @ unit - np.eye(3)).max() > _SHEAR_TOLERANCE)


def _nifti_affine(path: Path) -> tuple[nib.Nifti1Image, np.ndarray] | None:
    """The NIfTI image and the affine nibabel uses (sform, else qform, else pixdim-only), with warnings.

    Warns (:class:`GeometryWarning`) when neither qform nor sform code is set (the orientation is
    unknown; nibabel's pixdim-only affine is assumed) and when both are set but differ (the sform is
    used, as nibabel does). ``None`` if nibabel cannot read the header (ITK then reports the error).
    """
    try:
        nii = nib.load(str(path))
        header = nii.header
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
        affine = np.array(nii.affine, dtype=np.float64)
    except Exception:
        return None
    if qcode == 0 and scode == 0:
        warnings.warn(
            f"{str(path)!r} has no qform or sform (both codes 0): its orientation is unknown; assuming "
            "nibabel's pixdim-only affine (axes along -x, +y, +z, centred on the volume). Check the "
            "orientation of the outputs",
            GeometryWarning,
            stacklevel=3,
        )
    elif qcode > 0 and scode > 0:
        qform, sform = header.get_qform(), header.get_sform()
        # the sform as a qform can hold it (float32 quaternion: rotations near 180 degrees keep only
        # ~1e-3 per mm): a writer that set qform = sform differs from the sform by that much, not more
        encoded = header.copy()
        encoded.set_qform(sform, code=int(qcode))
        tolerance = _AFFINE_TOLERANCE_MM + np.abs(encoded.get_qform() - sform).max()
        if np.abs(qform - sform).max() > tolerance:
            warnings.warn(
                f"{str(path)!r} has a qform (code {qcode}) and an sform (code {scode}) that differ by up "
                f"to {np.abs(qform - sform).max():.3g} (mm): using the sform, as nibabel does. qform="
                f"{np.round(qform[:3], 4).tolist()}, sform={np.round(sform[:3], 4).tolist()}",
                GeometryWarning,
                stacklevel=3,
            )
    return nii, affine


def _set_geometry(image: sitk.Image, affine: np.ndarray) -> None:
    """Give a 3D image the (orthonormal) NIfTI affine's spacing, origin and direction, in LPS."""
    lps = _lps(affine)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing == 0):
        return
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())


def _index_transform(affine: np.ndarray) -> sitk.AffineTransform:
    """The voxel index -> LPS world map of a NIfTI affine, as an ITK transform."""
    lps = _lps(affine)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(lps[:3, :3].flatten().tolist())
    transform.SetTranslation(lps[:3, 3].tolist())
    return transform


def _interpolator(image: sitk.Image, labels: bool = False) -> int:
    integer = not np.issubdtype(sitk.GetArrayViewFromImage(image).dtype, np.floating)
    return sitk.sitkNearestNeighbor if labels or integer else sitk.sitkLinear


def _read_sheared_nifti(path: Path, nii: nib.Nifti1Image, affine: np.ndarray) -> sitk.Image:
    """Read a NIfTI with a sheared affine onto the closest orthonormal grid covering it (warns).

    The grid's direction is the rotation closest to the affine's normalised axes (polar decomposition),
    its spacing the affine's axis lengths, and it covers every input voxel centre. Values are resampled
    linearly (nearest neighbour for integer voxels); outside the input they are 0.
    """
    try:
        data = np.asanyarray(nii.dataobj)
    except Exception as error:
        raise RuntimeError(f"damaged or truncated NIfTI file: {' '.join(str(error).split())}") from error
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise RuntimeError(f"a sheared {data.ndim}D NIfTI image; expected 3D")
    if data.dtype.byteorder not in ("=", "|"):
        data = data.astype(data.dtype.newbyteorder("="))
    moving = sitk.GetImageFromArray(np.ascontiguousarray(data.T))  # index space: physical = index
    lps = _lps(affine)
    columns, offset = lps[:3, :3], lps[:3, 3]
    spacing = np.linalg.norm(columns, axis=0)
    u, _, vt = np.linalg.svd(columns / spacing)
    rotation = u @ vt
    corners = np.array(list(itertools.product(*[(0, s - 1) for s in data.shape])), dtype=float)
    local = (corners @ columns.T) @ rotation  # corner offsets from the origin, in the new axes
    low, high = local.min(axis=0), local.max(axis=0)
    size = [int(n) for n in np.ceil((high - low) / spacing - 1e-6).astype(int) + 1]
    origin = offset + rotation @ low
    inverse = sitk.AffineTransform(3)
    inverse.SetMatrix(np.linalg.inv(columns).flatten().tolist())
    inverse.SetTranslation((-np.linalg.inv(columns) @ offset).tolist())
    image = sitk.Resample(
        moving,
        size,
        inverse,
        _interpolator(moving),
        origin.tolist(),
        spacing.tolist(),
        rotation.flatten().tolist(),
        0.0,
    )
    warnings.warn(
        f"{str(path)!r} has a sheared (non-orthonormal) affine, which ITK cannot carry: resampled onto "
        f"the closest orthonormal grid covering it ({tuple(data.shape)} -> {tuple(size)} voxels). NIfTI "
        "outputs written with this input as reference are resampled back onto its own grid",
        GeometryWarning,
        stacklevel=3,
    )
    return image


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read an input image: a NIfTI, NRRD, MetaImage or single DICOM file, or a DICOM series folder.

    Args:
        path: an image file, or a folder holding a DICOM series. A folder with several series is read
            as its largest series, with a warning.

    Returns:
        The image with its geometry (LPS world), as SimpleITK reads it (2D or 3D, any pixel type),
        except that a 3D NIfTI's geometry is nibabel's ``img.affine`` (warning if it has no qform/sform
        code or if they differ; a sheared affine is resampled onto the closest orthonormal grid, with a
        warning; see the module docstring).

    Warns:
        GeometryWarning: a NIfTI's orientation is unknown (no qform/sform code), its qform and sform
            differ, or its affine is sheared.
        UserWarning: a DICOM folder holds several series.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read (unknown format or corrupt), is not 2D or 3D, has no voxels,
            holds NaN or Inf values, or is a DICOM series with missing or unevenly spaced slices.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input image {str(path)!r} does not exist")
    nifti = _nifti_affine(path) if _suffix(path, _NIFTI_SUFFIXES) and path.is_file() else None
    try:
        if nifti is not None and _is_sheared(nifti[1]):
            image = _read_sheared_nifti(path, nifti[0], nifti[1])
        else:
            image = _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(
            f"cannot read {str(path)!r} as an image (NIfTI .nii/.nii.gz, NRRD .nrrd/.nhdr, MetaImage "
            f".mha/.mhd, DICOM file or series folder): {_itk_reason(error)}"
        ) from error
    image = _squeeze_trailing(image)
    if nifti is not None and image.GetDimension() == 3 and not _is_sheared(nifti[1]):
        _set_geometry(image, nifti[1])  # nibabel's rules, not ITK's guesses
    if image.GetDimension() not in (2, 3):
        raise ValueError(f"{str(path)!r} is a {image.GetDimension()}D image; expected 2D or 3D")
    if image.GetNumberOfPixels() == 0 or min(image.GetSize()) == 0:
        raise ValueError(f"{str(path)!r} is an empty image (size {image.GetSize()})")
    if _suffix(path, _NIFTI_SUFFIXES) and path.is_file():
        # ITK's NIfTI reader zero-fills truncated files and turns NaN and Inf into 0 without a word:
        # read the stored values with nibabel too (outputs copy the input's affine with it anyway), in
        # slabs along the last axis (contiguous in the file), so a large volume is never held twice.
        bad = _nifti_non_finite(path)
    else:
        array = sitk.GetArrayViewFromImage(image)
        bad = _non_finite_count(array)
    if bad:
        raise ValueError(f"{str(path)!r} holds {bad} NaN or Inf values; fix or mask them before scoring")
    return image


_SLAB_BYTES = 32 * 2**20


def _non_finite_count(array: np.ndarray) -> int:
    """NaN and Inf values of ``array``, counted in slabs of the first axis (no full-size mask)."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    flat = array.reshape(len(array), -1) if array.ndim > 1 else array.reshape(1, -1)
    step = max(1, _SLAB_BYTES // max(1, flat[0].nbytes))
    return int(
        sum(
            np.size(flat[k : k + step]) - np.isfinite(flat[k : k + step]).sum()
            for k in range(0, len(flat), step)
        )
    )


def _nifti_non_finite(path: Path) -> int:
    """NaN and Inf values stored in a NIfTI file, read with nibabel in slabs along the last axis.

    Raises:
        ValueError: the file is damaged or truncated (nibabel cannot read its data).
    """
    try:
        proxy = nib.load(str(path), keep_file_open=True).dataobj
        shape = tuple(proxy.shape)
        if len(shape) < 3:
            return _non_finite_count(np.asanyarray(proxy))
        plane = int(np.prod(shape[:-1])) * np.dtype(proxy.dtype).itemsize
        step = max(1, _SLAB_BYTES // max(1, plane))
        bad = 0
        for k in range(0, shape[-1], step):
            slab = np.asanyarray(proxy[..., k : k + step])
            if np.issubdtype(slab.dtype, np.floating):
                bad += int(np.size(slab) - np.isfinite(slab).sum())
        return bad
    except Exception as error:
        reason = " ".join(str(error).split())
        raise ValueError(f"{str(path)!r} is a damaged or truncated NIfTI file: {reason}") from error


def find_inputs(path: str | os.PathLike) -> list[Path]:
    """List the inputs to process: a file, or a folder's image files and DICOM series folders.

    A folder yields its image files (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``),
    itself if it holds a DICOM series, and its direct subfolders that hold one (one level deep). Hidden
    (dot) files and folders are skipped.

    Args:
        path: an image file, a DICOM series folder, or a folder of those.

    Returns:
        The inputs, sorted by name.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the folder holds no input, or two inputs share an output stem (their outputs would
            overwrite each other, e.g. ``a.nii`` and ``a.nrrd``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {str(path)!r} does not exist")
    if path.is_file():
        return [path]
    inputs = [path] if _is_dicom_folder(path) else []
    for entry in sorted(path.iterdir()):
        if _is_hidden(entry):
            continue
        if entry.is_file() and _suffix(entry, IMAGE_SUFFIXES):
            inputs.append(entry)
        elif entry.is_dir() and _is_dicom_folder(entry):
            inputs.append(entry)
    if not inputs:
        raise ValueError(
            f"no images in {str(path)!r}: expected files ending in {', '.join(IMAGE_SUFFIXES)} or DICOM "
            "series folders (the folder itself or its direct subfolders)"
        )
    stems: dict[str, list[Path]] = {}
    for entry in inputs:
        stems.setdefault(output_stem(entry), []).append(entry)
    clashes = {stem: [p.name for p in paths] for stem, paths in stems.items() if len(paths) > 1}
    if clashes:
        raise ValueError(f"inputs in {str(path)!r} share output names, rename or move them: {clashes}")
    return sorted(inputs, key=lambda p: (p != path, p.name))


def output_stem(path: str | os.PathLike) -> str:
    """The name outputs derive from: the file name without its image suffix, or a folder's name.

    Args:
        path: an input file or DICOM series folder.

    Returns:
        ``"sub-01_T1w"`` for ``sub-01_T1w.nii.gz``; ``"series7"`` for a folder ``series7/``. Unknown
        suffixes are kept (``scan.v2`` stays ``scan.v2``) since they may be part of the name.
    """
    path = Path(path)
    if path.is_dir():
        return path.resolve().name  # resolve: Path(".").name is ""
    suffix = _suffix(path, IMAGE_SUFFIXES + DICOM_SUFFIXES)
    return path.name[: -len(suffix)] if suffix else path.name


# ----------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------


def _geometry_3d(image: sitk.Image | sitk.ImageFileReader) -> tuple[np.ndarray, ...]:
    """Size, spacing, origin, direction of an image (or a reader's header) embedded in 3D.

    A 2D image becomes a one-slice volume with unit slice spacing at z = 0, as ITK writes it.
    """
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D image, got {dim}D")
    size, spacing, origin = np.ones(3, dtype=int), np.ones(3), np.zeros(3)
    direction = np.eye(3)
    size[:dim] = image.GetSize()
    spacing[:dim] = image.GetSpacing()
    origin[:dim] = image.GetOrigin()
    direction[:dim, :dim] = np.array(image.GetDirection()).reshape(dim, dim)
    return size, spacing, origin, direction


def _placement_error(image: sitk.Image, path: Path) -> float:
    """How far (mm, worst grid corner) ITK places the file ``path`` from ``image``'s grid."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # the header only
    ours, theirs = _geometry_3d(image), _geometry_3d(reader)
    if not np.array_equal(ours[0], theirs[0]):
        return float("inf")
    corners = np.array(list(itertools.product(*[(0, s - 1) for s in ours[0]])), dtype=float)
    placed = [corners * spacing @ direction.T + origin for _, spacing, origin, direction in (ours, theirs)]
    return float(np.abs(placed[0] - placed[1]).max())


def affine_from_image(image: sitk.Image) -> np.ndarray:
    """The NIfTI (RAS) voxel-to-world affine of a SimpleITK image (LPS).

    A 2D image is embedded as a one-slice volume (unit slice spacing, origin at z = 0), as ITK writes it.

    Args:
        image: a 2D or 3D image.

    Returns:
        A 4x4 float64 affine mapping voxel indices ``(i, j, k)`` to RAS millimetres.
    """
    _, spacing, origin, direction = _geometry_3d(image)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing  # column j = direction of axis j times its spacing
    affine[:3, 3] = origin
    affine[:2] *= -1  # LPS -> RAS: negate x and y of every column and of the origin
    return affine


def same_geometry(a: sitk.Image, b: sitk.Image, atol: float = 1e-5) -> bool:
    """Whether two images share a grid: dimension, size, spacing, origin and direction.

    Args:
        a: an image.
        b: another image.
        atol: absolute tolerance on spacing and origin (mm) and direction cosines.

    Returns:
        ``True`` if the grids agree within ``atol``.
    """
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    return all(
        np.allclose(getter(a), getter(b), rtol=0.0, atol=atol)
        for getter in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection)
    )


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


# ----------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------


def _check_not_input(path: Path, reference_path: str | os.PathLike | None) -> None:
    if reference_path is None:
        return
    reference = Path(reference_path)
    same = path.resolve() == reference.resolve()
    if not same and path.exists() and reference.exists():
        same = os.path.samefile(path, reference)  # hard links and other aliases of the same file
    if same:
        raise ValueError(
            f"refusing to write {str(path)!r}: it is the input {str(reference)!r}, which is never "
            "overwritten (not even with --overwrite); choose another output name or folder"
        )


def _output_array(image: sitk.Image, kind: str) -> np.ndarray:
    """The voxels as written: float32 maps; uint8 (or int16 if needed) labels; ``(z, y, x)`` order."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    if image.GetNumberOfPixels() == 0:
        raise ValueError(f"cannot write an empty image (size {image.GetSize()})")
    # a view, not a copy: a full-size map is not held twice while it is written (the image outlives
    # the writer that uses the array)
    array = sitk.GetArrayViewFromImage(image)
    if _non_finite_count(array):
        raise ValueError(f"cannot write a {kind} with NaN or Inf values")
    if kind == "map":
        return array.astype(np.float32, copy=False)
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise ValueError("a label image must hold whole numbers; got fractional values")
    low, high = array.min(), array.max()
    for dtype in (np.uint8, np.int16):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return array.astype(dtype)
    raise ValueError(f"labels must lie in [-32768, 32767] to be written as int16, got [{low}, {high}]")


def _clean_description(description: str | None) -> str:
    if description is None:
        return ""
    # One line of ASCII: NIfTI's descrip and NRRD's content field are single-line text.
    return " ".join(str(description).split()).encode("ascii", "replace").decode("ascii")


def _nifti_image(data: np.ndarray, affine: np.ndarray, kind: str, description: str, units) -> nib.Nifti1Image:
    out = nib.Nifti1Image(data, affine)
    header = out.header
    out.set_qform(affine, code=1)  # qform = sform, both "scanner": every reader finds the same grid
    out.set_sform(affine, code=1)
    header.set_data_dtype(data.dtype)
    header.set_xyzt_units(*units)
    if kind == "map":
        header.set_intent("estimate")
        header["cal_min"], header["cal_max"] = float(data.min()), float(data.max())
    else:
        header.set_intent("label")
        header["cal_min"], header["cal_max"] = float(min(0, data.min())), float(data.max())
    header["descrip"] = description.encode("ascii")[:_DESCRIP_BYTES]
    return out


def _nifti_writer(
    array: np.ndarray, image: sitk.Image, kind: str, reference: Path | None, description: str
) -> Callable[[Path], None]:
    data = array.T  # SimpleITK arrays are (z, y, x); NIfTI data is (x, y, z)
    own = affine_from_image(image)
    verbatim, units, sheared = None, ("mm", "sec"), False
    if reference is not None and _suffix(reference, _NIFTI_SUFFIXES) and reference.is_file():
        input_nifti = nib.load(str(reference))
        verbatim = np.array(input_nifti.affine, dtype=np.float64)
        if _is_sheared(verbatim) and image.GetDimension() == 3 and len(_squeezed(input_nifti.shape)) == 3:
            # The input was read onto an orthonormal grid: bring the output back onto its sheared one.
            target = sitk.Image([int(n) for n in _squeezed(input_nifti.shape)], image.GetPixelID())
            back = sitk.Resample(
                image, target, _index_transform(verbatim), _interpolator(image, kind == "label"), 0.0
            )
            data, sheared = np.array(_output_array(back, kind)).T, True  # a copy: `back` is local
        elif _squeezed(input_nifti.shape) != _squeezed(data.shape):
            raise ValueError(
                f"the output's grid {_squeezed(data.shape)} (x, y, z) does not match the input "
                f"{str(reference)!r} {_squeezed(input_nifti.shape)}; bring it onto the input's grid "
                "first (monai_ood.preprocessing.resample_to_reference)"
            )
        data = data.reshape(input_nifti.shape)  # the input's layout: (x, y) stays 2D, (x, y, 1) 3D
        spatial, temporal = input_nifti.header.get_xyzt_units()
        units = (spatial if spatial != "unknown" else "mm", temporal if temporal != "unknown" else "sec")

    def write(temporary: Path) -> None:
        if verbatim is not None:
            nib.save(_nifti_image(data, verbatim, kind, description, units), str(temporary))
            if sheared:
                return  # resampled onto the input's own (sheared) grid, which ITK cannot read back
            # The input's affine is only right if ITK (so 3D Slicer) reads it back on the grid the
            # output was computed on. It does not when the input had no qform/sform codes, or a sheared
            # sform ITK replaced by its qform: then the image's own geometry is where Slicer shows
            # the input.
            error = _placement_error(image, temporary)
            if error <= _PLACEMENT_TOLERANCE_MM:
                return
            warnings.warn(
                f"ITK reads the affine of {str(reference)!r} {error:.3g} mm away from the grid the "
                "output was computed on (no or inconsistent qform/sform?); writing the image's own "
                "geometry, which is where 3D Slicer shows the input",
                stacklevel=4,
            )
        nib.save(_nifti_image(data, own, kind, description, ("mm", "sec")), str(temporary))

    return write


def write_image(
    image: sitk.Image,
    path: str | os.PathLike,
    reference_path: str | os.PathLike | None = None,
    kind: str = "map",
    overwrite: bool = False,
    description: str | None = None,
) -> Path:
    """Write an output (a score map or a segmentation) atomically as NIfTI or NRRD.

    Args:
        image: a 2D or 3D scalar image, normally on the input's grid
            (:func:`monai_ood.preprocessing.resample_to_reference`).
        path: the output file, ending in ``.nii.gz``, ``.nii`` or ``.nrrd``; without a suffix,
            ``.nii.gz`` is appended.
        reference_path: the input the output was computed from. It is never written onto. If it is a
            NIfTI file its affine is copied verbatim into a NIfTI output (bit-equal geometry) after
            checking the grid shapes match (an input with a sheared affine, read onto an orthonormal
            grid, gets the output resampled back onto its own grid: linear for maps, nearest for
            labels; NRRD outputs stay on the orthonormal grid), unless ITK places the input elsewhere than that affine
            (then, with a warning, the image's own geometry is written, which is where Slicer shows
            the input).
        kind: ``"map"`` (float32, NIfTI intent ``estimate``, ``cal_min/cal_max`` = data range) or
            ``"label"`` (uint8, or int16 if the labels need it; NIfTI intent ``label``,
            ``cal_min`` = 0, ``cal_max`` = the largest label).
        overwrite: replace an existing output.
        description: a one-line note stored in NIfTI ``descrip`` (ASCII, cut to 79 bytes) or NRRD
            ``content``.

    Returns:
        The written path.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        ValueError: ``path`` is the input (``reference_path``), has an unsupported suffix, ``kind`` is
            unknown, the image has NaN/Inf values or several components, labels are fractional or out
            of the int16 range, or the grid does not match a NIfTI input's.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'map' or 'label', got {kind!r}")
    path = Path(path)
    suffix = _suffix(path, OUTPUT_SUFFIXES)
    if suffix is None:
        if path.suffix:
            raise ValueError(f"output must end in .nii.gz, .nii or .nrrd, got {str(path)!r}")
        path, suffix = path.with_name(path.name + ".nii.gz"), ".nii.gz"
    _check_not_input(path, reference_path)
    if path.exists() and not overwrite:  # fail before the (possibly slow) conversion
        raise FileExistsError(f"output {str(path)!r} already exists; pass --overwrite to replace it")
    if image.GetDimension() not in (2, 3):
        raise ValueError(f"expected a 2D or 3D image, got {image.GetDimension()}D")
    array = _output_array(image, kind)
    description = _clean_description(description)
    reference = Path(reference_path) if reference_path is not None else None

    if suffix in _NIFTI_SUFFIXES:
        write = _nifti_writer(array, image, kind, reference, description)
    else:
        out = sitk.GetImageFromArray(array)  # a fresh image: no metadata inherited from the input
        out.CopyInformation(image)
        if description:
            out.SetMetaData("NRRD_content", description)

        def write(temporary: Path) -> None:
            sitk.WriteImage(out, str(temporary), useCompression=True)

    return atomic_write(path, write, overwrite=overwrite)
