"""DICOM outputs (``monai-ood score --format dicom``): a Parametric Map of A_xi and a DICOM SEG, read back
with readers other than the writer: pydicom (pixels and per-frame geometry, placed on the NIfTI outputs'
grid by SimpleITK), SimpleITK (the source series, the NIfTI maps, the SEG's frames), dcm2niix (the
Parametric Map onto world coordinates, when installed) and highdicom's own SEG reader.

The input is a real multi-slice CT series written from a volume with its geometry (oblique, anisotropic,
one file per slice, every attribute a CT image needs); the model is a tiny untrained 2D network with a
calibration (what it predicts does not matter here), so a run takes about a second.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy.spatial.transform import Rotation

from monai_ood.cli import main
from monai_ood.io import dicom_output
from monai_ood.io.dicom_output import STORED_MAX, parametric_map, read_source_series, segmentation_object

CLASS_NAMES = ["background", "CSF", "grey matter", "white matter"]
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SPACING = (0.8, 0.9, 2.5)  # column, row, slice (mm)
SIZE = (24, 20, 7)  # columns, rows, slices
DIRECTION = Rotation.from_euler("xz", [12, 20], degrees=True).as_matrix()  # columns: row, column, normal
ORIGIN = np.array([10.0, -20.0, 30.0])  # LPS, mm


def _ct_volume() -> np.ndarray:
    """A head-like phantom in HU, (slices, rows, columns)."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in SIZE[::-1]], indexing="ij")
    r = (x / 0.85) ** 2 + (y / 0.9) ** 2 + (z / 1.4) ** 2
    hu = np.where(r < 1, 40.0, -1000.0) + np.where(r < 0.4, 60.0, 0.0)
    return (hu + np.random.default_rng(0).normal(0, 15, hu.shape)).astype(np.int16)


def write_ct_series(folder: Path, volume: np.ndarray) -> list[Path]:
    """One CT Image Storage file per slice, with the patient, study, series and geometry a PACS sends.

    The files are written in reverse order of position (as some scanners number them) so that the
    readers' own sorting is exercised.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(volume.shape[0]):
        position = ORIGIN + DIRECTION[:, 2] * SPACING[2] * k
        meta = FileMetaDataset()
        sop = generate_uid()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Head", "PH0001", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "ACC1"
        ds.ReferringPhysicianName, ds.Manufacturer = "", "test"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, volume.shape[0] - k
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*DIRECTION[:, 0], *DIRECTION[:, 1])]
        ds.PixelSpacing = [f"{SPACING[1]:.6f}", f"{SPACING[0]:.6f}"]  # row spacing, column spacing
        ds.SliceThickness = f"{SPACING[2]:.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.KVP = "120"
        ds.PixelData = (volume[k].astype(np.int32) + 1024).astype(np.int16).tobytes()
        path = folder / f"IM{volume.shape[0] - k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dicom") / "ct_head"
    write_ct_series(folder, _ct_volume())
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    import torch

    from monai_ood.calibration import WeibullCalibrator
    from monai_ood.engines.checkpoint import build_network, make_model_config, save_model
    from monai_ood.preprocessing import SlicePreprocessing

    torch.manual_seed(0)
    config = make_model_config("unet", 2, 1, 4, 8, network_kwargs={"channels": [4, 8, 16], "strides": [2, 2]})
    calibration = WeibullCalibrator().fit(np.random.default_rng(0).weibull(1.5, 1000) * 20)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    preprocessing = SlicePreprocessing(spacing=(1.0, 1.0), size=(32, 32))
    return save_model(
        path, build_network(config), config, preprocessing, calibration=calibration, class_names=CLASS_NAMES
    )


def _score(*argv) -> int:
    return main(["score", *map(str, argv), "--quiet", "--device", "cpu"])


@pytest.fixture(scope="module")
def scored(series, model, tmp_path_factory) -> dict[str, Path]:
    """The same series scored as DICOM and as NIfTI (the reference the DICOM values must equal)."""
    root = tmp_path_factory.mktemp("scores")
    before = {p.name: p.read_bytes() for p in series.iterdir()}
    assert _score(series, "--checkpoint", model, "-o", root / "dicom", "--format", "dicom") == 0
    assert _score(series, "--checkpoint", model, "-o", root / "nifti") == 0
    assert {p.name: p.read_bytes() for p in series.iterdir()} == before  # the input is untouched
    return {"dicom": root / "dicom", "nifti": root / "nifti"}


# ----------------------------------------------------------------------------------------------------
# independent readers
# ----------------------------------------------------------------------------------------------------


def _sources(series: Path) -> dict[str, pydicom.Dataset]:
    return {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in sorted(series.iterdir()))}


def _frame_geometry(ds: pydicom.Dataset, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Position, orientation (6) and pixel spacing of one frame: per-frame groups, else shared ones."""
    groups = [ds.PerFrameFunctionalGroupsSequence[frame], ds.SharedFunctionalGroupsSequence[0]]

    def find(sequence: str, attribute: str) -> np.ndarray:
        item = next(g for g in groups if sequence in g)
        return np.array([float(v) for v in getattr(getattr(item, sequence)[0], attribute)])

    return (
        find("PlanePositionSequence", "ImagePositionPatient"),
        find("PlaneOrientationSequence", "ImageOrientationPatient"),
        find("PixelMeasuresSequence", "PixelSpacing"),
    )


