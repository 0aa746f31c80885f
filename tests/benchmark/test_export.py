"""The embedded benchmark written as folders: the files hold the harness's slices on its grid, named sets,
labels beside the InD images, and the evaluate arguments that read them."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

import monai_ood.benchmark.harness as harness
from monai_ood.benchmark.export import write_benchmark_folders
from monai_ood.benchmark.harness import BenchmarkSets
from monai_ood.benchmark.ood_sets import OODItem
from monai_ood.evaluation import _folder_inputs, parse_ood_set
from monai_ood.io import read_image
from monai_ood.preprocessing import SlicePreprocessing, volume_to_slices

SMALL = SlicePreprocessing(spacing=(4, 4), size=(48, 40))


def _slice(rng, shift=0.0):
    """A windowed slice as the pool gives it: background 0, an ellipse of tissue, a saturated core, and
    asymmetric so that a flip or transpose of the file would show."""
    y, x = np.meshgrid(np.linspace(-1, 1, 48), np.linspace(-1, 1, 40), indexing="ij")
    tissue = ((x - shift) / 0.7) ** 2 + (y / 0.9) ** 2 < 1
    image = np.where(tissue, 0.4 + 0.3 * (y + 1) / 2 + 0.1 * x, 0.0) + rng.normal(0, 0.01, x.shape) * tissue
    image[(x - 0.3) ** 2 + (y + 0.4) ** 2 < 0.04] = 1.0
    return np.clip(image, 0, 1).astype(np.float32)[None]


@pytest.fixture
def fake_sets(monkeypatch):
    rng = np.random.default_rng(0)
    ind = [{"image": _slice(rng, 0.05 * k), "label": np.full((1, 48, 40), k % 3, np.int64)} for k in range(4)]
    ood = {
        "far away": [OODItem("far away", "C1", _slice(rng, 0.2)) for _ in range(3)],
        "lesion": [OODItem("lesion", "lesion", _slice(rng)) for _ in range(2)],
    }
    sets = BenchmarkSets(ind, ood, ind[:2], {"test": True})
    monkeypatch.setattr(harness, "benchmark_sets", lambda *args, **kwargs: sets)
    return sets


def test_folders_hold_the_harness_slices_and_the_evaluate_arguments(fake_sets, tmp_path):
    written = write_benchmark_folders(tmp_path / "bench", SMALL)
    assert json.loads((tmp_path / "bench" / "sets.json").read_text()) == written
    assert [row["name"] for row in written["ood"]] == ["far away"]  # the lesion set is left out
    files = _folder_inputs(written["ind"])
    assert len(files) == 4 and len(_folder_inputs(written["labels"])) == 4
    for path, item in zip(files, fake_sets.ind, strict=True):
        slices, _, _ = volume_to_slices(read_image(path), SMALL)
        # the slice scored from the file is the harness's, on its grid and orientation, up to the
        # re-windowing at the percentiles (a flipped or transposed file would differ by about 1)
        assert slices.shape == (1, 1, 48, 40)
        assert np.abs(slices[0, 0] - item["image"][0]).max() < 0.02
        label = read_image(tmp_path / "bench" / "labels" / path.name)
        assert np.array_equal(sitk.GetArrayFromImage(label)[0], item["label"][0])
    far = _folder_inputs(written["ood"][0]["folder"])
    assert len(far) == 3
    # the arguments parse back to the sets as `monai-ood evaluate` reads them
    arguments = written["evaluate_arguments"]
    assert arguments[:4] == ["--ind", written["ind"], "--labels", written["labels"]]
    ood = [parse_ood_set(arguments[k + 1]) for k, a in enumerate(arguments) if a == "--ood"]
    assert ood == [("far away", written["ood"][0]["folder"], "C1")]
