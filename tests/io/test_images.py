"""Reading inputs and writing outputs: geometry round trips (oblique, anisotropic), DICOM, refusals."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from monai_ood.io import images
from monai_ood.io.images import (
    affine_from_image,
    find_inputs,
    output_stem,
    read_image,
    same_geometry,
    write_image,
)

SPACING = (0.7, 1.1, 3.0)
ORIGIN_RAS = (-12.3, 45.6, 7.89)
SIZE = (8, 9, 5)  # x, y, z


def _rotation(x_degrees: float, z_degrees: float) -> np.ndarray:
    """A rotation about x then z (an oblique acquisition tilted about two axes)."""
    a, c = np.deg2rad(x_degrees), np.deg2rad(z_degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ rx


def _oblique_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = _rotation(20, 35) @ np.diag(SPACING)
    affine[:3, 3] = ORIGIN_RAS
    return affine


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))
    return path


@pytest.fixture
def oblique_nifti(tmp_path: Path) -> Path:
    data = np.random.default_rng(0).random(SIZE).astype(np.float32) * 100
    return _save_nifti(data, _oblique_affine(), tmp_path / "input.nii.gz")


def _oblique_sitk(pixel=np.float32) -> sitk.Image:
    """The same kind of grid built directly in SimpleITK (LPS)."""
    array = (np.arange(np.prod(SIZE)).reshape(SIZE[::-1]) % 97).astype(pixel)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin((12.3, -45.6, 7.89))
    image.SetDirection(_rotation(20, 35).flatten().tolist())
    return image


def _maps(image: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """A float map in [0, 1] and a 4-class label image on ``image``'s grid."""
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    scaled = (array - array.min()) / (array.max() - array.min())
    score = sitk.GetImageFromArray(scaled.astype(np.float32))
    labels = sitk.GetImageFromArray(np.floor(scaled * 3.999).astype(np.uint8))
    score.CopyInformation(image)
    labels.CopyInformation(image)
    return score, labels


def _write_dicom_series(image: sitk.Image, folder: Path, uid: str, first: int = 0) -> None:
    """Write a 3D int16 image as one DICOM file per slice, with the per-slice geometry tags."""
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR",
            "0008|0018": f"{uid}.{k + 1}",
            "0020|000d": f"{uid}.0",
            "0020|000e": uid,
            # DICOM decimal strings hold at most 16 characters: 6 decimals keep them short and exact enough.
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0013": str(k + 1),
            "0028|0030": "\\".join(f"{v:.6f}" for v in image.GetSpacing()[1::-1]),  # row, column spacing
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{first + k:04d}.dcm"))
        writer.Execute(plane)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------------
# geometry round trips
# ----------------------------------------------------------------------------------------------------


def test_nifti_input_to_nifti_outputs_keeps_the_affine_bit_equal(oblique_nifti: Path, tmp_path: Path):
    image = read_image(oblique_nifti)
    score, labels = _maps(image)
    map_path = write_image(score, tmp_path / "input_a_xi.nii.gz", oblique_nifti, description="A_xi v1")
    label_path = write_image(labels, tmp_path / "input_seg.nii.gz", oblique_nifti, kind="label")

    reference = nib.load(str(oblique_nifti))
    for path, intent, dtype in ((map_path, 1001, np.float32), (label_path, 1002, np.uint8)):
        out = nib.load(str(path))
        assert np.array_equal(out.affine, reference.affine)  # verbatim, not merely close
        assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 1
        np.testing.assert_allclose(out.get_qform(), out.get_sform(), atol=1e-5)
        assert int(out.header["intent_code"]) == intent
        assert out.get_data_dtype() == dtype
        assert out.shape == reference.shape
        assert out.header.get_xyzt_units()[0] == "mm"
        # SimpleITK (hence 3D Slicer) places the output exactly where it places the input.
        assert same_geometry(sitk.ReadImage(str(path)), image, atol=1e-5)

    out = nib.load(str(map_path))
    data = np.asarray(out.dataobj)
    np.testing.assert_array_equal(data, sitk.GetArrayFromImage(score).T)
    assert out.header["cal_min"] == pytest.approx(data.min()) and out.header["cal_max"] == pytest.approx(
        data.max()
    )
    assert out.header["descrip"].tobytes().rstrip(b"\0") == b"A_xi v1"
    segmentation = nib.load(str(label_path))
    np.testing.assert_array_equal(np.asarray(segmentation.dataobj), sitk.GetArrayFromImage(labels).T)
    assert segmentation.header["cal_min"] == 0 and segmentation.header["cal_max"] == 3