def _slice_index(grid: sitk.Image, position: np.ndarray) -> int:
    """Which slice of ``grid`` a frame at ``position`` is, by SimpleITK's geometry (exactly on one)."""
    index = np.array(grid.TransformPhysicalPointToContinuousIndex(position.tolist()))
    assert np.allclose(index, np.round(index), atol=1e-3) and np.allclose(index[:2], 0, atol=1e-3), index
    return int(round(index[2]))


def _check_frames_on_grid(ds: pydicom.Dataset, grid: sitk.Image, sources: dict) -> list[int]:
    """Every frame lies on a slice of ``grid`` (the input's), with the input's orientation and spacing,
    derived from the source slice at that position; returns each frame's slice index."""
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    indices = []
    for frame in range(int(ds.NumberOfFrames)):
        position, orientation, spacing = _frame_geometry(ds, frame)
        np.testing.assert_allclose(orientation, [*direction[:, 0], *direction[:, 1]], atol=1e-5)
        np.testing.assert_allclose(spacing, grid.GetSpacing()[1::-1], atol=1e-6)
        derivation = ds.PerFrameFunctionalGroupsSequence[frame].DerivationImageSequence[0]
        source = sources[derivation.SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose(position, [float(v) for v in source.ImagePositionPatient], atol=1e-6)
        indices.append(_slice_index(grid, position))
    return indices


def _check_references(ds: pydicom.Dataset, sources: dict) -> None:
    first = next(iter(sources.values()))
    for attribute in (
        "StudyInstanceUID",
        "FrameOfReferenceUID",
        "PatientID",
        "PatientName",
        "AccessionNumber",
    ):
        assert getattr(ds, attribute) == getattr(first, attribute), attribute
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    (referenced,) = ds.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(sources)


def test_parametric_map_holds_a_xi_at_the_input_geometry(series, scored):
    path = scored["dicom"] / "ct_head_score_calibrated.dcm"
    assert not (scored["dicom"] / "ct_head_score.dcm").exists()  # A(x) is NIfTI/NRRD only
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == PM_CLASS and ds.Modality == "OT" and ds.SeriesDescription.startswith("monai-ood")
    sources = _sources(series)
    _check_references(ds, sources)
    # the input's geometry as SimpleITK reads the series, and the NIfTI map on it
    image = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    reference = sitk.ReadImage(str(scored["nifti"] / "ct_head_score_calibrated.nii.gz"))
    for getter in (sitk.Image.GetOrigin, sitk.Image.GetSpacing, sitk.Image.GetDirection):
        np.testing.assert_allclose(getter(reference), getter(image), atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), ORIGIN, atol=1e-5)
    np.testing.assert_allclose(image.GetSpacing(), SPACING, atol=1e-5)
    indices = _check_frames_on_grid(ds, image, sources)
    assert sorted(indices) == list(range(SIZE[2]))
    # values: stored * the Real World Value Mapping's slope = the NIfTI map, to the encoding's precision
    (mapping,) = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    assert mapping.LUTLabel == "A_xi" and mapping.RealWorldValueIntercept == 0
    assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
    values = ds.pixel_array.astype(np.float64) * mapping.RealWorldValueSlope + mapping.RealWorldValueIntercept
    expected = sitk.GetArrayFromImage(reference)[indices]
    assert np.ptp(expected) > 0.05  # a map with contrast, not a constant
    assert np.abs(values - expected).max() <= 0.5 / STORED_MAX + 1e-7


