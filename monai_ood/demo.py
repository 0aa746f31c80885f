"""The main demo (``make demo``): train on the embedded brain data, fit the default detector, calibrate,
score InD and OOD volumes.

Everything goes through the ``monai-ood`` command line, exactly as a user would run it:

1. ``monai-ood train`` on axial slices of the embedded InD pool (four brains, 4 classes; see
   :mod:`monai_ood.benchmark.pool`), then the default detector fitted post hoc
   (:class:`~monai_ood.detectors.FusedDetector`: multi-depth terms on the trained network) and the
   Weibull calibration of its map;
2. writes example inputs as NIfTI with their real geometry: InD test slabs of the 2009a T1 and of
   Colin27 (when Debian's mricron-data is installed), and examples of each OOD category: C1 another
   domain (a CT head DICOM file from pydicom-data), C2 another viewpoint (sagittal anatomy stored as
   if it were axial, a mislabelled header), C3 unseen conditions (the 2009c T2 of the same anatomy,
   a diffusion b0 volume from another scanner, and the InD slab with a TorchIO motion artefact);
3. ``monai-ood triage`` on them: scores each (segmentation, A and A_xi maps at each input's geometry,
   the scores table), ranks them by OOD degree and writes ``triage.csv`` and ``triage.html``;
4. ``monai-ood evaluate``: on the embedded benchmark (AUROC / FPR@95TPR per OOD set, severity,
   localisation, the degree's calibration), and the same benchmark written as folders of NIfTI files
   (:func:`monai_ood.benchmark.export.write_benchmark_folders`) through ``evaluate --ind --ood --labels``,
   the path for your own data;
5. an overlay montage PNG (image | segmentation | A_xi) of the middle slice of each input, and a
   picture of the triage report (headless Chromium, when installed).

``--docs DIR`` copies the pictures and reports the README shows (montage, triage report, evaluation
tables and plots) to ``DIR`` (the committed ``docs/demo``).

Run: ``python -m monai_ood.demo [--output outputs/demo] [--epochs 70] [--seed 0] [--overwrite] [--docs DIR]``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .cli import main as cli
from .files import atomic_write


def _write_input(image: sitk.Image, path: Path) -> Path:
    return atomic_write(path, lambda temporary: sitk.WriteImage(image, str(temporary), True), overwrite=True)


def _crop_world_z(image: sitk.Image, z_low: float, z_high: float) -> sitk.Image:
    """Crop an axis-aligned volume to the slab of world (LPS) z in [z_low, z_high]."""
    indices = [
        image.TransformPhysicalPointToIndex((image.GetOrigin()[0], image.GetOrigin()[1], z))[2]
        for z in (z_low, z_high)
    ]
    low, high = max(min(indices), 0), min(max(indices), image.GetSize()[2] - 1)
    return image[:, :, low : high + 1]


def _test_slab(test_items, volume: str) -> tuple[float, float]:
    """World z range (mm) of the test slab of ``volume`` nearest the middle of its test slices."""
    test_z = np.sort([item["position_mm"] for item in test_items if item.get("volume") == volume])
    if test_z.size == 0:
        raise ValueError(f"the embedded pool has no test slices of {volume!r}")
    # consecutive test slices (2 mm apart) form a slab of about 10 mm
    slabs = np.split(test_z, np.flatnonzero(np.diff(test_z) > 3.0) + 1)
    slab = min(slabs, key=lambda s: abs(s.mean() - np.median(test_z)))
    return float(slab.min()), float(slab.max())


def _example_inputs(inputs_dir: Path, cache_dir, seed: int) -> dict[str, Path]:
    import torchio as tio

    from .benchmark.ood_sets import ood_source_images
    from .benchmark.pool import load_brain_dataset, load_mni152_t1, pool_volumes

    t1 = load_mni152_t1()
    test = load_brain_dataset(cache_dir=cache_dir)["test"]
    z_low, z_high = _test_slab(test, "2009a")
    ind = _crop_world_z(t1, z_low, z_high)

    paths = {"InD test slab (2009a T1)": _write_input(ind, inputs_dir / "ind_t1_test_slab.nii.gz")}
    volumes = pool_volumes()
    if "colin27" in volumes:
        colin_low, colin_high = _test_slab(test, "colin27")
        paths["InD test slab (Colin27, one person)"] = _write_input(
            _crop_world_z(volumes["colin27"][0], colin_low, colin_high),
            inputs_dir / "ind_colin27_test_slab.nii.gz",
        )
    sources = ood_source_images()
    if "ct_head" in sources:
        paths["C1 CT head (DICOM)"] = _write_input(sources["ct_head"], inputs_dir / "c1_ct_head.nii.gz")
    # C2: the same T1 with a header rotated so that a tool slicing "axially" sees sagittal planes,
    # as a wrongly exported orientation would present them
    if "sagittal_as_axial" in sources:
        paths["C2 sagittal stored as axial"] = _write_input(
            sources["sagittal_as_axial"], inputs_dir / "c2_sagittal_as_axial.nii.gz"
        )
    if "t2_2009c" in sources:
        t2 = sources["t2_2009c"]
        paths["C3 T2 contrast (2009c)"] = _write_input(
            _crop_world_z(t2, z_low, z_high), inputs_dir / "c3_t2_2009c_slab.nii.gz"
        )
    if "b0_dwi" in sources:
        paths["C3 diffusion b0 (another sequence)"] = _write_input(
            sources["b0_dwi"], inputs_dir / "c3_b0_dwi.nii.gz"
        )
    # a moderate rigid head motion during the acquisition, in 3D k-space (TorchIO draws from torch's RNG)
    import torch

    subject = tio.ScalarImage(tensor=sitk.GetArrayFromImage(ind).transpose(2, 1, 0)[None].astype(np.float32))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        moved = (
            tio.RandomMotion(degrees=8, translation=8, num_transforms=2)(subject)
            .data[0]
            .numpy()
            .transpose(2, 1, 0)
        )
    motion_image = sitk.GetImageFromArray(np.ascontiguousarray(moved))
    motion_image.CopyInformation(ind)
    paths["C3 InD slab + motion artefact"] = _write_input(
        motion_image, inputs_dir / "c3_t1_motion_slab.nii.gz"
    )
    return paths


def _montage(paths: dict[str, Path], scores_dir: Path, output: Path, table: dict) -> None:
    from .io import read_image
    from .preprocessing import SlicePreprocessing, to_grid, volume_to_slices
    from .visualize import save_montage

    rows = []
    for name, path in paths.items():
        image = read_image(path)
        slices, _, grid = volume_to_slices(image, SlicePreprocessing())
        k = int(np.argmax(slices.reshape(len(slices), -1).mean(1)))  # the slice with most signal
        stem = path.name.replace(".nii.gz", "")
        seg = sitk.GetArrayFromImage(
            to_grid(read_image(scores_dir / f"{stem}_seg.nii.gz"), grid, sitk.sitkNearestNeighbor)
        )[k]
        a_xi = sitk.GetArrayFromImage(
            to_grid(read_image(scores_dir / f"{stem}_score_calibrated.nii.gz"), grid)
        )[k]
        rows.append(
            {
                "name": name,
                "image": slices[k, 0],
                "segmentation": seg.astype(np.int64),
                "a_xi": a_xi,
                "score": table.get(path.name),
            }
        )
    save_montage(
        rows,
        output,
        title="monai-ood: image | segmentation | A_xi (Weibull-calibrated OOD map)",
        overwrite=True,
    )


TRIAGE_THRESHOLD = 0.95

# what --docs copies: demo file -> name in the docs folder (a missing picture, e.g. without chromium, is
# skipped); and the plots of each evaluation, with a prefix
DOCS_FILES = {
    "montage.png": "montage.png",
    "triage.png": "triage.png",
    "scores/triage.csv": "triage.csv",
    "scores/scores.csv": "scores.csv",
    "evaluation/evaluation.json": "evaluation.json",
    "evaluation/evaluation.md": "evaluation.md",
    "evaluation_folders/evaluation.json": "folders_evaluation.json",
    "evaluation_folders/evaluation.md": "folders_evaluation.md",
}
DOCS_PLOTS = {"evaluation": "", "evaluation_folders": "folders_"}


def _copy_to_docs(output: Path, docs: Path) -> None:
    """The README's pictures and reports, copied from the demo folder (paths made relative to it)."""
    import shutil

    def copy(source: Path, target: Path) -> None:
        if source.suffix in (".json", ".md", ".csv"):
            text = source.read_text(encoding="utf-8").replace(str(output.resolve()) + "/", "")
            text = text.replace(str(output) + "/", "")
            atomic_write(
                target, lambda temporary: temporary.write_text(text, encoding="utf-8"), overwrite=True
            )
        else:
            atomic_write(target, lambda temporary: shutil.copyfile(source, temporary), overwrite=True)

    for name, target in DOCS_FILES.items():
        if (output / name).is_file():
            copy(output / name, docs / target)
    for folder, prefix in DOCS_PLOTS.items():
        for png in sorted((output / folder / "plots").glob("*.png")):
            copy(png, docs / "plots" / f"{prefix}{png.name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="outputs/demo", help="demo folder (default: outputs/demo)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=70,
        help="training epochs (default: 70, the end of a warm-restart cycle)",
    )
    parser.add_argument("--head-channels", type=int, default=64, help="c_g of the head (default: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="embedded data cache (default: $MONAI_OOD_CACHE or ~/.cache/monai-ood)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo's outputs")
    parser.add_argument(
        "--docs",
        default=None,
        help="also copy the pictures and reports the README shows to this folder (the repo's docs/demo)",
    )
    args = parser.parse_args(argv)
    output = Path(args.output)
    run_dir, inputs_dir, scores_dir = output / "run", output / "inputs", output / "scores"
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    overwrite = ["--overwrite"] if args.overwrite else []
    start = time.perf_counter()

    print(
        "== 1/5 train, fit the default detector, calibrate on the embedded pool of four brains (axial slices)"
    )
    code = cli(
        [
            "train",
            "--output",
            str(run_dir),
            "--epochs",
            str(args.epochs),
            "--head-channels",
            str(args.head_channels),
            "--seed",
            str(args.seed),
            *cache,
            *overwrite,
        ]
    )
    if code:
        return code
    model = run_dir / "model.pt"
    print("== 2/5 write example inputs (InD slab, C1, C2, C3) as NIfTI")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        paths = _example_inputs(inputs_dir, args.cache_dir, args.seed)
    for name, path in paths.items():
        print(f"   {name:<34} {path}")
    print("== 3/5 monai-ood triage (score every input, rank by OOD degree, CSV + HTML report)")
    code = cli(
        [
            "triage",
            *map(str, paths.values()),
            "--checkpoint",
            str(model),
            "--output",
            str(scores_dir),
            "--threshold",
            str(TRIAGE_THRESHOLD),
            *overwrite,
        ]
    )
    if code:
        return code
    print("== 4/5 monai-ood evaluate (benchmark slices: InD test vs every OOD set)")
    code = cli(
        [
            "evaluate",
            "--checkpoint",
            str(model),
            "--output",
            str(output / "evaluation"),
            "--seed",
            str(args.seed),
            *cache,
            *overwrite,
        ]
    )
    if code:
        return code
    print(
        "   the same benchmark as folders of NIfTI files, through evaluate --ind --ood --labels (your data's path)"
    )
    from .benchmark.export import write_benchmark_folders
    from .engines.checkpoint import load_model

    folders = write_benchmark_folders(
        output / "benchmark_folders",
        load_model(model, device="cpu").preprocessing,
        seed=args.seed,
        cache_dir=args.cache_dir,
    )
    code = cli(
        [
            "evaluate",
            "--checkpoint",
            str(model),
            "--output",
            str(output / "evaluation_folders"),
            *folders["evaluate_arguments"],
            *overwrite,
        ]
    )
    if code:
        return code
    print("== 5/5 overlay montage, picture of the triage report")
    import json

    table = {
        Path(row["input"]).name: row["image_score"]
        for row in json.loads((scores_dir / "scores.json").read_text())["volumes"]
    }
    montage = output / "montage.png"
    _montage(paths, scores_dir, montage, table)
    from .triage import screenshot

    triage_png = screenshot(scores_dir / "triage.html", output / "triage.png", window=(1100, 1500))
    if args.docs:
        _copy_to_docs(output, Path(args.docs))
    minutes = (time.perf_counter() - start) / 60
    print(f"\ndone in {minutes:.1f} min. Outputs:")
    print(f"  model + calibration : {model}")
    print(f"  inputs              : {inputs_dir}")
    print(f"  maps (seg, A, A_xi) : {scores_dir}")
    print(f"  score table         : {scores_dir / 'scores.csv'} (and scores.json)")
    print(f"  evaluation          : {output / 'evaluation' / 'evaluation.json'}")
    print(f"  triage              : {scores_dir / 'triage.html'} (and triage.csv)")
    print(f"  evaluation (folders): {output / 'evaluation_folders' / 'evaluation.md'}")
    print(f"  montage             : {montage}")
    if triage_png is not None:
        print(f"  triage picture      : {triage_png}")
    if args.docs:
        print(f"  copied for the docs : {args.docs}")
    print(
        f"  3D Slicer           : Slicer --python-script {scores_dir / 'slicer' / 'load_in_slicer.py'} -- --image <input> --map <..._score_calibrated.nii.gz> --seg <..._seg.nii.gz>"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
