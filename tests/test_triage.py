"""monai-ood triage: the ranking, the CSV and the offline HTML report, rendered in headless Chromium."""

import csv
import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from monai_ood.cli import main


@pytest.fixture(scope="module")
def triaged(tmp_path_factory):
    """A tiny calibrated model (with an OOD degree), four scans (three phantoms, one noise), triaged."""
    import torch

    from monai_ood.engines.calibration import calibrate
    from monai_ood.engines.checkpoint import build_network, make_model_config, save_model
    from monai_ood.preprocessing import SlicePreprocessing

    root = tmp_path_factory.mktemp("triage")
    torch.manual_seed(0)
    config = make_model_config("unet", 2, 1, 3, 8, {"channels": [4, 8, 16], "strides": [2, 2]})
    preprocessing = SlicePreprocessing(spacing=(3.0, 3.0), size=(32, 32))
    model = save_model(root / "model.pt", build_network(config), config, preprocessing)
    rng = np.random.default_rng(0)
    val = [{"image": rng.random((1, 32, 32), dtype=np.float32)} for _ in range(12)]
    calibrate(model, val, device="cpu")
    scans = root / "scans"
    scans.mkdir()
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (30, 30, 5)], indexing="ij")
    for k in range(3):
        inside = (x / 0.8) ** 2 + (y / (0.6 + 0.1 * k)) ** 2 < 1
        image = np.where(inside, 200.0, 0.0) + rng.normal(0, 5, inside.shape)
        nib.save(
            nib.Nifti1Image(image.astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0])),
            scans / f"case{k}.nii.gz",
        )
    noise = rng.uniform(0, 200, x.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, np.diag([3.0, 3.0, 3.0, 1.0])), scans / "noise.nii.gz")
    out = root / "out"
    argv = ["triage", str(scans), "--checkpoint", str(model), "-o", str(out), "--quiet", "--device", "cpu"]
    assert main([*argv, "--threshold", "0.5"]) == 0
    return out, argv


def test_scans_are_ranked_worst_first_with_their_degree_and_volume(triaged):
    out, argv = triaged
    table = {row["input"]: row for row in json.loads((out / "scores.json").read_text())["volumes"]}
    rows = list(csv.DictReader((out / "triage.csv").open()))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    degrees = [float(r["ood_degree"]) for r in rows]
    assert degrees == sorted(degrees, reverse=True)
    assert degrees == pytest.approx(sorted((row["ood_degree"] for row in table.values()), reverse=True))
    for row in rows:
        assert (row["flagged"] == "True") == (float(row["ood_degree"]) >= 0.5)
        seg = nib.load(table[row["input"]]["segmentation"])
        expected = float((np.asarray(seg.dataobj) > 0).sum()) * float(np.prod(seg.header.get_zooms())) / 1000
        assert float(row["foreground_ml"]) == pytest.approx(expected, abs=1e-3)
        assert row["size"] == "30x30x5" and row["spacing_mm"] == "3x3x3"
    page = (out / "triage.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4 and "<script" not in page and "http" not in page
    # a re-run resumes: nothing is scored twice, the report is rebuilt the same
    assert main(argv + ["--threshold", "0.5"]) == 0
    assert (out / "triage.html").read_text() == page


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (make setup installs it)"
)
def test_the_report_renders_every_row_and_thumbnail_in_a_headless_browser(triaged, tmp_path):
    import SimpleITK as sitk
    from scipy import ndimage

    from monai_ood.triage import write_triage

    out, _ = triaged
    degrees = sorted(
        (float(r["ood_degree"]) for r in csv.DictReader((out / "triage.csv").open())), reverse=True
    )
    threshold = (degrees[1] + degrees[2]) / 2  # two scans above the line, two below
    write_triage(out, threshold)
    shot = tmp_path / "shot.png"
    command = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--screenshot={shot}",
        "--window-size=1100,1400",
        (out / "triage.html").as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(shot)))[..., :3].astype(int)

    def mask(rgb, tolerance=6):
        return np.abs(pixels - np.array(rgb)).max(axis=2) <= tolerance

    # every thumbnail drawn: four frames (#1f77b4) around 160 x 160 pictures, each with its own content
    frames, count = ndimage.label(mask((31, 119, 180)))
    boxes = [b for b in ndimage.find_objects(frames) if b is not None]
    squares = [
        b for b in boxes if 150 <= b[0].stop - b[0].start <= 175 and 150 <= b[1].stop - b[1].start <= 175
    ]
    assert len(squares) == 4
    for rows, cols in squares:
        inside = pixels[rows.start + 5 : rows.stop - 5, cols.start + 5 : cols.stop - 5]
        assert inside.std() > 20  # a picture, not an empty box
    # the two flagged rows' tint (#fde2e2) and the threshold line (#c0392b) between the rows
    assert mask((253, 226, 226), 2).sum() > 2 * 160 * 300
    line = mask((192, 57, 43), 4)
    assert line.sum() > 500
    line_row = np.flatnonzero(line.any(axis=1)).mean()
    tops = sorted(rows.start for rows, _ in squares)
    assert tops[1] < line_row < tops[2]  # drawn between the second and the third scan
