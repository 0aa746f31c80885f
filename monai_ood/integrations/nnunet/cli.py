"""``python -m monai_ood.integrations.nnunet``: the export line, the detector's fit and calibration, and
prediction with score maps.

::

    python -m monai_ood.integrations.nnunet env                      # prints: export nnUNet_extTrainer=...
    nnUNetv2_train 1 3d_fullres 0 -tr nnUNetTrainerPrototypeOOD      # nnU-Net's own command
    python -m monai_ood.integrations.nnunet predict -i imagesTs -o pred -d 1 -c 3d_fullres -f 0
    # -> pred/CASE.nii.gz (nnU-Net's), pred/ood/CASE_score.nii.gz, pred/ood/CASE_score_calibrated.nii.gz,
    #    pred/ood/ood_scores.csv; nnUNetv2_predict's flags (-num_parts/-part_id, --c, -chk, -npp/-nps, ...)
    python -m monai_ood.integrations.nnunet calibrate 1 3d_fullres 0  # again, e.g. for checkpoint_best.pth

Training fits the default detector and its calibration by itself; ``calibrate`` fits both again (the
calibration is bound to the detector and the weights), for a model whose fit failed, is missing or is
stale, or for another checkpoint (``-chk``). ``predict`` refuses a stale or older-format calibration in
one line.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import sys
from pathlib import Path

__all__ = ["export_line", "main", "trainer_folder"]

DEFAULT_TRAINER = "nnUNetTrainerPrototypeOOD"
SHELLS = ("sh", "fish", "powershell", "cmd")


def trainer_folder() -> Path:
    """The folder to put on ``nnUNet_extTrainer`` so that nnU-Net finds this package's trainers."""
    return Path(__file__).resolve().parent / "trainers"


def export_line(shell: str = "sh", current: str | None = None) -> str:
    """The shell line that adds :func:`trainer_folder` to ``nnUNet_extTrainer`` (keeping other folders on it).

    Args:
        shell: ``sh`` (bash, zsh), ``fish``, ``powershell`` or ``cmd``.
        current: the variable's current value (default: this process's environment).
    """
    if shell not in SHELLS:
        raise ValueError(f"shell must be one of {SHELLS}, got {shell!r}")
    current = os.environ.get("nnUNet_extTrainer", "") if current is None else current
    ours = str(trainer_folder())
    parts = [p for p in current.split(os.pathsep) if p.strip()]
    if not any(os.path.normpath(p) == os.path.normpath(ours) for p in parts):
        parts = [ours, *parts]
    value = os.pathsep.join(parts)
    if shell == "sh":
        return f"export nnUNet_extTrainer={shlex.quote(value)}"
    if shell == "fish":
        return f"set -gx nnUNet_extTrainer {shlex.quote(value)}"
    if shell == "powershell":
        return f'$env:nnUNet_extTrainer = "{value}"'
    return f"set nnUNet_extTrainer={value}"


def _device(name: str | None):
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"-device must be cpu, cuda or mps, got {name!r}")
    if name == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif name == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    return torch.device(name)


def _fold(value: str):
    return value if value == "all" else int(value)


def _processes_default(variable: str, default: int = 3) -> int:
    """``-npp`` / ``-nps`` defaults as nnUNetv2_predict's: the environment variable if it is an integer, else 3."""
    try:
        return int(os.environ.get(variable) or default)
    except ValueError:
        return default