def test_segmentation_holds_the_labels_at_the_input_geometry(series, scored):
    ds = pydicom.dcmread(scored["dicom"] / "ct_head_seg.dcm")
    assert ds.SOPClassUID == SEG_CLASS and ds.SegmentationType == "BINARY"
    sources = _sources(series)
    _check_references(ds, sources)
    segments = {int(s.SegmentNumber): s.SegmentLabel for s in ds.SegmentSequence}
    assert segments == {k: name for k, name in enumerate(CLASS_NAMES) if k > 0}  # one per foreground class
    reference = sitk.ReadImage(str(scored["nifti"] / "ct_head_seg.nii.gz"))
    expected = sitk.GetArrayFromImage(reference)
    assert len(np.unique(expected)) >= 2
    # rebuild the label volume from pydicom's frames alone
    labels = np.zeros_like(expected)
    frames = ds.pixel_array.reshape(-1, *expected.shape[1:])
    indices = _check_frames_on_grid(ds, reference, sources)
    for frame, k in enumerate(indices):
        number = int(
            ds.PerFrameFunctionalGroupsSequence[frame]
            .SegmentIdentificationSequence[0]
            .ReferencedSegmentNumber
        )
        assert not (labels[k][frames[frame] > 0]).any()  # segments do not overlap
        labels[k][frames[frame] > 0] = number
    np.testing.assert_array_equal(labels, expected)
    # SimpleITK reads the SEG as its stack of frames (without their geometry): the same pixels
    stack = sitk.GetArrayFromImage(sitk.ReadImage(str(scored["dicom"] / "ct_head_seg.dcm")))
    np.testing.assert_array_equal(stack > 0, frames > 0)


