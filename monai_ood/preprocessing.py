"""One preprocessing path for training data and for scoring: anatomical slicing grids and intensities.

A 2D model sees slices cut perpendicular to an anatomical axis, in a fixed display convention, so a
volume in any orientation and spacing gives the same kind of slice:

| axis       | slices along | rows (top -> bottom)     | columns (left -> right)      |
|------------|--------------|--------------------------|------------------------------|
| ``axial``    | I -> S       | anterior -> posterior    | patient right -> left (radiological) |
| ``coronal``  | A -> P       | superior -> inferior     | patient right -> left        |
| ``sagittal`` | R -> L       | superior -> inferior     | anterior -> posterior        |

so in axial slices anterior is up (the pilot's pitfall: with A-P lying horizontally, a "vertical flip"
became a near no-op left-right flip). The grid is built in ITK's LPS world (SimpleITK), centred on the
input's field of view, with the requested in-plane spacing and a fixed in-plane size (centre crop/pad
in one resampling step: a single interpolation, never two). Outputs computed on the grid go back to the
input's own grid with :func:`resample_to_reference`.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.utils import look_up_option

__all__ = [
    "SLICE_AXES",
    "SlicePreprocessing",
    "VolumePreprocessing",
    "as_volume",
    "normalize_intensity",
    "resample_to_reference",
    "display_direction",
    "slice_positions",
    "slicing_grid",
    "volume_grid",
    "preprocessing_from_dict",
    "to_grid",
    "volume_to_slices",
    "array_on_grid",
]

SLICE_AXES = ("axial", "coronal", "sagittal")

# Columns are the grid's x (columns), y (rows), z (slices) unit vectors in LPS world coordinates.
_DIRECTIONS = {
    "axial": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float),  # x=+L, y=+P, z=+S
    "coronal": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float),  # x=+L, y=-S, z=+P
    "sagittal": np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float),  # x=+P, y=-S, z=+L
}


@dataclass
class SlicePreprocessing:
    """How a 2D model's inputs are made; stored with every checkpoint and applied by ``score``.

    Args:
        axis: anatomical slicing axis (``axial``, ``coronal``, ``sagittal``).
        spacing: in-plane spacing in mm, ``(row, column)``.
        size: slice size in pixels, ``(rows, columns)``; must suit the network (e.g. divisible by 16).
        percentiles: robust intensity window per slice, mapped to [0, 1] and clipped.
        slice_spacing: through-plane spacing in mm; ``None`` keeps the input's own.
    """

    axis: str = "axial"
    spacing: tuple[float, float] = (2.0, 2.0)
    size: tuple[int, int] = (112, 96)
    percentiles: tuple[float, float] = (1.0, 99.0)
    slice_spacing: float | None = None
    spatial_dims: int = field(default=2, init=False)

    def __post_init__(self) -> None:
        self.axis = look_up_option(self.axis, SLICE_AXES)
        self.spacing = tuple(float(s) for s in self.spacing)
        self.size = tuple(int(s) for s in self.size)
        self.percentiles = tuple(float(p) for p in self.percentiles)
        if len(self.spacing) != 2 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be two positive numbers (mm), got {self.spacing!r}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be two positive ints, got {self.size!r}")
        _check_percentiles(self.percentiles)
        if self.slice_spacing is not None and self.slice_spacing <= 0:
            raise ValueError(f"slice_spacing must be positive or None, got {self.slice_spacing!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlicePreprocessing:
        d = {k: v for k, v in d.items() if k != "spatial_dims"}
        return cls(**d)


@dataclass
class VolumePreprocessing:
    """How a 3D model's inputs are made: an LPS-aligned grid at ``spacing`` (x, y, z mm) over the whole
    field of view, intensities windowed per volume at ``percentiles``; inference by sliding windows of
    ``roi_size`` voxels (array order z, y, x)."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    percentiles: tuple[float, float] = (1.0, 99.0)
    roi_size: tuple[int, int, int] = (96, 96, 96)
    spatial_dims: int = field(default=3, init=False)

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.percentiles = tuple(float(p) for p in self.percentiles)
        self.roi_size = tuple(int(s) for s in self.roi_size)
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be three positive ints, got {self.roi_size!r}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers (mm), got {self.spacing!r}")
        _check_percentiles(self.percentiles)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VolumePreprocessing:
        return cls(**{k: v for k, v in d.items() if k != "spatial_dims"})


def preprocessing_from_dict(d: dict[str, Any]) -> SlicePreprocessing | VolumePreprocessing:
    """Rebuild the preprocessing stored in a checkpoint."""
    return (VolumePreprocessing if d.get("spatial_dims") == 3 else SlicePreprocessing).from_dict(d)


def _check_percentiles(percentiles: tuple[float, ...]) -> None:
    if len(percentiles) != 2 or not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise ValueError(f"percentiles must be (low, high) with 0 <= low < high <= 100, got {percentiles!r}")