def test_nifti_input_to_nrrd_outputs(oblique_nifti: Path, tmp_path: Path):
    image = read_image(oblique_nifti)
    score, labels = _maps(image)
    map_path = write_image(score, tmp_path / "a_xi.nrrd", oblique_nifti, description="A_xi\nmulti line")
    label_path = write_image(labels, tmp_path / "seg.nrrd", oblique_nifti, kind="label")

    read_map, read_labels = sitk.ReadImage(str(map_path)), sitk.ReadImage(str(label_path))
    assert same_geometry(read_map, image, atol=1e-5) and same_geometry(read_labels, image, atol=1e-5)
    assert read_map.GetPixelID() == sitk.sitkFloat32 and read_labels.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_labels), sitk.GetArrayFromImage(labels))
    assert read_map.GetMetaData("NRRD_content") == "A_xi multi line"
    assert not any(key.startswith(("qform", "sform", "srow")) for key in read_map.GetMetaDataKeys())
    assert b"encoding: gzip" in map_path.read_bytes()[:1000]


def test_nrrd_input_to_nifti_output_uses_the_sitk_geometry(tmp_path: Path):
    source = _oblique_sitk()
    nrrd = tmp_path / "scan.nrrd"
    sitk.WriteImage(source, str(nrrd))
    image = read_image(nrrd)
    assert same_geometry(image, source)
    score, labels = _maps(image)

    out = write_image(score, tmp_path / "scan_a_xi.nii.gz", nrrd)
    written_by_itk = tmp_path / "itk.nii.gz"
    sitk.WriteImage(source, str(written_by_itk))
    expected = nib.load(str(written_by_itk)).affine
    np.testing.assert_allclose(nib.load(str(out)).affine, expected, atol=1e-5)
    np.testing.assert_allclose(affine_from_image(image), expected, atol=1e-5)
    assert same_geometry(sitk.ReadImage(str(out)), image, atol=1e-5)
    label_out = write_image(labels, tmp_path / "scan_seg.nii", nrrd, kind="label")
    assert same_geometry(sitk.ReadImage(str(label_out)), image, atol=1e-5)


def test_2d_nifti_round_trip(tmp_path: Path):
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0, 30) @ np.diag(SPACING)  # a 2D image can only rotate in its plane
    affine[:3, 3] = ORIGIN_RAS
    data = np.random.default_rng(1).random((8, 9)).astype(np.float32)
    flat = _save_nifti(data, affine, tmp_path / "slice.nii.gz")
    image = read_image(flat)
    assert image.GetDimension() == 2
    score, labels = _maps(image)

    out = write_image(score, tmp_path / "slice_a_xi.nii.gz", flat)
    assert nib.load(str(out)).shape == (8, 9)
    assert np.array_equal(nib.load(str(out)).affine, nib.load(str(flat)).affine)
    assert same_geometry(sitk.ReadImage(str(out)), image, atol=1e-5)
    own = write_image(labels, tmp_path / "slice_seg.nii.gz", kind="label")  # no reference: own geometry
    assert nib.load(str(own)).shape == (8, 9)
    assert same_geometry(sitk.ReadImage(str(own)), image, atol=1e-5)

    # A one-slice volume stored as (x, y, 1) stays (x, y, 1), even from a 2D-shaped output.
    thick = _save_nifti(data[..., None], _oblique_affine(), tmp_path / "thick.nii.gz")
    volume = read_image(thick)
    assert volume.GetDimension() == 3
    out = write_image(_maps(volume)[0], tmp_path / "thick_a_xi.nii.gz", thick)
    assert nib.load(str(out)).shape == (8, 9, 1)
    assert np.array_equal(nib.load(str(out)).affine, nib.load(str(thick)).affine)
    assert same_geometry(sitk.ReadImage(str(out)), volume, atol=1e-5)


