"""``monai-ood`` command line: train, fit, calibrate, score, triage, evaluate.

Examples::

    monai-ood train --output runs/brain                      # embedded pool of four brains (axial slices)
    monai-ood train --datalist data.json --output runs/mine  # your MONAI datalist
    monai-ood fit --checkpoint weights.pt --network segresnet --output fitted/model.pt  # post hoc, no retraining
    monai-ood calibrate --checkpoint runs/brain/model.pt     # (train and fit do this already)
    monai-ood score --checkpoint runs/brain/model.pt scan.nii.gz dicom_folder/ --output scores/
    monai-ood score --checkpoint runs/brain/model.pt scans/ --output scores/ --resume  # finish or extend a batch
    monai-ood triage scans/ --checkpoint runs/brain/model.pt -o triage/ --threshold 0.95  # rank, HTML report
    monai-ood evaluate --checkpoint runs/brain/model.pt --output eval/
    monai-ood evaluate --checkpoint runs/brain/model.pt -o eval/ --ind ind_scans/ --ood ct=ct_scans/:C1

Exit status (every command): 0 done; 1 score / triage went through every input but some failed (their
rows in scores.csv say why); 2 a usage or environment error, in one line on stderr (bad arguments, a
missing or unreadable file, outputs already there, a folder that cannot be written); 130 interrupted.

Output lines: on a terminal, progress bars; otherwise (a log file, a batch job) every line starts with
its local time (YYYY-MM-DD HH:MM:SS) and progress comes as one line per image or epoch.
MONAI_OOD_LOG_TIMESTAMPS=always|never|auto (default auto) overrides the choice.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from .files import (
    LOCK_NAME,
    atomic_write,
    atomic_write_text,
    check_writable,
    lock_folder,
    remove_temporaries,
    temporary_target,
)

__all__ = ["main", "build_parser"]

OUTPUT_SUFFIXES = {"nifti": ".nii.gz", "nrrd": ".nrrd", "dicom": ".dcm"}
# exit status (`monai-ood score --help` explains them to users)
EXIT_FAILED_INPUTS = 1  # score went through every input, some failed: their rows say status=failed
EXIT_ERROR = 2  # a usage or environment error stopped the command, reported in one line on stderr
EXIT_INTERRUPTED = 130  # Ctrl-C
LOG_TIMESTAMPS_ENV = "MONAI_OOD_LOG_TIMESTAMPS"


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


def _check_classes_present(train_items, num_classes: int, datalist: str) -> None:
    """Refuse a --num-classes that the training labels do not use: a class absent from every training
    label cannot be learned (values above it were refused file by file while reading)."""
    import numpy as np

    labels = [np.unique(item["label"]) for item in train_items if item.get("label") is not None]
    if not labels:
        return  # no labels at all: the training refuses that itself
    present = sorted(int(v) for v in np.unique(np.concatenate(labels)))
    absent = [k for k in range(num_classes) if k not in present]
    if not absent:
        return
    largest = max(present)
    if all(k > largest for k in absent):
        fix = f"pass --num-classes {largest + 1} (background included) if the labels are complete"
    else:
        fix = "number the classes 0, 1, 2 ... without gaps, or add training images labelled with the missing ones"
    raise ValueError(
        f"--num-classes {num_classes}, but class(es) {absent} appear in no training label of {datalist!r} "
        f"(on the model's slicing grid the training labels hold {present}): a class absent from every "
        f"training label cannot be learned; {fix}"
    )


def _cmd_train(args) -> int:
    from .benchmark.pool import CLASS_NAMES as BRAIN_CLASS_NAMES
    from .engines.calibration import calibrate
    from .engines.training import TrainingConfig, train
    from .preprocessing import SlicePreprocessing

    if not args.datalist and args.num_classes != len(BRAIN_CLASS_NAMES):
        raise ValueError(
            f"--num-classes {args.num_classes} applies to --datalist labels; the embedded brain data has "
            f"{len(BRAIN_CLASS_NAMES)} classes ({', '.join(BRAIN_CLASS_NAMES)}): drop --num-classes, or "
            "give your own data with --datalist"
        )
    output = Path(args.output)
    preprocessing = SlicePreprocessing(axis=args.axis, spacing=args.spacing, size=args.size)
    config = TrainingConfig(
        preset=args.preset,
        network_kwargs=args.network_kwargs,
        head_channels=args.head_channels,
        head_kwargs=args.head_kwargs,
        lambda_out=args.lambda_out,
        batch_size=args.batch_size,
        max_epochs=args.epochs,
        learning_rate=args.lr,
        num_workers=args.num_workers,
        seed=args.seed,
        device=args.device,
        head_config=args.head_config,
        num_classes=args.num_classes if args.datalist else None,
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
    if args.datalist:
        _check_classes_present(train_items, args.num_classes, args.datalist)
    val_items = _load_items(args, "validation", preprocessing)
    class_names = list(BRAIN_CLASS_NAMES) if not args.datalist else None
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
    if args.detector == "fused":
        from .engines.posthoc import fit_detector

        detector = fit_detector(
            result.best_checkpoint, train_items, val_items, seed=args.seed, device=args.device
        )
        print(
            f"default detector fitted: {len(detector.terms)} terms on {len(detector.layers)} layers; image "
            f"score {detector.selection_.get('chosen', detector.fusion_)!r} (chosen on outliers synthesised "
            "from the validation split)"
        )
    if not args.no_calibrate:
        calibrator = calibrate(result.best_checkpoint, val_items, device=args.device)
        print(
            f"calibrated on the validation split: Weibull shape={calibrator.shape:.3f} scale={calibrator.scale:.3f}"
        )
    print(f"model: {result.best_checkpoint}")
    return 0


# ---------------------------------------------------------------- fit


def _state_dict_in(data, source: str) -> dict:
    """The network weights in a loaded file: a plain state dict, or one under a usual key."""
    import torch

    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return data
    for key in ("state_dict", "model", "network", "net"):
        inner = data.get(key) if isinstance(data, dict) else None
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    raise ValueError(
        f"{source!r} holds no network weights: expected a state dict (or one under 'state_dict', 'model', "
        "'network' or 'net')"
    )


def _cmd_fit(args) -> int:
    import shutil

    import torch

    from .engines.calibration import calibrate
    from .engines.checkpoint import MODEL_FORMAT, build_network, load_model, make_model_config, save_model
    from .engines.posthoc import fit_detector
    from .preprocessing import SlicePreprocessing

    source = Path(args.checkpoint)
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(source)!r}")
    try:
        data = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged or foreign file fails in many ways
        raise ValueError(f"{str(source)!r} cannot be read with torch.load(weights_only=True): {err}") from err
    output = Path(args.output) if args.output else source
    if isinstance(data, dict) and data.get("format") == MODEL_FORMAT:
        if args.network:
            raise ValueError(f"{str(source)!r} is a monai-ood model: --network is only for plain weights")
        preprocessing = load_model(source, device="cpu").preprocessing
        if output != source:
            if output.exists() and not args.overwrite:
                raise FileExistsError(f"{str(output)!r} exists: pass --overwrite or another --output")
            output.parent.mkdir(parents=True, exist_ok=True)
            check_writable(output.parent)
            # the project's atomic write: a killed copy never leaves a half model.pt behind
            atomic_write(output, lambda temporary: shutil.copyfile(source, temporary), overwrite=True)
    else:
        if not args.network:
            raise ValueError(
                f"{str(source)!r} is not a monai-ood model: give the architecture of its weights with "
                "--network (and --network-kwargs, --num-classes, --in-channels)"
            )
        if args.output is None or output.resolve() == source.resolve():
            raise ValueError("--output is required for plain weights (the input is never overwritten)")
        if output.exists() and not args.overwrite:
            raise FileExistsError(f"{str(output)!r} exists: pass --overwrite or another --output")
        state = _state_dict_in(data, str(source))
        config = make_model_config(
            args.network, 2, args.in_channels, args.num_classes, args.head_channels, args.network_kwargs
        )
        net = build_network(config)
        try:
            net.backbone.load_state_dict(state)
        except RuntimeError as err:
            first = " ".join(str(err).split())[:400]
            raise ValueError(
                f"the weights in {str(source)!r} do not fit {args.network!r} with {args.network_kwargs or {}}, "
                f"{args.in_channels} input channel(s) and {args.num_classes} classes: {first}"
            ) from err
        preprocessing = SlicePreprocessing(axis=args.axis, spacing=args.spacing, size=args.size)
        output.parent.mkdir(parents=True, exist_ok=True)
        save_model(
            output,
            net,
            config,
            preprocessing,
            metrics={"weights": str(source), "head": "not trained (the fused detector scores)"},
        )
    train_items = _load_items(args, "train", preprocessing)
    val_items = _load_items(args, "validation", preprocessing)
    print(
        f"fitting the default detector on {len(train_items)} training and {len(val_items)} validation images"
    )
    detector = fit_detector(
        output,
        train_items,
        val_items,
        layers=args.layers,
        fusion=args.fusion,
        seed=args.seed,
        device=args.device,
    )
    print(
        f"terms: {', '.join(detector.term_names)}; image score "
        f"{detector.selection_.get('chosen', detector.fusion_)!r}"
    )
    if not args.no_calibrate:
        calibrator = calibrate(output, val_items, device=args.device)
        print(f"calibrated: Weibull shape={calibrator.shape:.3f} scale={calibrator.scale:.3f}")
    print(f"model: {output}")
    return 0


# ---------------------------------------------------------------- errors


_OS_HINTS = {
    errno.ENOSPC: "free some disk space",
    getattr(errno, "EDQUOT", -1): "free some of your disk quota",
    errno.EROFS: "the file system is read-only; choose a folder on a writable one",
    errno.EACCES: "check the permissions, or choose a folder you can write in",
    errno.EPERM: "check the permissions, or choose a folder you can write in",
}


def _error_line(error: BaseException) -> str:
    """An error as one line for a user: what happened, to which file, and what to do where that is known.

    Operating-system errors name the file a temporary name stood for (``scan_seg.nii.gz``, not
    ``.scan_seg.0123456789ab.tmp.nii.gz``).
    """
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
        if error.filename is not None:
            path = Path(os.fsdecode(error.filename))
            target = temporary_target(path.name)
            text += f": {str(path.with_name(target) if target else path)!r}"
        if error.errno in _OS_HINTS:
            text += f"; {_OS_HINTS[error.errno]}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


# ---------------------------------------------------------------- calibrate


def _cmd_calibrate(args) -> int:
    from .engines.calibration import calibrate
    from .engines.checkpoint import load_model

    checkpoint = Path(args.checkpoint)
    preprocessing = load_model(checkpoint, device="cpu").preprocessing
    try:  # before the fit: the calibration is stored in the checkpoint, rewritten in its folder
        check_writable(checkpoint.parent)
    except OSError as error:
        raise OSError(
            f"cannot store the calibration in {str(checkpoint)!r}: its folder is not writable "
            f"({error.strerror}); copy the checkpoint into a writable folder and calibrate the copy"
        ) from error
    calibrator = calibrate(checkpoint, _load_items(args, "validation", preprocessing), device=args.device)
    print(f"Weibull shape={calibrator.shape:.4f} scale={calibrator.scale:.4f} stored in {checkpoint}")
    return 0


# ---------------------------------------------------------------- score

FIT_DESCRIPTION = """\
Fit the default detector on a trained segmentation network without retraining it: channel statistics
of every encoder stage, class prototypes on the shallow stages (labels of the training split; the
network's own prediction where there are none) and a coarse intensity histogram, standardised on the
validation split and fused by the rule that best separates outliers synthesised from the validation
images. Then the fused map is calibrated. The result is a model.pt that `calibrate`, `score` and
`evaluate` read.

  monai-ood fit --checkpoint runs/brain/model.pt                       # refit a monai-ood model
  monai-ood fit --checkpoint weights.pt --network segresnet \\
      --network-kwargs '{"init_filters": 8}' --num-classes 4 --output fitted/model.pt"""

SCORE_DESCRIPTION = """\
Segment and score images. Inputs: NIfTI (.nii/.nii.gz), NRRD, MetaImage files, DICOM files or series
folders, or folders of them; 2D or 3D, any orientation and spacing. The checkpoint's preprocessing is
applied; outputs are resampled back onto each input's own grid. Inputs are never overwritten.

A batch keeps going past a bad input: scores.csv / scores.json list every input with its status (ok,
failed with the error, skipped = not scored yet) and are rewritten after each one. An input's maps are
written together (all or none), so after a crash or a kill the folder holds complete sets only, and
--resume finishes the run. Existing outputs are refused unless --resume or --overwrite; one run at a
time writes into a folder (a second one is refused: OUTPUT/.monai-ood.lock)."""
SCORE_EPILOG = """\
exit status:
  0    every input scored (with --resume: or kept from an earlier run)
  1    the run went through every input but some failed: their rows say status=failed with the
       error, the other inputs are scored; fix those inputs and re-run with --resume
  2    a usage or environment error stopped the run, in one line on stderr: bad arguments, a missing
       input or checkpoint, an output folder that cannot be written, outputs already there (without
       --resume or --overwrite), another run writing into the folder. Found before any work where it
       can be; if the folder stops taking writes mid-run (disk full, read-only), the inputs done keep
       their maps and rows, the rest are status=skipped: fix it and re-run with --resume
  130  interrupted (Ctrl-C): as for 2, re-run with --resume"""
_NOT_SCORED = "not scored yet: the run stopped before this input (or is still running); re-run with --resume"
# what an input or its environment can cause: one line in the table; anything else is a bug (traceback)
_INPUT_ERRORS = (ValueError, OSError, RuntimeError, MemoryError)


def _same_input(recorded: str, path: Path) -> bool:
    if recorded == str(path):
        return True
    try:
        return Path(recorded).resolve() == path.resolve() or os.path.samefile(recorded, path)
    except OSError:
        return False


def _header_problem(path: Path, channels: int = 1) -> str | None:
    """Why an input file cannot be scored by a model of ``channels`` input channels, if its header alone
    tells (cheap: no voxels are read)."""
    import SimpleITK as sitk

    from .io import read_image

    if not path.is_file():
        return None  # DICOM series folders are checked when read
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        try:
            read_image(path)  # fails as fast, with the message that says which formats are read
        except (ValueError, OSError) as error:
            return _error_line(error)
        return None
    size = list(reader.GetSize())
    while len(size) > 3 and size[-1] == 1:
        size.pop()
    if len(size) > 3:
        return (
            f"{str(path)!r} is a {len(size)}D image of size {tuple(size)} (several volumes or channels "
            "along its 4th axis); monai-ood scores 2D or 3D images: split it into one file per volume"
        )
    components = reader.GetNumberOfComponents()
    if components != channels:
        return (
            f"{str(path)!r} has {components} channels (components per voxel) but the model takes "
            f"{channels}: give one channel per file (e.g. split the channels, or convert a colour image "
            "to grey)"
        )
    return None


def _prepare_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a file; give a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        check_writable(output)
    except OSError as error:
        raise OSError(
            f"cannot create or write in the output folder {str(output)!r} ({error.strerror or error}); "
            "choose a writable --output folder"
        ) from error


class _Stopped(Exception):
    """The output folder stopped taking writes (disk full, read-only ...): the batch cannot go on."""

    def __init__(self, path: Path, error: OSError, done: int, total: int) -> None:
        super().__init__(
            f"cannot write the outputs of {str(path)!r}: {_error_line(error)}; then re-run with --resume "
            f"to finish ({done} of {total} inputs scored in this run, the rest are status=skipped)"
        )


def _cmd_score(args) -> int:
    from dataclasses import replace

    from tqdm import tqdm

    from .engines.checkpoint import load_model
    from .inference import score_image
    from .io import find_inputs, output_stem, read_image
    from .io.tables import TABLE_LOCK, ScoreTable, merge_parts, part_name, volume_row
    from .preprocessing import SlicePreprocessing

    num_parts, part_id = _score_part(args)
    sources = [*args.inputs, *args.more_inputs]
    if not sources:
        raise ValueError("no input given: name image files or folders (positionally or with -i)")
    every_input = [p for path in sources for p in find_inputs(path)]
    if args.format == "dicom":
        _check_dicom_inputs(every_input, Path(args.output))
    loaded = load_model(args.checkpoint, device=args.device)
    preprocessing = loaded.preprocessing
    if args.axis:
        if not isinstance(preprocessing, SlicePreprocessing):
            raise ValueError("--axis applies to 2D models only")
        preprocessing = replace(preprocessing, axis=args.axis)
    if loaded.calibration_error is not None:
        # a stale calibration would make A_xi of the wrong scale: refuse rather than skip it silently
        raise ValueError(loaded.calibration_error.replace("calibrate again", "run `monai-ood calibrate`"))
    if loaded.calibrator is None:
        print("note: the checkpoint has no calibration; A_xi maps are skipped (run `monai-ood calibrate`)")
    output = Path(args.output)
    suffix = OUTPUT_SUFFIXES[args.format]
    stems = {path: output_stem(path) for path in every_input}
    if len(set(stems.values())) != len(stems) or len(stems) != len(every_input):
        raise ValueError("two inputs have the same name stem; score them into different --output folders")
    # a split run (--num-parts, or torchrun's ranks): every part sees the same inputs and takes every
    # num_parts-th one, so no input is scored twice and none is left out
    inputs = every_input[part_id::num_parts]
    stems = {path: stems[path] for path in inputs}
    planned = {}
    for path, stem in stems.items():
        names = {"segmentation": f"{stem}_seg{suffix}", "score_map": f"{stem}_score{suffix}"}
        if args.format == "dicom":
            del names["score_map"]  # A_xi and the segmentation only: DICOM SEG + Parametric Map
        if loaded.calibrator is not None:
            names["calibrated_map"] = f"{stem}_score_calibrated{suffix}"
        planned[path] = {key: output / name for key, name in names.items()}
    split = num_parts > 1
    table = ScoreTable(output, part_name(part_id, num_parts) if split else "scores")
    # refuse before any work: a half-done output folder helps no one
    targets = [t for paths in planned.values() for t in paths.values()] + [table.csv_path, table.json_path]
    input_paths = {Path(p).resolve() for p in inputs}
    for target in targets:
        if target.resolve() in input_paths:
            raise ValueError(f"refusing to write onto an input: {target}")
    _prepare_output(output)
    lock_name = f".monai-ood.part-{part_id}-of-{num_parts}.lock" if split else LOCK_NAME

    def write_table() -> None:
        table.write()
        if split:  # the merged table of every part's rows so far
            with lock_folder(output, TABLE_LOCK, wait=60.0):
                merge_parts(output, num_parts)

    with lock_folder(output, lock_name):
        if not (args.resume or args.overwrite):
            existing = [t for t in targets if t.exists()]
            if existing:
                more = f" (and {len(existing) - 1} more outputs)" if len(existing) > 1 else ""
                raise FileExistsError(
                    f"{existing[0]} exists{more}; pass --resume to keep complete outputs and score the "
                    "rest, or --overwrite to replace them"
                )
        # a killed run's temporary files: no one else writes here while we hold the lock
        remove_temporaries(output, {t.name for t in targets})
        if part_id == 0:  # the slicer files are part 0's
            remove_temporaries(output / "slicer")
        table.read(strict=args.resume)
        todo = []
        for path in inputs:
            stem, paths = stems[path], planned[path]
            row = table.rows.get(stem)
            if row is not None and args.resume and not _same_input(row["input"], path):
                raise FileExistsError(
                    f"{paths['segmentation']} and the other outputs named {stem!r} are those of "
                    f"{row['input']!r}, not of {str(path)!r}; pass --overwrite to replace them, or choose "
                    "another --output folder"
                )
            if args.resume and row is not None and row["status"] == "ok":
                if all(p.exists() for p in paths.values()):
                    continue  # complete: kept as it is
            if row is None or row["status"] == "ok" or not _same_input(row["input"], path):
                # no longer ok before its maps are touched; a failed row stays until the retry's outcome
                table.set(stem, volume_row(path, "skipped", paths, _NOT_SCORED))
            todo.append(path)

        def fail(path: Path, message: str) -> None:
            table.set(stems[path], volume_row(path, "failed", planned[path], message))
            shown = message if str(path) in message else f"{str(path)!r}: {message}"
            tqdm.write(f"monai-ood score: failed: {shown}", file=sys.stderr)

        channels = int(loaded.model_config["in_channels"])
        problems = {path: _header_problem(path, channels) for path in todo}
        for path, problem in problems.items():
            if problem is not None:
                fail(path, problem)
        # Slicer loads DICOM outputs through its DICOM module, not the loader script of NIfTI maps
        if not args.no_slicer_files and part_id == 0 and args.format != "dicom":
            from .io.slicer import write_slicer_files

            write_slicer_files(
                output / "slicer",
                num_classes=loaded.net.num_classes,
                class_names=loaded.class_names,
                overwrite=True,
            )
        write_table()

        failed_early = {path for path in todo if problems.get(path)}
        todo = [path for path in todo if path not in failed_early]
        done = 0

        def save(path: Path) -> None:
            try:
                write_table()
            except OSError as error:
                raise _Stopped(path, error, done, len(todo)) from error

        try:
            # a bar on a terminal; in a log, one line per image (tqdm's carriage returns would fill it)
            lines = not args.quiet and not sys.stderr.isatty()
            for index, path in enumerate(tqdm(todo, desc="score", unit="image", disable=args.quiet or lines)):
                if lines:
                    print(f"score: {index + 1}/{len(todo)} {path}", flush=True)
                stem, paths = stems[path], planned[path]
                try:
                    scored = score_image(
                        loaded.net,
                        read_image(path),
                        preprocessing,
                        loaded.calibrator,
                        args.batch_size,
                        loaded.detector,
                        loaded.degree,
                    )
                except _INPUT_ERRORS as error:
                    fail(path, _error_line(error))
                    save(path)
                    continue
                except Exception as error:  # a bug rather than the input: the traceback helps report it
                    traceback.print_exc()
                    fail(path, f"{type(error).__name__}: {error}")
                    save(path)
                    continue
                try:
                    if args.format == "dicom":
                        from .io.dicom_output import write_dicom_outputs

                        write_dicom_outputs(scored, paths, path, loaded.class_names, loaded.net.num_classes)
                    else:
                        scored.write(paths, path if path.is_file() else None)
                except ValueError as error:  # the maps do not fit the input (write_image's checks)
                    fail(path, _error_line(error))
                    save(path)
                    continue
                except OSError as error:  # the folder takes no more writes: every later input would fail too
                    table.set(stem, volume_row(path, "failed", paths, _error_line(error)))
                    with contextlib.suppress(OSError):
                        write_table()
                    raise _Stopped(path, error, done, len(todo)) from error
                slices = [{"input": str(path), **row} for row in scored.slices]
                table.set(stem, volume_row(path, "ok", paths, scored=scored), slices)
                save(path)
                done += 1
        except _Stopped as stop:
            print(f"monai-ood score: error: {stop}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print(
                f"monai-ood score: interrupted after scoring {done} of {len(todo)} inputs; those listed as ok "
                f"in {table.csv_path} are complete: re-run with --resume to score the rest",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED

    rows = [table.rows[stems[path]] for path in inputs]
    for row in rows:
        if row["status"] == "ok":
            degree = "n/a" if row["calibrated_degree"] is None else f"{row['calibrated_degree']:.3f}"
            ood = "" if row.get("ood_degree") is None else f", OOD degree {row['ood_degree']:.3f}"
            print(f"{row['input']}: image score {row['image_score']:.2f}{ood}, calibrated degree {degree}")
        else:
            print(f"{row['input']}: {row['status']}")
    failed = sum(row["status"] != "ok" for row in rows)
    print(f"maps and scores.csv/json written to {output}")
    if failed:
        print(
            f"monai-ood score: {failed} of {len(rows)} inputs failed (see the status and error columns of "
            f"{table.csv_path}); fix them and re-run with --resume to score only those",
            file=sys.stderr,
        )
        return EXIT_FAILED_INPUTS
    return 0


def _check_dicom_inputs(inputs: Sequence[Path], output: Path) -> None:
    """Refuse --format dicom before any work for inputs that are not DICOM (no study or patient to
    reference) and for an output folder that is an input series folder (the outputs would join it)."""
    from .io.dicom_output import is_dicom_input

    others = [path for path in inputs if not is_dicom_input(path)]
    if others:
        names = ", ".join(repr(str(path)) for path in others[:3]) + (
            f" and {len(others) - 3} more" if len(others) > 3 else ""
        )
        raise ValueError(
            f"--format dicom writes DICOM SEG and Parametric Map objects that belong to their input's DICOM "
            f"study and series; {len(others)} input(s) are not DICOM: {names}. Score those with --format "
            "nifti (or nrrd) into another --output folder"
        )
    for path in inputs:
        if path.is_dir() and path.resolve() == output.resolve():
            raise ValueError(
                f"--output {str(output)!r} is the input series folder: the DICOM outputs would join the "
                "series; choose another --output folder"
            )


def _score_part(args) -> tuple[int, int]:
    """``(num_parts, part_id)`` of this run: the flags, else torchrun's ``WORLD_SIZE`` / ``RANK``, else one
    part."""
    num_parts, part_id = args.num_parts, args.part_id
    if num_parts is None and part_id is None and os.environ.get("WORLD_SIZE", "1").isdigit():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            return world, int(os.environ.get("RANK", "0"))
    num_parts = 1 if num_parts is None else num_parts
    part_id = 0 if part_id is None else part_id
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(
            f"--part-id must lie in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_id} "
            "(nnU-Net's convention: part ids start at 0)"
        )
    return num_parts, part_id


TRIAGE_DESCRIPTION = """\
Score every scan (exactly as `score` does, into the same OUTPUT: maps, scores.csv/json; re-runs resume),
then rank the scans worst first by their OOD degree (the fraction of validation images that score
lower; the image score when the model has no degree) and write OUTPUT/triage.csv and
OUTPUT/triage.html: one row per scan with a thumbnail of its most atypical slice (A_xi over the image),
the degree, the image score, the segmentation's foreground volume, the input's path and geometry, and
a line at --threshold. The report is one self-contained file (images inline), viewable offline."""


def _cmd_triage(args) -> int:
    from .triage import write_triage

    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold is an OOD degree in [0, 1], got {args.threshold}")
    args.resume = args.resume or not args.overwrite  # a triage re-run keeps what is scored
    code = _cmd_score(args)
    if code not in (0, EXIT_FAILED_INPUTS):
        return code
    csv_path, html_path, rows = write_triage(Path(args.output), args.threshold)
    flagged = sum(row["flagged"] for row in rows)
    print(f"triage: {len(rows)} scans ranked, {flagged} at or above OOD degree {args.threshold}: {html_path}")
    return code


# ---------------------------------------------------------------- evaluate


def _prepare_evaluation_output(args) -> Path:
    """The output folder of `evaluate`, refused before any work (an evaluation takes minutes) when it
    holds a report (without --overwrite) or plots/ is a file; created and checked writable."""
    output = Path(args.output)
    if (output / "evaluation.json").exists() and not args.overwrite:
        raise FileExistsError(f"{output / 'evaluation.json'} exists; pass --overwrite to replace it")
    if (output / "plots").exists() and not (output / "plots").is_dir():
        raise ValueError(f"{str(output / 'plots')!r} is a file, not a folder; choose another --output")
    _prepare_output(output)
    return output


def _cmd_evaluate(args) -> int:
    """Both modes take the same path after scoring: one report (evaluation.json), its markdown table
    (evaluation.md, printed) and the same plots; the embedded benchmark adds its severity, failure,
    localisation and Dice rows."""
    from .evaluation import evaluate_checkpoint, evaluate_folders, parse_ood_set

    if args.ind is not None or args.ood or args.labels:
        if args.ind is None or not args.ood:
            raise ValueError("evaluating your own data needs --ind and at least one --ood")
        ood_sets = [parse_ood_set(text) for text in args.ood]
        for source in [args.ind, *[path for _, path, _ in ood_sets], *([args.labels] if args.labels else [])]:
            if not Path(source).exists():
                raise FileNotFoundError(f"not found: {source}")
    output = _prepare_evaluation_output(args)
    if args.ind is not None:
        report = evaluate_folders(
            args.checkpoint,
            args.ind,
            ood_sets,
            labels=args.labels,
            device=args.device,
            batch_size=args.batch_size,
            plots=output / "plots",
        )
    else:
        report = evaluate_checkpoint(
            args.checkpoint,
            cache_dir=args.cache_dir,
            device=args.device,
            seed=args.seed,
            plots=output / "plots",
        )
    return _write_evaluation(report, output, args.overwrite)


def _write_evaluation(report: dict, output: Path, overwrite: bool) -> int:
    from .evaluation import evaluation_markdown

    atomic_write_text(output / "evaluation.json", json.dumps(report, indent=2), overwrite)
    markdown = evaluation_markdown(report)
    atomic_write_text(output / "evaluation.md", markdown, overwrite=True)
    print(markdown, end="")
    for row in report.get("failed", []):
        print(f"monai-ood evaluate: not scored: {row['input']}: {row['error']}", file=sys.stderr)
    print(f"written to {output / 'evaluation.json'}, {output / 'evaluation.md'} and {output / 'plots'}")
    return 0


# ---------------------------------------------------------------- parser


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (default: the embedded pool of four brains, axial slices)")
    group.add_argument(
        "--datalist", help="MONAI datalist JSON of image/label paths instead of the embedded data"
    )
    group.add_argument(
        "--num-classes",
        type=int,
        default=4,
        help="classes in --datalist labels, background included (default: 4); train builds a model of "
        "this many classes and refuses labels that use more or fewer",
    )
    group.add_argument(
        "--cache-dir",
        help="where the embedded data is built and cached (default: $MONAI_OOD_CACHE or ~/.cache/monai-ood)",
    )


def _add_slicing_arguments(parser: argparse.ArgumentParser, whose: str = "") -> None:
    """--axis, --spacing, --size: how a 2D model's slices are made (train, and fit on plain weights)."""
    parser.add_argument(
        "--axis",
        choices=["axial", "coronal", "sagittal"],
        default="axial",
        help=f"slicing axis{whose} (default: axial)",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=2,
        default=(2.0, 2.0),
        metavar=("ROW", "COL"),
        help=f"in-plane spacing{whose} in mm (default: 2 2)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(112, 96),
        metavar=("ROWS", "COLS"),
        help=f"slice size{whose} after centre crop/pad (default: 112 96; SwinUNETR: multiples of 32)",
    )


def _add_score_arguments(p: argparse.ArgumentParser, formats: Sequence[str] = tuple(OUTPUT_SUFFIXES)) -> None:
    """The arguments of `score`, shared by `triage` (which scores first; it reads NIfTI/NRRD maps back)."""
    p.add_argument("inputs", nargs="*", help="image files, DICOM series folders, or folders of them")
    p.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        dest="more_inputs",
        metavar="INPUT",
        help="an input as -i (nnU-Net's and TotalSegmentator's spelling; repeatable, with or instead of "
        "the positional inputs)",
    )
    p.add_argument("--checkpoint", required=True, help="model.pt written by `monai-ood train`")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument(
        "--format",
        choices=sorted(formats),
        default="nifti",
        help="output file format (default: nifti)"
        + (
            "; dicom (DICOM inputs only): the segmentation as DICOM SEG and A_xi as a DICOM Parametric "
            "Map, NAME_seg.dcm and NAME_score_calibrated.dcm, in the input's study, referencing its series"
            if "dicom" in formats
            else ""
        ),
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
    existing = p.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="keep the inputs already scored into OUTPUT (complete maps, status ok) and score the rest: "
        "finishes an interrupted run, retries failed inputs, adds new ones",
    )
    existing.add_argument(
        "--overwrite", action="store_true", help="score every input again, replacing outputs"
    )
    p.add_argument(
        "--no-slicer-files",
        action="store_true",
        help="do not write the 3D Slicer colour tables and loader script",
    )
    p.add_argument(
        "--num-parts",
        type=int,
        default=None,
        help="split the inputs over this many runs (jobs, GPUs) into one OUTPUT: each part scores every "
        "num-parts-th input and writes scores.part-K-of-N.json; every part keeps the merged "
        "scores.csv/json up to date. Under torchrun the ranks are the parts (default: 1)",
    )
    p.add_argument(
        "--part-id",
        type=int,
        default=None,
        help="which part this run is, 0 .. num-parts - 1 (default: 0, or torchrun's RANK)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monai-ood",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"monai-ood {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{train,fit,calibrate,score,triage,evaluate}"
    )

    p = sub.add_parser(
        "train",
        help="train a segmentation network with the prototype OOD head, fit the default detector, calibrate",
    )
    _add_data_arguments(p)
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="run folder: model.pt (best by validation Dice) and last.pt (resume)",
    )
    p.add_argument(
        "--preset",
        default="unet",
        help="network preset: unet, basic_unet, dynunet, segresnet, swinunetr, deeplabv3 (default: unet)",
    )
    p.add_argument(
        "--network-kwargs",
        type=json.loads,
        default={},
        help='JSON overrides of the network arguments, e.g. \'{"channels": [8, 16, 32], "strides": [2, 2]}\'',
    )
    _add_slicing_arguments(p)
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
        "--head-kwargs",
        type=json.loads,
        default={},
        help="JSON of further options of the prototype head (PrototypeOODNet): layer, head_act, "
        'outlier_norm, global_grid, quantile; e.g. \'{"outlier_norm": "batch", "quantile": 0.95}\'',
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
        "--detector",
        choices=("fused", "head"),
        default="fused",
        help="what scores: the default fused detector fitted after training (multi-depth terms, see "
        "`monai-ood fit`), or the prototype head alone (default: fused)",
    )
    p.add_argument(
        "--no-calibrate", action="store_true", help="skip the Weibull calibration on the validation split"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "fit",
        help="fit the default detector post hoc on a trained network (no retraining), then calibrate",
        description=FIT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_arguments(p)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a monai-ood model.pt (the detector is refitted), or plain weights of a MONAI network "
        "(a state dict, e.g. a bundle's models/model.pt; needs --network)",
    )
    p.add_argument("-o", "--output", help="model.pt to write (default: the monai-ood checkpoint itself)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument(
        "--network",
        help="architecture of plain weights: unet, basic_unet, dynunet, segresnet, swinunetr, deeplabv3",
    )
    p.add_argument(
        "--network-kwargs",
        type=json.loads,
        default={},
        help="JSON arguments of the network, as it was built, e.g. '{\"init_filters\": 8}'",
    )
    p.add_argument("--in-channels", type=int, default=1, help="input channels of plain weights (default: 1)")
    p.add_argument(
        "--head-channels",
        type=int,
        default=16,
        help="embedding size of the (untrained, unused) prototype head stored with plain weights (default: 16)",
    )
    p.add_argument(
        "--layers",
        nargs="+",
        help="module names of the stages to read, shallow to deep (default: the network's encoder stages)",
    )
    p.add_argument(
        "--fusion",
        choices=("auto", "sum", "max", "hazard"),
        default="auto",
        help="how the terms are fused (default: auto, chosen on outliers synthesised from validation)",
    )
    _add_slicing_arguments(p, " of plain weights")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the warps and selection outliers (default: 0)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--no-calibrate", action="store_true", help="skip the Weibull calibration of the map")
    p.set_defaults(func=_cmd_fit)

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
        description=SCORE_DESCRIPTION,
        epilog=SCORE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_score_arguments(p)
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser(
        "triage",
        help="score every scan and rank them by OOD degree: triage.csv and an offline HTML report",
        description=TRIAGE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_score_arguments(p, formats=("nifti", "nrrd"))  # triage reads the maps back for its thumbnails
    p.add_argument(
        "--threshold",
        type=float,
        default=0.95,
        help="OOD degree from which a scan is flagged for review (a line in the report; default: 0.95, "
        "more atypical than 95%% of validation images)",
    )
    p.set_defaults(func=_cmd_triage)

    p = sub.add_parser(
        "evaluate",
        help="OOD detection (AUROC, FPR@95TPR, AUPR per OOD set) on your own InD and OOD folders (--ind, "
        "--ood), or on the embedded benchmark data (the sets of benchmarks/run.py, with lesion "
        "localisation and Dice), with ROC and histogram plots",
    )
    p.add_argument("--checkpoint", required=True, help="model.pt written by `monai-ood train`")
    p.add_argument(
        "-o", "--output", required=True, help="output folder for evaluation.json, evaluation.md and plots/"
    )
    p.add_argument(
        "--ind",
        help="your in-distribution images: a folder, a file or a MONAI datalist JSON (without it: the "
        "embedded benchmark)",
    )
    p.add_argument(
        "--ood",
        action="append",
        default=[],
        metavar="[NAME=]FOLDER[:CATEGORY]",
        help="an OOD set (repeat for several): a folder (or file, datalist), optionally named and given a "
        "category, e.g. --ood ct=scans/ct:modality; sets of one category are averaged",
    )
    p.add_argument(
        "--labels",
        help="a folder of label volumes named like the images: adds failure detection (AURC of the "
        "image score against 1 - Dice)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (default: 16)")
    p.add_argument(
        "--cache-dir", help="embedded data cache (default: $MONAI_OOD_CACHE or ~/.cache/monai-ood)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the test variants and artefacts (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing evaluation.json")
    p.set_defaults(func=_cmd_evaluate)
    return parser


class _TimestampedLines:
    """A text stream that starts every line written through it with the local time, for logs."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._line_start = True

    def write(self, text: str) -> int:
        import time

        pieces = []
        for piece in str(text).splitlines(keepends=True):
            if self._line_start and piece.strip():
                pieces.append(time.strftime("%Y-%m-%d %H:%M:%S ") + piece)
            else:
                pieces.append(piece)
            self._line_start = piece.endswith(("\n", "\r"))
        return self._stream.write("".join(pieces))

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):  # flush, fileno, encoding, ...
        return getattr(self._stream, name)


def log_timestamps(stream=None) -> bool:
    """Whether output lines get a timestamp: ``$MONAI_OOD_LOG_TIMESTAMPS`` = ``always`` / ``never``, else
    (``auto``) when ``stream`` (stdout) is not a terminal."""
    mode = os.environ.get(LOG_TIMESTAMPS_ENV, "auto").strip().lower()
    if mode in ("always", "1", "yes", "true"):
        return True
    if mode in ("never", "0", "no", "false"):
        return False
    stream = sys.stdout if stream is None else stream
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    parser = build_parser()
    args = parser.parse_args(argv)
    stamped = log_timestamps()
    streams = sys.stdout, sys.stderr
    if stamped:
        sys.stdout, sys.stderr = _TimestampedLines(sys.stdout), _TimestampedLines(sys.stderr)
    handler = None
    if not logging.getLogger().handlers:
        # our epoch lines are the progress report where no bar can be drawn; ignite's per-run chatter is not
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))  # the stream adds the time
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("monai_ood").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:
        # user errors (missing or unreadable files, existing outputs, a full disk, a read-only folder,
        # a folder another run is writing into): one clear line, no traceback
        print(f"monai-ood {args.command}: error: {_error_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"monai-ood {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        sys.stdout, sys.stderr = streams
        if handler is not None:
            logging.getLogger().removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