def as_volume(image: sitk.Image) -> sitk.Image:
    """A scalar 3D image: 2D images become one-slice volumes, vector (e.g. RGB) pixels are averaged."""
    if image.GetNumberOfComponentsPerPixel() > 1:
        channels = [
            sitk.VectorIndexSelectionCast(image, i, sitk.sitkFloat32)
            for i in range(image.GetNumberOfComponentsPerPixel())
        ]
        grey = channels[0]
        for channel in channels[1:]:
            grey = grey + channel
        image = grey / float(len(channels))
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 2D or 3D image, got {image.GetDimension()}D")
    return image


def _corners(image: sitk.Image) -> np.ndarray:
    size = np.array(image.GetSize()) - 1
    return np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
            for corner in itertools.product(*[(0, s) for s in size])
        ]
    )


def _native_spacing_along(image: sitk.Image, unit: np.ndarray) -> float:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    best = int(np.argmax(np.abs(direction.T @ unit)))
    return float(image.GetSpacing()[best])


def _grid(
    image: sitk.Image, direction: np.ndarray, spacing: np.ndarray, size: np.ndarray | None
) -> sitk.Image:
    corners = _corners(image) @ direction  # corner coordinates along the grid axes
    low, high = corners.min(0), corners.max(0)
    if size is None:
        size = np.floor((high - low) / spacing + 1e-6).astype(int) + 1
    centre = (low + high) / 2
    origin_in_grid_axes = centre - (size - 1) / 2 * spacing
    reference = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    reference.SetSpacing([float(s) for s in spacing])
    reference.SetDirection([float(v) for v in direction.flatten()])
    reference.SetOrigin([float(v) for v in direction @ origin_in_grid_axes])
    return reference


def display_direction(axis: str) -> np.ndarray:
    """The 3x3 LPS direction (columns: grid x = columns, y = rows, z = slices) of an axis's display frame."""
    return _DIRECTIONS[look_up_option(axis, SLICE_AXES)].copy()


def slice_positions(grid: sitk.Image) -> np.ndarray:
    """World position (mm) of each slice of a slicing grid along its slicing direction, ``(S,)``.

    The LPS coordinate of each slice projected on the grid's slice direction: for axial slices, the
    superior (MNI z) coordinate, increasing with the slice index.
    """
    normal = np.array(grid.GetDirection()).reshape(3, 3)[:, 2]
    return float(np.array(grid.GetOrigin()) @ normal) + np.arange(grid.GetSize()[2]) * grid.GetSpacing()[2]


def slicing_grid(image: sitk.Image, preprocessing: SlicePreprocessing) -> sitk.Image:
    """An empty reference image whose array (slice, row, column) holds display-convention slices."""
    image = as_volume(image)
    direction = _DIRECTIONS[preprocessing.axis]
    rows, cols = preprocessing.size
    slice_spacing = preprocessing.slice_spacing or _native_spacing_along(image, direction[:, 2])
    spacing = np.array([preprocessing.spacing[1], preprocessing.spacing[0], slice_spacing])
    extent = _corners(image) @ direction[:, 2]
    num_slices = int(np.floor((extent.max() - extent.min()) / slice_spacing + 1e-6)) + 1
    return _grid(image, direction, spacing, np.array([cols, rows, num_slices]))


def volume_grid(image: sitk.Image, preprocessing: VolumePreprocessing) -> sitk.Image:
    """An LPS-aligned reference grid at the target spacing covering the image's field of view."""
    return _grid(as_volume(image), np.eye(3), np.array(preprocessing.spacing), None)


def to_grid(
    image: sitk.Image, reference: sitk.Image, interpolator=sitk.sitkLinear, default: float = 0.0
) -> sitk.Image:
    """Resample ``image`` onto ``reference`` once (linear for intensities, nearest for labels)."""
    pixel = sitk.sitkFloat32 if interpolator != sitk.sitkNearestNeighbor else image.GetPixelID()
    volume = as_volume(image)
    if interpolator != sitk.sitkNearestNeighbor:  # labels: nearest-neighbour ties break by storage anyway
        volume = _boundary_symmetric(volume, reference)
    return sitk.Resample(volume, reference, sitk.Transform(), interpolator, default, pixel)


