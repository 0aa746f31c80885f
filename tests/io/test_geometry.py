"""Geometry is never invented (issue 14): uneven DICOM series, NIfTI qform/sform rules, sheared affines."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from monai_ood.io import GeometryWarning, read_image, write_image

UID = "1.2.826.0.1.3680043.2.1125.77"


def _write_series(folder: Path, positions_z: list[float], spacing: float = 1.0) -> None:
    """One int16 DICOM file per slice at the given z positions (axial, identity orientation)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, z in enumerate(positions_z):
        plane = sitk.GetImageFromArray(np.full((4, 5), k + 1, np.int16))
        plane.SetSpacing((0.5, 0.5))
        tags = {
            "0008|0060": "MR",
            "0008|0018": f"{UID}.{k + 1}",
            "0020|000d": f"{UID}.0",
            "0020|000e": UID,
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0032": f"-3\\2\\{z:.6f}",
            "0020|0013": str(k + 1),
            "0028|0030": "0.5\\0.5",
            "0018|0050": f"{spacing:.6f}",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(plane)


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path: Path):
    folder = tmp_path / "gap"
    _write_series(folder, [z for z in range(10) if z != 4])
    with pytest.raises(
        ValueError, match=r"gap.*not evenly sliced.*expected spacing 1 mm.*3 -> 5 mm \(2 mm\)"
    ):
        read_image(folder)


def _strip_positions(folder: Path, names=None) -> None:
    import pydicom

    for path in sorted(folder.iterdir()):
        if names is None or path.name in names:
            ds = pydicom.dcmread(path)
            del ds.ImagePositionPatient, ds.ImageOrientationPatient
            ds.save_as(path)


def test_dicom_series_without_any_slice_position_is_refused_not_stacked_at_a_made_up_origin(tmp_path: Path):
    folder = tmp_path / "nopos"
    _write_series(folder, [0, 1, 2, 3, 4])
    _strip_positions(folder)
    with pytest.raises(ValueError, match=r"none of its 5 slices carries a position.*separate 2D files"):
        read_image(folder)
    two = tmp_path / "two"
    _write_series(two, [0, 1])
    _strip_positions(two, {"IM0001.dcm"})
    with pytest.raises(ValueError, match=r"1 slice\(s\) without a readable position.*IM0001.dcm"):
        read_image(two)


def test_even_dicom_series_reads_with_its_spacing(tmp_path: Path):
    folder = tmp_path / "even"
    _write_series(folder, [1.5 * z for z in range(6)], spacing=1.5)
    image = read_image(folder)
    assert image.GetSize() == (5, 4, 6)
    np.testing.assert_allclose(image.GetSpacing(), (0.5, 0.5, 1.5), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), (-3, 2, 0), atol=1e-6)


def _lps_geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return spacing, lps[:3, 3], lps[:3, :3] / spacing


def _assert_geometry(image: sitk.Image, affine: np.ndarray) -> None:
    spacing, origin, direction = _lps_geometry(affine)
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), direction, atol=1e-5)


def test_nifti_without_qform_or_sform_warns_and_follows_nibabel(tmp_path: Path):
    nii = nib.Nifti1Image(np.ones((4, 5, 3), np.float32), np.diag([0.7, 1.1, 3.0, 1.0]))
    nii.set_qform(None, code=0)
    nii.set_sform(None, code=0)
    path = tmp_path / "nocode.nii.gz"
    nib.save(nii, str(path))
    with pytest.warns(GeometryWarning, match=r"nocode\.nii\.gz.*orientation is unknown"):
        image = read_image(path)
    _assert_geometry(image, nib.load(str(path)).affine)


def _rotation(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def test_nifti_with_qform_unlike_sform_warns_and_uses_the_sform(tmp_path: Path):
    qform, sform = np.eye(4), np.eye(4)
    qform[:3, :3], qform[:3, 3] = np.diag([1.0, 1.0, 2.0]), (1, 2, 3)
    sform[:3, :3], sform[:3, 3] = _rotation(30) @ np.diag([1.0, 1.0, 2.0]), (-10, 5, 7)
    nii = nib.Nifti1Image(np.arange(60, dtype=np.float32).reshape(4, 5, 3), sform)
    nii.set_qform(qform, code=1)
    nii.set_sform(sform, code=2)
    path = tmp_path / "both.nii.gz"
    nib.save(nii, str(path))
    with pytest.warns(GeometryWarning, match=r"both\.nii\.gz.*qform.*sform.*using the sform"):
        image = read_image(path)
    _assert_geometry(image, nib.load(str(path)).affine)
    np.testing.assert_allclose(nib.load(str(path)).affine, sform, atol=1e-5)


def test_sheared_sform_only_nifti_is_read_and_written_back_on_its_grid(tmp_path: Path):
    sform = np.eye(4)
    sform[:3, :3] = [[1.0, 0.2, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]  # x-y shear (FSL/dipy style)
    sform[:3, 3] = (4, -3, 10)
    shape = (7, 8, 5)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = index @ sform[:3, :3].T + sform[:3, 3]
    data = (world @ [1.0, 2.0, 3.0] + 0.5).astype(np.float32)  # linear in space: resampling keeps it
    nii = nib.Nifti1Image(data, sform)
    nii.set_qform(None, code=0)
    nii.set_sform(sform, code=1)
    path = tmp_path / "sheared.nii.gz"
    nib.save(nii, str(path))
    with pytest.raises(RuntimeError):  # what ITK does with it alone
        sitk.ReadImage(str(path))
    with pytest.warns(GeometryWarning, match=r"sheared\.nii\.gz.*sheared.*closest orthonormal grid"):
        image = read_image(path)
    np.testing.assert_allclose(image.GetSpacing(), np.linalg.norm(sform[:3, :3], axis=0), atol=1e-6)
    # Values preserved: inside the input, every voxel holds the linear function at its position.
    array = sitk.GetArrayFromImage(image).T  # (x, y, z)
    lps_inverse = np.linalg.inv(np.diag([-1.0, -1.0, 1.0, 1.0]) @ sform)
    checked = 0
    for voxel in np.ndindex(*image.GetSize()):
        point = np.array(image.TransformIndexToPhysicalPoint(voxel))
        source = lps_inverse[:3, :3] @ point + lps_inverse[:3, 3]
        if np.all(source >= 0) and np.all(source <= np.array(shape) - 1):
            ras = point * [-1, -1, 1]
            assert array[voxel] == pytest.approx(ras @ [1.0, 2.0, 3.0] + 0.5, abs=1e-3)
            checked += 1
    assert checked >= 0.5 * np.prod(shape)
    # The grid covers the input: its corners are inside it.
    for corner in [(0, 0, 0), (6, 7, 4), (6, 0, 4), (0, 7, 0)]:
        point = np.diag([-1.0, -1.0, 1.0]) @ (sform[:3, :3] @ corner + sform[:3, 3])
        continuous = image.TransformPhysicalPointToContinuousIndex(point.tolist())
        assert np.all(np.array(continuous) >= -1e-6) and np.all(
            np.array(continuous) <= np.array(image.GetSize()) - 1 + 1e-6
        )
    # Outputs are written back on the input's own grid, with its affine.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = write_image(image, tmp_path / "score.nii.gz", path)
    written = nib.load(str(out))
    assert written.shape == shape
    np.testing.assert_allclose(written.affine, sform, atol=1e-5)
    back = np.asanyarray(written.dataobj)
    inner = (slice(1, -1), slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(back[inner], data[inner], atol=1e-3)