def test_highdicom_reads_the_segmentation_back_per_source_instance(series, scored):
    import highdicom as hd

    seg = hd.seg.segread(scored["dicom"] / "ct_head_seg.dcm")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    labels = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(scored["nifti"] / "ct_head_seg.nii.gz")))
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.skipif(
    shutil.which("dcm2niix") is None, reason="dcm2niix not installed (apt-get install dcm2niix)"
)
def test_dcm2niix_reads_the_parametric_map_onto_the_input_world(scored, tmp_path):
    pm = scored["dicom"] / "ct_head_score_calibrated.dcm"
    result = subprocess.run(
        ["dcm2niix", "-s", "y", "-z", "n", "-b", "n", "-o", str(tmp_path), "-f", "pm", str(pm)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    converted = nib.load(tmp_path / "pm.nii")
    reference = nib.load(scored["nifti"] / "ct_head_score_calibrated.nii.gz")
    # each dcm2niix voxel sits exactly on a voxel of the NIfTI map (dcm2niix may flip axes)
    to_reference = np.linalg.inv(reference.affine) @ converted.affine
    assert np.allclose(to_reference[:3, :3], np.round(to_reference[:3, :3]), atol=1e-3)
    assert np.allclose(to_reference[:3, 3], np.round(to_reference[:3, 3]), atol=1e-3)
    ijk = np.indices(converted.shape).reshape(3, -1)
    target = np.round(to_reference[:3, :3] @ ijk + to_reference[:3, 3:]).astype(int)
    expected = np.asarray(reference.dataobj)[tuple(target)]
    values = np.asarray(converted.dataobj, dtype=np.float64)[tuple(ijk)] / STORED_MAX
    assert values.shape == expected.shape and np.abs(values - expected).max() <= 0.5 / STORED_MAX + 1e-7


# ----------------------------------------------------------------------------------------------------
# the writers on designed inputs: every class, an absent one, a single slice
# ----------------------------------------------------------------------------------------------------


def _on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


def test_segment_per_class_with_an_absent_class_and_exact_labels(series):
    sources = read_source_series(series)
    grid = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    labels = np.zeros(SIZE[::-1], np.uint8)
    labels[1:4, 5:12, 3:9] = 1
    labels[2:6, 10:15, 12:20] = 3  # class 2 appears nowhere
    seg = segmentation_object(_on_grid(labels, grid), sources, CLASS_NAMES, 4)
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2, 3]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == CLASS_NAMES[1:]
    numbers = [
        int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    assert sorted(set(numbers)) == [1, 3] and len(numbers) == 3 + 4  # empty frames are left out
    rebuilt = np.zeros_like(labels)
    for frame, number in enumerate(numbers):
        position = _frame_geometry(seg, frame)[0]
        rebuilt[_slice_index(grid, position)][seg.pixel_array[frame] > 0] = number
    np.testing.assert_array_equal(rebuilt, labels)


def test_single_file_input_gives_one_frame_objects(series, tmp_path):
    one = tmp_path / "one" / "IM0001.dcm"
    one.parent.mkdir()
    shutil.copy(sorted(series.iterdir())[0], one)
    sources = read_source_series(one)
    grid = sitk.ReadImage(str(one))
    values = np.linspace(0, 1, SIZE[0] * SIZE[1], dtype=np.float32).reshape(
        sitk.GetArrayFromImage(grid).shape
    )
    pm = parametric_map(_on_grid(values, grid), sources)
    assert int(pm.NumberOfFrames) == 1
    np.testing.assert_allclose(
        _frame_geometry(pm, 0)[0], [float(v) for v in sources[0].ImagePositionPatient], atol=1e-6
    )
    stored = pm.pixel_array.reshape(values.shape[-2:])
    assert np.abs(stored / STORED_MAX - values.reshape(stored.shape)).max() <= 0.5 / STORED_MAX + 1e-7


def test_writers_refuse_what_does_not_fit(series):
    sources = read_source_series(series)
    grid = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    with pytest.raises(ValueError, match=r"A_xi must lie in \[0, 1\]"):
        parametric_map(_on_grid(np.full(SIZE[::-1], 1.5, np.float32), grid), sources)
    with pytest.raises(ValueError, match="labels must lie in 0..3"):
        segmentation_object(_on_grid(np.full(SIZE[::-1], 4, np.uint8), grid), sources, CLASS_NAMES, 4)
    with pytest.raises(ValueError, match="does not match the source series"):
        parametric_map(_on_grid(np.zeros(SIZE[::-1], np.float32)[:-1], grid[:, :, :-1]), sources)
    reversed_grid = _on_grid(np.zeros(SIZE[::-1], np.float32), grid)
    with pytest.raises(ValueError, match="not read from this series in this order"):
        parametric_map(reversed_grid, sources[::-1])


# ----------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------


def test_non_dicom_input_is_refused_in_one_line_before_any_work(series, model, tmp_path, capsys):
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(_ct_volume().T.astype(np.float32), np.diag([0.8, 0.9, 2.5, 1.0])), scan)
    output = tmp_path / "out"
    capsys.readouterr()
    assert _score(series, scan, "--checkpoint", model, "-o", output, "--format", "dicom") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--format dicom" in err and "scan.nii.gz" in err and "--format nifti" in err
    assert not output.exists()
    # the outputs would join the input's own series folder: refused too
    assert _score(series, "--checkpoint", model, "-o", series, "--format", "dicom") == 2
    assert "input series folder" in capsys.readouterr().err


def test_triage_does_not_offer_dicom(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["triage", "x", "--checkpoint", "m.pt", "-o", "out", "--format", "dicom"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_a_failed_write_leaves_no_part_of_the_set_and_resume_completes_it(
    series, model, tmp_path, monkeypatch
):
    output = tmp_path / "out"

    def broken(*args, **kwargs):
        raise ValueError("simulated: the map does not fit")

    monkeypatch.setattr(dicom_output, "parametric_map", broken)
    assert _score(series, "--checkpoint", model, "-o", output, "--format", "dicom") == 1
    assert sorted(p.name for p in output.iterdir() if not p.name.startswith(".monai-ood")) == [
        "scores.csv",
        "scores.json",
    ]  # the SEG was written first, and discarded with the set; no temporary files, no Slicer files
    monkeypatch.undo()
    assert _score(series, "--checkpoint", model, "-o", output, "--format", "dicom", "--resume") == 0
    written = {p.name: p.stat().st_mtime_ns for p in output.glob("*.dcm")}
    assert sorted(written) == ["ct_head_score_calibrated.dcm", "ct_head_seg.dcm"]
    assert _score(series, "--checkpoint", model, "-o", output, "--format", "dicom", "--resume") == 0
    assert {p.name: p.stat().st_mtime_ns for p in output.glob("*.dcm")} == written  # complete: kept