def _boundary_symmetric(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """``image`` re-stored (same physical voxels) so that a sample of ``reference`` lying exactly on its
    extent's boundary is treated alike whatever the voxel storage order.

    ITK counts a point inside an image when its continuous index lies in ``[-0.5, size - 0.5)``: the low
    end is in, the high end out. A sample exactly on the edge of the field of view (common when both
    grids are axis-aligned with round spacings) is then inside for one storage order and outside for the
    flipped one, and the slices differ. Only an image axis antiparallel to a ``reference`` axis with a
    sample on its boundary is flipped (a copy of the voxels, in that case only), so that the sense is the
    reference's for every storage order; any other image is returned as it is.
    """
    direction = np.array(image.GetDirection()).reshape(3, 3)
    axes = np.array(reference.GetDirection()).reshape(3, 3).T @ direction  # image axes in reference axes
    origin, spacing, size = np.array(image.GetOrigin()), np.array(image.GetSpacing()), image.GetSize()
    ref_origin, ref_spacing = np.array(reference.GetOrigin()), np.array(reference.GetSpacing())
    ref_to_index = np.array(reference.GetDirection()).reshape(3, 3).T
    flips = []
    for j in range(3):
        i = int(np.argmax(np.abs(axes[:, j])))
        if axes[i, j] > -1 + 1e-9:  # not antiparallel to a reference axis
            continue
        for edge in (-0.5, size[j] - 0.5):
            point = origin + direction[:, j] * edge * spacing[j]
            index = (ref_to_index @ (point - ref_origin))[i] / ref_spacing[i]
            if abs(index - round(index)) < 1e-6 and 0 <= round(index) < reference.GetSize()[i]:
                flips.append(j)
                break
    if not flips:
        return image
    array = sitk.GetArrayFromImage(image)  # (z, y, x): image axis j is array axis 2 - j
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(np.flip(array, axis=[2 - j for j in flips])))
    new_direction, new_origin = direction.copy(), origin.copy()
    for j in flips:
        new_origin = new_origin + direction[:, j] * (size[j] - 1) * spacing[j]
        new_direction[:, j] = -direction[:, j]
    flipped.SetSpacing(tuple(spacing))
    flipped.SetOrigin(tuple(new_origin))
    flipped.SetDirection(tuple(new_direction.flatten()))
    return flipped


def normalize_intensity(
    array: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0), per_slice: bool = True
) -> np.ndarray:
    """Window intensities to [0, 1] at robust percentiles, per slice (axis 0) or for the whole array.

    A constant slice (e.g. outside the field of view) becomes all zeros rather than NaN.
    """
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError("image contains NaN or Inf values")
    reduce_axes = tuple(range(1, array.ndim)) if per_slice else None
    low = np.percentile(array, percentiles[0], axis=reduce_axes, keepdims=True)
    high = np.percentile(array, percentiles[1], axis=reduce_axes, keepdims=True)
    width = high - low
    safe = np.where(width > 0, width, 1.0)
    return np.where(width > 0, np.clip((array - low) / safe, 0.0, 1.0), 0.0).astype(np.float32)


def volume_to_slices(image: sitk.Image, preprocessing: SlicePreprocessing, label: sitk.Image | None = None):
    """Cut a volume (any orientation/spacing) into normalised display-convention slices.

    Returns:
        ``(slices, labels, grid)``: ``(S, 1, rows, cols)`` float32 in [0, 1], ``(S, 1, rows, cols)``
        int64 labels resampled by nearest neighbour (or ``None``), and the reference grid (to map
        outputs back with :func:`array_on_grid` and :func:`resample_to_reference`).
    """
    grid = slicing_grid(image, preprocessing)
    array = sitk.GetArrayFromImage(to_grid(image, grid))  # (S, rows, cols)
    slices = normalize_intensity(array, preprocessing.percentiles)[:, None]
    labels = None
    if label is not None:
        labels = sitk.GetArrayFromImage(to_grid(label, grid, sitk.sitkNearestNeighbor)).astype(np.int64)[
            :, None
        ]
    return slices, labels, grid


def array_on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """Wrap an array ``(S, rows, cols)`` (or ``(z, y, x)``) computed on ``grid`` as an image with its geometry."""
    if tuple(array.shape[::-1]) != tuple(grid.GetSize()):
        raise ValueError(f"array shape {array.shape} does not match the grid size {grid.GetSize()[::-1]}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.CopyInformation(grid)
    return image


def resample_to_reference(
    image: sitk.Image, reference: sitk.Image, interpolator=sitk.sitkLinear, default: float = 0.0
) -> sitk.Image:
    """Bring an output back onto the input's own grid (same size, spacing, origin, direction).

    ``reference`` may be 2D: the one-slice result is then returned as a 2D image with its geometry.
    """
    target = (
        as_volume(reference)
        if reference.GetNumberOfComponentsPerPixel() > 1 or reference.GetDimension() == 2
        else reference
    )
    out = sitk.Resample(image, target, sitk.Transform(), interpolator, default, image.GetPixelID())
    if reference.GetDimension() == 2:
        out = out[:, :, 0]
        out.SetOrigin(reference.GetOrigin())
        out.SetDirection(reference.GetDirection())
        out.SetSpacing(reference.GetSpacing())
    return out