def _calibrate(args: argparse.Namespace) -> int:
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from .calibration import calibration_path
    from .detector import detector_path
    from .predictor import find_trainer_class

    trainer_class = find_trainer_class(args.tr)
    if not hasattr(trainer_class, "fit_ood"):
        raise SystemExit(f"{args.tr} is not a prototype OOD trainer (no fit_ood)")
    dataset_name = maybe_convert_to_dataset_name(args.dataset_name_or_id)
    preprocessed = join(nnUNet_preprocessed, dataset_name)
    plans = load_json(join(preprocessed, args.p + ".json"))
    plans["continue_training"] = True  # nnU-Net >= 2.8 reads (and removes) this key
    trainer = trainer_class(
        plans=plans,
        configuration=args.configuration,
        fold=_fold(args.fold),
        dataset_json=load_json(join(preprocessed, "dataset.json")),
        device=_device(args.device),
    )
    checkpoint = join(trainer.output_folder, args.chk)
    if not os.path.isfile(checkpoint):
        raise SystemExit(f"no checkpoint {checkpoint!r}: train first (nnUNetv2_train ... -tr {args.tr})")
    trainer.initialize()
    trainer.load_checkpoint(checkpoint)
    try:
        detector, calibration = trainer.fit_ood(args.chk)
    except ValueError as error:
        raise SystemExit(f"fitting the OOD detector or its calibration failed: {error}") from error
    print(
        f"default detector on {detector.layers}: {detector_path(trainer.output_folder, args.chk)}\n"
        f"{calibration!r}\nwritten to {calibration_path(trainer.output_folder, args.chk)}"
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .predictor import nnUNetPrototypeOODPredictor

    if args.m is not None:
        model_folder = args.m
    else:
        if args.d is None or args.c is None:
            raise SystemExit(
                "give the model as -d DATASET -c CONFIGURATION [-tr ... -p ...] or -m MODEL_FOLDER"
            )
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
    if not os.path.isdir(model_folder):
        raise SystemExit(f"model folder {model_folder!r} does not exist")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise SystemExit(
            f"-part_id must lie in 0..{args.num_parts - 1} for -num_parts {args.num_parts}, got "
            f"{args.part_id} (nnU-Net's convention: part ids start at 0)"
        )
    predictor = nnUNetPrototypeOODPredictor(
        tile_step_size=args.step_size,
        use_gaussian=True,
        use_mirroring=not args.disable_tta,
        perform_everything_on_device=not args.not_on_device,
        device=_device(args.device),
        verbose=args.verbose,
        verbose_preprocessing=args.verbose,
        allow_tqdm=not args.disable_progress_bar,
        write_score_maps=not args.no_score_maps,
    )
    folds = None if args.f is None else [_fold(f) for f in args.f]
    try:
        predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=args.chk)
    except (FileNotFoundError, ValueError) as error:  # a missing detector, a stale calibration: one line
        raise SystemExit(str(error)) from error
    common = {
        "save_probabilities": args.save_probabilities,
        "overwrite": not args.continue_prediction,
        "folder_with_segs_from_prev_stage": args.prev_stage_predictions,
        "num_parts": args.num_parts,
        "part_id": args.part_id,
    }
    if args.npp == 0 and args.nps == 0:
        predictor.predict_from_files_sequential(args.i, args.o, **common)
    else:
        predictor.predict_from_files(
            args.i,
            args.o,
            num_processes_preprocessing=max(1, args.npp),
            num_processes_segmentation_export=max(1, args.nps),
            **common,
        )
    for row in predictor.ood_rows:
        degree = row["calibrated_degree"]
        degree = "n/a (no calibration)" if degree is None else f"{degree:.3f}"
        print(f"{row['case']}: image score {row['image_score']:.4g}, calibrated degree {degree}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m monai_ood.integrations.nnunet",
        description="The prototype OOD head and the default detector in nnU-Net v2: trainer discovery, "
        "the detector's fit and calibration, prediction with score maps. Train with nnU-Net's own command: nnUNetv2_train DATASET CONFIG FOLD -tr "
        f"{DEFAULT_TRAINER}.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="print the line that puts this package's trainers on nnUNet_extTrainer")
    env.add_argument("--shell", choices=SHELLS, default="sh", help="syntax of the line (default: sh)")
    env.add_argument("--path", action="store_true", help="print only the trainer folder")

    cal = sub.add_parser(
        "calibrate",
        help="fit the default detector on the fold's cases and its Weibull calibration on the validation "
        "cases, stored beside the checkpoint (ood_detector.pt, ood_calibration.json)",
    )
    cal.add_argument("dataset_name_or_id")
    cal.add_argument("configuration")
    cal.add_argument("fold", help="fold number or 'all'")
    cal.add_argument("-tr", default=DEFAULT_TRAINER, help=f"trainer class (default: {DEFAULT_TRAINER})")
    cal.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    cal.add_argument(
        "-chk", default="checkpoint_final.pth", help="checkpoint (default: checkpoint_final.pth)"
    )
    cal.add_argument("-device", default=None, help="cpu, cuda or mps (default: cuda if available)")

    pred = sub.add_parser(
        "predict",
        help="nnU-Net prediction plus ood/<case>_score.nii.gz (A) and ood/<case>_score_calibrated.nii.gz (A_xi)",
        description="Arguments as nnUNetv2_predict's, with its meanings and defaults (but -f defaults to the "
        "folds found and -device to cuda only where there is one; -m as nnUNetv2_predict_from_modelfolder's). "
        "Writes nnU-Net's "
        "segmentations into the output folder and, in its subfolder ood/, <case>_score.nii.gz (A) and "
        "<case>_score_calibrated.nii.gz (A_xi) at the input's geometry and ood_scores.csv/.json, so that "
        "nnUNetv2_evaluate_folder and nnUNetv2_apply_postprocessing see only the segmentations.",
    )
    pred.add_argument("-i", required=True, help="input folder (nnU-Net naming: CASE_0000.nii.gz, ...)")
    pred.add_argument("-o", required=True, help="output folder")
    pred.add_argument("-d", help="dataset name or id")
    pred.add_argument("-c", help="configuration, e.g. 3d_fullres")
    pred.add_argument("-tr", default=DEFAULT_TRAINER, help=f"trainer class (default: {DEFAULT_TRAINER})")
    pred.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    pred.add_argument("-m", help="model folder (instead of -d/-c/-tr/-p)")
    pred.add_argument("-f", nargs="+", help="folds (default: all folds found)")
    pred.add_argument(
        "-chk",
        default="checkpoint_final.pth",
        help="checkpoint of every fold; its detector and calibration are those fitted for it "
        "(ood_detector.pt / ood_calibration.json for checkpoint_final.pth, ood_detector_<name>.pt / "
        "ood_calibration_<name>.json otherwise). Default: checkpoint_final.pth",
    )
    pred.add_argument("-step_size", type=float, default=0.5, help="sliding-window tile step (default: 0.5)")
    pred.add_argument("--disable_tta", action="store_true", help="no mirroring for the segmentation")
    pred.add_argument("-device", default=None, help="cpu, cuda or mps (default: cuda if available)")
    pred.add_argument(
        "--not_on_device",
        action="store_true",
        help="nnU-Net's perform_everything_on_device off: the segmentation's sliding window accumulates in "
        "CPU memory (for cases larger than the GPU's memory); the maps always do",
    )
    npp, nps = _processes_default("nnUNet_npp"), _processes_default("nnUNet_nps")
    pred.add_argument(
        "-npp",
        type=int,
        default=npp,
        help=f"preprocessing processes; -npp 0 -nps 0 predicts sequentially, without worker processes. "
        f"Default: $nnUNet_npp, else 3 (here: {npp})",
    )
    pred.add_argument(
        "-nps",
        type=int,
        default=nps,
        help=f"segmentation export processes. Default: $nnUNet_nps, else 3 (here: {nps})",
    )
    pred.add_argument("-prev_stage_predictions", default=None, help="cascade: previous stage's predictions")
    pred.add_argument(
        "-num_parts",
        type=int,
        default=1,
        help="number of separate predict calls sharing the input folder (e.g. one per GPU or job). Default: 1",
    )
    pred.add_argument(
        "-part_id",
        type=int,
        default=0,
        help="which of the -num_parts calls this one is, 0 .. num_parts-1 (each takes every num_parts-th "
        "case; all write into the same -o and the same ood/ood_scores.csv). Default: 0",
    )
    pred.add_argument("--save_probabilities", action="store_true", help="also write nnU-Net's <case>.npz")
    pred.add_argument(
        "--continue_prediction",
        "--c",
        action="store_true",
        help="continue an aborted prediction: skip the cases whose segmentation (and .npz with "
        "--save_probabilities), ood/ maps and ood_scores.csv row all exist; predict the others",
    )
    pred.add_argument(
        "--no-score-maps",
        dest="no_score_maps",
        action="store_true",
        help="segmentations only, as nnUNetv2_predict",
    )
    pred.add_argument("--verbose", action="store_true")
    pred.add_argument("--disable_progress_bar", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "env":
        print(str(trainer_folder()) if args.path else export_line(args.shell))
        return 0
    if args.command == "calibrate":
        return _calibrate(args)
    return _predict(args)


if __name__ == "__main__":
    sys.exit(main())
