"""Scoring holds one full-size output at a time, and `benchmarks/memory.py` measures the peak."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from monai_ood.engines.checkpoint import build_network, make_model_config
from monai_ood.inference import score_image
from monai_ood.preprocessing import SlicePreprocessing

ROOT = Path(__file__).resolve().parents[1]


def test_full_size_outputs_are_made_when_read_and_not_kept():
    config = make_model_config("unet", 2, 1, 3, 4, network_kwargs={"channels": [4, 8], "strides": [2]})
    net = build_network(config).eval()
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.random((6, 40, 36)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    scored = score_image(net, image, SlicePreprocessing(spacing=(4.0, 4.0), size=(16, 16)))
    # nothing full-size is held by the result: the images are functions until read
    assert all(callable(v) or v is None for v in scored._images.values())
    assert not scored.has_calibrated_map and scored.calibrated_map is None
    first, second = scored.score_map, scored.score_map
    assert first is not second  # made anew on each read, not cached
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(first), sitk.GetArrayViewFromImage(second))
    for output in (first, scored.segmentation):
        assert output.GetSize() == image.GetSize() and output.GetSpacing() == image.GetSpacing()


def test_memory_benchmark_reports_the_peak(tmp_path):
    out = tmp_path / "memory.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "memory.py"),
            "--size",
            "64",
            "64",
            "24",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["volume"]["size"] == [64, 64, 24]
    assert report["volume"]["gib"] == 4 * 64 * 64 * 24 / 2**30
    assert 0 < report["baseline_peak_rss_gib"] <= report["score_peak_rss_gib"]
    assert (
        report["score_peak_above_baseline_gib"]
        == report["score_peak_rss_gib"] - report["baseline_peak_rss_gib"]
    )