def test_reference_without_codes_is_read_and_written_by_nibabel_rules(tmp_path: Path):
    # No qform/sform codes: ITK and nibabel disagree on the origin; the input is read with nibabel's
    # pixdim-only affine (with a warning), so the output carries that affine and ITK agrees with it.
    image = nib.Nifti1Image(np.ones((4, 5, 3), np.float32), np.diag([0.7, 1.1, 3.0, 1.0]))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    reference = tmp_path / "nocode.nii.gz"
    nib.save(image, str(reference))
    with pytest.warns(images.GeometryWarning, match="orientation is unknown"):
        read = read_image(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = write_image(read, tmp_path / "out.nii.gz", reference)
    # The pixdim-only affine is computed in float64 and stored as a float32 sform.
    np.testing.assert_allclose(nib.load(str(out)).affine, nib.load(str(reference)).affine, atol=1e-6)
    assert same_geometry(sitk.ReadImage(str(out)), read, atol=1e-5)


def test_reference_placed_differently_by_itk_keeps_the_image_geometry(tmp_path: Path):
    # An output whose grid is not where ITK reads the input's affine (here: shifted by 5 mm) is
    # written with its own geometry, with a warning.
    reference = _save_nifti(
        np.ones((4, 5, 3), np.float32), np.diag([0.7, 1.1, 3.0, 1.0]), tmp_path / "in.nii.gz"
    )
    read = read_image(reference)
    read.SetOrigin((5.0, 0.0, 0.0))
    with pytest.warns(UserWarning, match="own geometry"):
        out = write_image(read, tmp_path / "out.nii.gz", reference)
    assert same_geometry(sitk.ReadImage(str(out)), read, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------------


def test_dicom_series_folder(tmp_path: Path):
    source = _oblique_sitk(np.int16)
    folder = tmp_path / "series7"
    _write_dicom_series(source, folder, "1.2.826.0.1.3680043.2.1125.7")
    image = read_image(folder)
    assert image.GetSize() == source.GetSize()
    # Geometry survives the 6-decimal DICOM strings.
    assert same_geometry(image, source, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source))
    assert output_stem(folder) == "series7"
    assert find_inputs(folder) == [folder]

    out = write_image(_maps(image)[0], tmp_path / "series7_a_xi.nii.gz", folder)
    assert same_geometry(sitk.ReadImage(str(out)), image, atol=1e-5)


def test_dicom_folder_with_two_series_reads_the_largest_with_a_warning(tmp_path: Path):
    folder = tmp_path / "mixed"
    big = _oblique_sitk(np.int16)
    _write_dicom_series(big, folder, "1.2.826.0.1.3680043.2.1125.8")
    _write_dicom_series(big[:, :, :2], folder, "1.2.826.0.1.3680043.2.1125.9", first=100)
    with pytest.warns(UserWarning, match="2 DICOM series"):
        image = read_image(folder)
    assert image.GetSize() == big.GetSize()


def test_single_dicom_file():
    data = pytest.importorskip("pydicom.data")
    try:
        path = data.get_testdata_file("693_UNCI.dcm")
    except Exception:  # pydicom may try to download files it does not ship
        path = None
    if path is None:
        pytest.skip("pydicom test file 693_UNCI.dcm not available")
    image = read_image(path)
    assert image.GetSize() == (512, 512, 1)
    np.testing.assert_allclose(image.GetSpacing()[:2], (0.478516, 0.478516), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), (-122.5, -112.4, 47.0), atol=1e-4)
    assert output_stem(path) == "693_UNCI"


# ----------------------------------------------------------------------------------------------------
# refusals and clear errors
# ----------------------------------------------------------------------------------------------------


