"""``monai-ood`` command line: train, calibrate, score, evaluate.

Examples::

    monai-ood train --output runs/brain                      # embedded pool of four brains (axial slices)
    monai-ood train --datalist data.json --output runs/mine  # your MONAI datalist
    monai-ood calibrate --checkpoint runs/brain/model.pt     # (train does this already)
    monai-ood score --checkpoint runs/brain/model.pt scan.nii.gz dicom_folder/ --output scores/
    monai-ood evaluate --checkpoint runs/brain/model.pt --output eval/
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .files import atomic_write_text

__all__ = ["main", "build_parser"]

OUTPUT_SUFFIXES = {"nifti": ".nii.gz", "nrrd": ".nrrd"}


def _load_items(args, split: str, preprocessing):
    """2D items of a split from the embedded brain data or a user datalist."""
    if args.datalist:
        from .data.datalist import datalist_to_slices, load_datalist

        datalist_split = {"train": "training", "validation": "validation", "test": "test"}[split]
        items = load_datalist(args.datalist, split=datalist_split)
        return datalist_to_slices(items, preprocessing, num_classes=args.num_classes)
    from .benchmark.pool import load_brain_dataset

    return load_brain_dataset(cache_dir=args.cache_dir, preprocessing=preprocessing)[split]


# ---------------------------------------------------------------- train


def _cmd_train(args) -> int:
    from .engines.calibration import calibrate
    from .engines.training import TrainingConfig, train
    from .preprocessing import SlicePreprocessing

    output = Path(args.output)
    preprocessing = SlicePreprocessing(axis=args.axis, spacing=args.spacing, size=args.size)
    config = TrainingConfig(
        preset=args.preset,
        network_kwargs=args.network_kwargs,
        head_channels=args.head_channels,
        lambda_out=args.lambda_out,
        batch_size=args.batch_size,
        max_epochs=args.epochs,
        learning_rate=args.lr,
        num_workers=args.num_workers,
        seed=args.seed,
        device=args.device,
        head_config=args.head_config,
        **{
            name: getattr(args, name)
            for name in (
                "extra_layers",
                "global_head",
                "gaussian_term",
                "aggregation",
                "class_balanced",
                "refit",
                "select_by",
            )
            if getattr(args, name) is not None
        },
    )
    train_items = _load_items(args, "train", preprocessing)
    val_items = _load_items(args, "validation", preprocessing)
    class_names = ["background", "CSF", "grey matter", "white matter"] if not args.datalist else None
    print(
        f"training {args.preset} + prototype head on {len(train_items)} slices, validating on {len(val_items)}"
    )
    result = train(
        train_items,
        val_items,
        config,
        output,
        preprocessing=preprocessing,
        class_names=class_names,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    if not args.no_calibrate:
        calibrator = calibrate(result.best_checkpoint, val_items, device=args.device)
        print(
            f"calibrated on the validation split: Weibull shape={calibrator.shape:.3f} scale={calibrator.scale:.3f}"
        )
    print(f"model: {result.best_checkpoint}")
    return 0


# ---------------------------------------------------------------- calibrate


def _cmd_calibrate(args) -> int:
    from .engines.calibration import calibrate
    from .engines.checkpoint import load_model

    preprocessing = load_model(args.checkpoint, device="cpu").preprocessing
    calibrator = calibrate(
        args.checkpoint, _load_items(args, "validation", preprocessing), device=args.device
    )
    print(f"Weibull shape={calibrator.shape:.4f} scale={calibrator.scale:.4f} stored in {args.checkpoint}")
    return 0


# ---------------------------------------------------------------- score


def _cmd_score(args) -> int:
    from dataclasses import replace

    from tqdm import tqdm

    from .engines.checkpoint import load_model
    from .inference import score_image
    from .io import find_inputs, output_stem, read_image, write_image
    from .preprocessing import SlicePreprocessing

    loaded = load_model(args.checkpoint, device=args.device)
    preprocessing = loaded.preprocessing
    if args.axis:
        if not isinstance(preprocessing, SlicePreprocessing):
            raise ValueError("--axis applies to 2D models only")
        preprocessing = replace(preprocessing, axis=args.axis)
    if loaded.calibrator is None:
        print("note: the checkpoint has no calibration; A_xi maps are skipped (run `monai-ood calibrate`)")
    inputs = [p for path in args.inputs for p in find_inputs(path)]
    output = Path(args.output)
    suffix = OUTPUT_SUFFIXES[args.format]
    planned = {}
    for path in inputs:
        stem = output_stem(path)
        names = {"segmentation": f"{stem}_seg{suffix}", "score_map": f"{stem}_score{suffix}"}
        if loaded.calibrator is not None:
            names["calibrated_map"] = f"{stem}_score_calibrated{suffix}"
        planned[path] = {key: output / name for key, name in names.items()}
    # refuse before writing anything: a half-written output folder helps no one
    targets = [t for paths in planned.values() for t in paths.values()]
    targets += [output / "scores.csv", output / "scores.json"]
    if len(set(targets)) != len(targets):
        raise ValueError("two inputs have the same name stem; score them into different --output folders")
    input_paths = {Path(p).resolve() for p in inputs}
    for target in targets:
        if target.resolve() in input_paths:
            raise ValueError(f"refusing to write onto an input: {target}")
        if target.exists() and not args.overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    output.mkdir(parents=True, exist_ok=True)

    volume_rows, slice_rows = [], []
    for path in tqdm(inputs, desc="score", unit="image", disable=args.quiet):
        image = read_image(path)
        scored = score_image(loaded.net, image, preprocessing, loaded.calibrator, batch_size=args.batch_size)
        paths = planned[path]
        reference = path if Path(path).is_file() else None
        write_image(
            scored.segmentation, paths["segmentation"], reference, kind="label", overwrite=args.overwrite
        )
        write_image(
            scored.score_map,
            paths["score_map"],
            reference,
            kind="map",
            overwrite=args.overwrite,
            description="monai-ood A(x)",
        )
        if scored.calibrated_map is not None:
            write_image(
                scored.calibrated_map,
                paths["calibrated_map"],
                reference,
                kind="map",
                overwrite=args.overwrite,
                description="monai-ood A_xi",
            )
        volume_rows.append(
            {
                "input": str(path),
                "image_score": scored.image_score,
                "calibrated_degree": scored.calibrated_degree,
                **{key: str(value) for key, value in paths.items()},
            }
        )
        slice_rows += [{"input": str(path), **row} for row in scored.slices]

    atomic_write_text(
        output / "scores.json",
        json.dumps({"volumes": volume_rows, "slices": slice_rows}, indent=2),
        args.overwrite,
    )
    buffer = io.StringIO()
    fields = [
        "input",
        "level",
        "slice",
        "position_mm",
        "has_signal",
        "foreground_fraction",
        "image_score",
        "calibrated_degree",
    ]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in volume_rows:
        writer.writerow({**row, "level": "volume"})
    for row in slice_rows:
        writer.writerow({**row, "level": "slice"})
    atomic_write_text(output / "scores.csv", buffer.getvalue(), args.overwrite)
    if not args.no_slicer_files:
        from .io.slicer import write_slicer_files

        write_slicer_files(
            output / "slicer",
            num_classes=loaded.net.num_classes,
            class_names=loaded.class_names,
            overwrite=True,
        )
    for row in volume_rows:
        degree = "n/a" if row["calibrated_degree"] is None else f"{row['calibrated_degree']:.3f}"
        print(f"{row['input']}: image score {row['image_score']:.2f}, calibrated degree {degree}")
    print(f"maps and scores.csv/json written to {output}")
    return 0


# ---------------------------------------------------------------- evaluate


def _cmd_evaluate(args) -> int:
    from .evaluation import evaluate_checkpoint

    output = Path(args.output)
    if (output / "evaluation.json").exists() and not args.overwrite:
        raise FileExistsError(f"{output / 'evaluation.json'} exists; pass --overwrite to replace it")
    report = evaluate_checkpoint(
        args.checkpoint, cache_dir=args.cache_dir, device=args.device, seed=args.seed, plots=output / "plots"
    )
    atomic_write_text(output / "evaluation.json", json.dumps(report, indent=2), args.overwrite)
    for name, row in report["ood_sets"].items():
        print(
            f"{name:<32} {row['category']:<6}  AUROC {row['auroc']:.3f}  FPR@95TPR {row['fpr95']:.3f}  n={row['n']}"
        )
    for category, row in report["categories"].items():
        print(f"category {category:<6} mean AUROC {row['auroc']:.3f}  mean FPR@95TPR {row['fpr95']:.3f}")
    if report.get("localisation"):
        loc = report["localisation"]
        print(
            f"lesion localisation (A_xi inside the brain): pixel AUROC {loc['pixel_auroc']:.3f}, AUPRO {loc['aupro']:.3f}"
        )
    print(f"mean Dice (CSF/GM/WM) on the InD test set: {report['dice']['mean_foreground']:.3f}")
    print(f"written to {output / 'evaluation.json'} and {output / 'plots'}")
    return 0


# ---------------------------------------------------------------- parser


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (default: the embedded pool of four brains, axial slices)")
    group.add_argument(
        "--datalist", help="MONAI datalist JSON of image/label paths instead of the embedded data"
    )
    group.add_argument("--num-classes", type=int, default=4, help="classes in --datalist labels (default: 4)")
    group.add_argument(
        "--cache-dir",
        help="where the embedded data is built and cached (default: $MONAI_OOD_CACHE or ~/.cache/monai-ood)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monai-ood",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,calibrate,score,evaluate}")

    p = sub.add_parser(
        "train", help="train a segmentation network with the prototype OOD head, then calibrate it"
    )
    _add_data_arguments(p)
    p.add_argument(
        "--output", required=True, help="run folder: model.pt (best by validation Dice) and last.pt (resume)"
    )
    p.add_argument(
        "--preset",
        default="unet",
        help="network preset: unet, basic_unet, dynunet, segresnet, deeplabv3 (default: unet)",
    )
    p.add_argument(
        "--network-kwargs",
        type=json.loads,
        default={},
        help='JSON overrides of the network arguments, e.g. \'{"channels": [8, 16, 32], "strides": [2, 2]}\'',
    )
    p.add_argument(
        "--axis",
        choices=["axial", "coronal", "sagittal"],
        default="axial",
        help="slicing axis (default: axial)",
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs=2,
        default=(2.0, 2.0),
        metavar=("ROW", "COL"),
        help="in-plane spacing in mm (default: 2 2)",
    )
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(112, 96),
        metavar=("ROWS", "COLS"),
        help="slice size after centre crop/pad (default: 112 96)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=150,
        help="training epochs (default: 150, as in the paper; warm restarts end at 10, 30, 70, 150)",
    )
    p.add_argument(
        "--batch-size", type=int, default=8, help="InD images per step; as many outliers (default: 8)"
    )
    p.add_argument(
        "--head-channels", type=int, default=256, help="embedding size c_g of the head (default: 256)"
    )
    p.add_argument(
        "--lambda-out", type=float, default=0.1, help="weight of the outlier-exposure loss (default: 0.1)"
    )
    p.add_argument(
        "--head-config",
        choices=("default", "paper", "all"),
        default="default",
        help="the project's head (default: the paper's training + prototypes refitted + a Gaussian term), "
        "the paper's head exactly as published, or every lever (all); the options below override single levers",
    )
    on_off = {"true": True, "false": False}
    p.add_argument(
        "--extra-layers", type=int, default=None, help="multi-scale heads: extra finer encoder stages"
    )
    for flag, what in (
        ("global-head", "image-level prototype on pooled bottleneck features"),
        ("gaussian-term", "post-hoc Gaussian on pooled bottleneck features"),
        ("class-balanced", "class-balanced inlier term of L_out"),
        ("refit", "re-estimate the prototypes from training features after training"),
    ):
        p.add_argument(f"--{flag}", type=on_off.__getitem__, default=None, metavar="{true,false}", help=what)
    p.add_argument("--aggregation", choices=("mean", "quantile", "foreground"), default=None)
    p.add_argument("--select-by", choices=("dice", "last"), default=None, help="which epoch becomes model.pt")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    p.add_argument(
        "--num-workers", type=int, default=2, help="DataLoader workers making outliers (default: 2)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if OUTPUT holds a run")
    p.add_argument(
        "--no-calibrate", action="store_true", help="skip the Weibull calibration on the validation split"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "calibrate",
        help="fit the Weibull calibration of A on the validation split, store it in the checkpoint",
    )
    _add_data_arguments(p)
    p.add_argument("--checkpoint", required=True, help="model.pt written by `monai-ood train`")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser(
        "score",
        help="segment and score images: writes segmentation, A and A_xi at each input's geometry, and a score table",
        description="Inputs: NIfTI (.nii/.nii.gz), NRRD, MetaImage files, DICOM files or series folders, or folders of them; "
        "2D or 3D, any orientation and spacing. The checkpoint's preprocessing is applied; outputs are resampled back "
        "onto each input's own grid. Existing outputs are refused unless --overwrite; inputs are never overwritten.",
    )
    p.add_argument("inputs", nargs="+", help="image files, DICOM series folders, or folders of them")
    p.add_argument("--checkpoint", required=True, help="model.pt written by `monai-ood train`")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--format", choices=sorted(OUTPUT_SUFFIXES), default="nifti", help="map file format (default: nifti)"
    )
    p.add_argument(
        "--axis",
        choices=["axial", "coronal", "sagittal"],
        help="slicing axis for 2D models (default: the training axis)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="slices per forward pass / sliding-window batch (default: 16)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--no-slicer-files",
        action="store_true",
        help="do not write the 3D Slicer colour tables and loader script",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser(
        "evaluate",
        help="OOD detection (AUROC, FPR@95TPR per OOD set, lesion localisation) and Dice on the embedded "
        "benchmark data (the sets of benchmarks/run.py), with ROC and histogram plots",
    )
    p.add_argument("--checkpoint", required=True, help="model.pt written by `monai-ood train`")
    p.add_argument("--output", required=True, help="output folder for evaluation.json and plots/")
    p.add_argument(
        "--cache-dir", help="embedded data cache (default: $MONAI_OOD_CACHE or ~/.cache/monai-ood)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the test variants and artefacts (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing evaluation.json")
    p.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        # our epoch lines are the progress report where no bar can be drawn; ignite's per-run chatter is not
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
        logging.getLogger("monai_ood").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        # user errors: one clear line, no traceback
        print(f"monai-ood {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
