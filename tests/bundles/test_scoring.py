"""Inference of the bundles (monai_ood.bundle.scoring): ScoreImageStep with DetectorInferer writes the maps
and table rows the core's score_image gives, a failed row for an unreadable input, and the arguments
are checked."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from bundle_helpers import one_line as _one_line

from monai_ood.bundle import DetectorInferer, ScoreImageStep, TrainingForward
from monai_ood.inference import score_image
from monai_ood.io import read_image
from monai_ood.preprocessing import SlicePreprocessing


def test_score_image_step_writes_what_score_image_gives(model_files, oblique_volume, tmp_path):
    """Maps, table rows (volume and slices) of one scored input are those of the core's score_image; an
    input that cannot be read gets a failed row and no maps, the others are scored; finish() says so in
    one line; a second run replaces the rows of the inputs it scores and keeps the others."""
    f = model_files
    preprocessing = SlicePreprocessing(spacing=(4.5, 4.5), size=(48, 48))
    inferer = DetectorInferer(preprocessing, f.detector, f.calibration, batch_size=4)
    engine = SimpleNamespace(inferer=inferer, network=TrainingForward(f.net))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    step = ScoreImageStep(out)
    # the batch as MONAI's DataLoader collates two datalist items
    good, bad = step(engine, {"image": [str(oblique_volume), str(broken)]})

    reference = score_image(
        f.net, read_image(oblique_volume), preprocessing, f.calibration.weibull, 4, f.detector
    )
    assert good["status"] == "ok" and good["image_score"] == pytest.approx(reference.image_score, rel=1e-6)
    assert good["calibrated_degree"] == pytest.approx(reference.calibrated_degree, rel=1e-6)
    for key, postfix in (
        ("segmentation", "seg"),
        ("score_map", "score"),
        ("calibrated_map", "score_calibrated"),
    ):
        assert good[key] == str(out / f"case_a_{postfix}.nii.gz")
        written = sitk.GetArrayFromImage(read_image(good[key]))
        np.testing.assert_allclose(
            written, sitk.GetArrayFromImage(getattr(reference, key)), rtol=1e-6, atol=1e-6
        )
    assert bad["status"] == "failed" and bad["error"] and bad["segmentation"] is None
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "case_a_seg.nii.gz",
            "case_a_score.nii.gz",
            "case_a_score_calibrated.nii.gz",
            "scores.csv",
            "scores.json",
        ]
    )
    table = json.loads((out / "scores.json").read_text())
    assert [row["status"] for row in table["volumes"]] == ["ok", "failed"]
    assert [{k: v for k, v in row.items() if k != "input"} for row in table["slices"]] == reference.slices
    with pytest.raises(SystemExit) as refused:
        step.finish()
    assert re.search(r"1 of 2 inputs failed .*scores\.csv.*broken\.nii\.gz", _one_line(refused))

    again = ScoreImageStep(out)
    again(engine, {"image": str(oblique_volume)})
    assert again.finish() == again.rows
    table = json.loads((out / "scores.json").read_text())
    assert [row["input"] for row in table["volumes"]] == [str(oblique_volume), str(broken)]
    assert len(table["slices"]) == len(reference.slices)


def test_detector_inferer_checks_its_arguments(model_files):
    from monai_ood.preprocessing import VolumePreprocessing

    with pytest.raises(ValueError, match="SlicePreprocessing"):
        DetectorInferer(VolumePreprocessing(), model_files.detector)
    with pytest.raises(ValueError, match="batch_size"):
        DetectorInferer(SlicePreprocessing(), model_files.detector, batch_size=0)
    with pytest.raises(ValueError, match="nifti"):
        ScoreImageStep("out", output_format="png")