def test_read_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        read_image(tmp_path / "missing.nii.gz")
    garbage = tmp_path / "x.nii.gz"
    garbage.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ValueError, match=r"x\.nii\.gz"):
        read_image(garbage)
    # Truncated files (an interrupted copy): ITK alone would zero-fill a NIfTI without a word.
    whole = _save_nifti(np.ones((20, 20, 20), np.float32), np.eye(4), tmp_path / "whole.nii")
    nrrd = tmp_path / "whole.nrrd"
    sitk.WriteImage(read_image(whole), str(nrrd), useCompression=True)
    for source in (
        whole,
        nrrd,
        _save_nifti(np.ones((20, 20, 20), np.float32), np.eye(4), tmp_path / "w.nii.gz"),
    ):
        truncated = tmp_path / f"truncated_{source.name}"
        truncated.write_bytes(source.read_bytes()[: source.stat().st_size * 2 // 3])
        with pytest.raises(ValueError, match=f"truncated_{source.name}"):
            read_image(truncated)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="without a DICOM series"):
        read_image(empty)
    nan = np.ones((4, 4, 3), np.float32)
    nan[1, 2, 0] = np.nan
    nan[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="2 NaN or Inf"):
        read_image(_save_nifti(nan, np.eye(4), tmp_path / "nan.nii.gz"))
    four_d = _save_nifti(np.ones((4, 4, 3, 2), np.float32), np.eye(4), tmp_path / "fmri.nii.gz")
    with pytest.raises(ValueError, match="4D"):
        read_image(four_d)
    # A trailing one-voxel 4th dimension is not a reason to fail.
    assert read_image(
        _save_nifti(np.ones((4, 4, 3, 1), np.float32), np.eye(4), tmp_path / "t1.nii")
    ).GetSize() == (
        4,
        4,
        3,
    )


def test_write_refusals(oblique_nifti: Path, tmp_path: Path):
    image = read_image(oblique_nifti)
    score, labels = _maps(image)
    before = oblique_nifti.read_bytes()
    # Never onto the input, not even with overwrite, nor through another spelling or a symlink.
    for target in (oblique_nifti, tmp_path / "." / "input.nii.gz"):
        with pytest.raises(ValueError, match="never overwritten"):
            write_image(score, target, reference_path=oblique_nifti, overwrite=True)
    link = tmp_path / "link.nii.gz"
    os.symlink(oblique_nifti, link)
    with pytest.raises(ValueError, match="never overwritten"):
        write_image(score, link, reference_path=oblique_nifti, overwrite=True)
    assert oblique_nifti.read_bytes() == before

    out = write_image(score, tmp_path / "out.nii.gz", oblique_nifti)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_image(score, out, oblique_nifti)
    write_image(labels, out, oblique_nifti, kind="label", overwrite=True)
    assert nib.load(str(out)).get_data_dtype() == np.uint8

    assert write_image(score, tmp_path / "plain").name == "plain.nii.gz"  # the default format
    with pytest.raises(ValueError, match=r"\.nii\.gz, \.nii or \.nrrd"):
        write_image(score, tmp_path / "out.png")
    with pytest.raises(ValueError, match="kind must be"):
        write_image(score, tmp_path / "k.nii.gz", kind="probability")
    with pytest.raises(ValueError, match="whole numbers"):
        write_image(score, tmp_path / "frac.nii.gz", kind="label")
    small = sitk.Image([3, 3, 3], sitk.sitkFloat32)
    with pytest.raises(ValueError, match="does not match the input"):
        write_image(small, tmp_path / "small.nii.gz", oblique_nifti)
    wide = sitk.Cast(labels, sitk.sitkInt32) * 1000
    assert (
        nib.load(str(write_image(wide, tmp_path / "wide.nii.gz", kind="label"))).get_data_dtype() == np.int16
    )
    with pytest.raises(ValueError, match="int16"):
        write_image(wide * 100, tmp_path / "huge.nii.gz", kind="label")
    long = write_image(score, tmp_path / "long.nii.gz", description="é" + "x" * 200)
    descrip = nib.load(str(long)).header["descrip"].tobytes().rstrip(b"\0")
    assert len(descrip) == 79 and descrip.startswith(b"?xxx")


def test_writes_are_atomic(oblique_nifti: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    image = read_image(oblique_nifti)
    score, _ = _maps(image)
    out_dir = tmp_path / "out"
    write_image(score, out_dir / "a.nii.gz", oblique_nifti)
    write_image(score, out_dir / "a.nrrd", oblique_nifti)
    assert _files(out_dir) == ["a.nii.gz", "a.nrrd"]  # no temporary files left behind

    def failing_nifti_save(img, filename):
        Path(filename).write_bytes(b"partial")  # a half-written file, then a crash (disk full, ...)
        raise OSError("disk full")

    def failing_sitk_write(img, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(images.nib, "save", failing_nifti_save)
    monkeypatch.setattr(images.sitk, "WriteImage", failing_sitk_write)
    before = (out_dir / "a.nii.gz").read_bytes()
    with pytest.raises(OSError, match="disk full"):
        write_image(score, out_dir / "a.nii.gz", oblique_nifti, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        write_image(score, out_dir / "b.nii.gz", oblique_nifti)
    with pytest.raises(RuntimeError, match="disk full"):
        write_image(score, out_dir / "c.nrrd", oblique_nifti)
    assert _files(out_dir) == ["a.nii.gz", "a.nrrd"]  # old output intact, no partial or temporary file
    assert (out_dir / "a.nii.gz").read_bytes() == before


# ----------------------------------------------------------------------------------------------------
# finding inputs, naming outputs, comparing grids
# ----------------------------------------------------------------------------------------------------


def test_find_inputs(oblique_nifti: Path, tmp_path: Path):
    folder = tmp_path / "study"
    folder.mkdir()
    nifti = folder / "t1.nii.gz"
    nifti.write_bytes(oblique_nifti.read_bytes())
    sitk.WriteImage(_oblique_sitk(), str(folder / "flair.nrrd"))
    _write_dicom_series(_oblique_sitk(np.int16), folder / "dwi_series", "1.2.826.0.1.3680043.2.1125.10")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".t1.abc.tmp.nii.gz").write_bytes(b"a temporary file")
    (folder / "empty").mkdir()

    found = find_inputs(folder)
    assert found == [folder / "dwi_series", folder / "flair.nrrd", nifti]
    assert [output_stem(p) for p in found] == ["dwi_series", "flair", "t1"]
    assert find_inputs(nifti) == [nifti]
    for path in found:
        read_image(path)

    with pytest.raises(FileNotFoundError):
        find_inputs(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no images"):
        find_inputs(folder / "empty")
    sitk.WriteImage(_oblique_sitk(), str(folder / "t1.nrrd"))
    with pytest.raises(ValueError, match="share output names"):
        find_inputs(folder)


def test_output_stem(tmp_path: Path):
    assert output_stem("data/sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert output_stem("scan.NII") == "scan"
    assert output_stem("scan.nrrd") == "scan"
    assert output_stem("scan.mha") == "scan"
    assert output_stem("IM0001.dcm") == "IM0001"
    assert output_stem("IM0001") == "IM0001"
    assert output_stem("scan.v2") == "scan.v2"
    assert output_stem(tmp_path) == tmp_path.name
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert output_stem(".") == tmp_path.name
    finally:
        os.chdir(cwd)


def test_same_geometry():
    a = _oblique_sitk()
    b = sitk.Image(a.GetSize(), sitk.sitkUInt8)
    b.CopyInformation(a)
    assert same_geometry(a, b)
    b.SetOrigin([o + 1e-6 for o in a.GetOrigin()])
    assert same_geometry(a, b)
    b.SetOrigin([o + 1e-3 for o in a.GetOrigin()])
    assert not same_geometry(a, b)
    assert not same_geometry(a, a[:, :, :2])
    assert not same_geometry(a, a[:, :, 0])
    c = sitk.Image(a)
    c.SetSpacing((0.7, 1.1, 3.1))
    assert not same_geometry(a, c)


def test_no_warnings_on_a_clean_round_trip(oblique_nifti: Path, tmp_path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = read_image(oblique_nifti)
        write_image(_maps(image)[0], tmp_path / "quiet.nii.gz", oblique_nifti)
