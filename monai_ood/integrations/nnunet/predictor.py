"""``nnUNetPrototypeOODPredictor``: nnU-Net's predictor that also writes the default detector's maps.

Segmentations are nnU-Net's own (same preprocessing, sliding window, mirroring, export). For every case
written to ``<output>/<case><file_ending>`` the predictor adds, at the input's geometry, in the subfolder
``<output>/ood/`` (so that nnU-Net's own tools, which take every ``*<file_ending>`` of a prediction
folder for a case, ``nnUNetv2_evaluate_folder`` and ``nnUNetv2_apply_postprocessing``, see only the
segmentations):

* ``ood/<case>_score.nii.gz``: ``A(x)``, the map of the fold's default detector
  (:class:`~monai_ood.detectors.FusedDetector`, stored as ``fold_<f>/ood_detector.pt``: its map terms,
  each divided by its validation median, so about 1 on typical tissue; float32);
* ``ood/<case>_score_calibrated.nii.gz``: ``A_xi = WeibullCDF(A)`` in ``[0, 1]`` with the calibration
  stored beside the checkpoint (``fold_<f>/ood_calibration.json``); skipped, with a warning, if there is
  none; a calibration of another format, map or weights is refused in one line;
* ``ood/ood_scores.csv`` (and ``.json``): per case, ``image_score`` (the mean of the detector's fused
  image scores over nnU-Net's tiles of the case, as ``monai-ood score`` averages a 3D volume's windows;
  higher = more atypical) and ``calibrated_degree`` (the mean of ``A_xi`` on nnU-Net's preprocessed grid).
  The table is updated after every case, under a lock, keeping the rows of other cases whose maps are in
  the folder: jobs that split a folder (``num_parts`` / ``part_id``) and continued runs
  (``overwrite=False``) all end up in one table.

With ``overwrite=False`` a case counts as done, and is skipped, only when its segmentation (and ``.npz``
with ``save_probabilities``), its maps and its table row are all there.

With several folds, each fold's map and image score are computed with its weights and its detector, each
map calibrated with the fold's own calibration, then maps and scores are averaged (as nnU-Net averages
the folds' logits; each fold's detector chooses its own fusion rule, so compare image scores of cases
predicted with the same folds). The detector runs on nnU-Net's tiles without mirroring
(:mod:`~monai_ood.integrations.nnunet.sliding_window`). Outside nnU-Net's non-zero crop, where its
segmentation is background, the maps are 0.

Use it as ``nnUNetPredictor`` (``initialize_from_trained_model_folder`` + ``predict_from_files`` or
``predict_from_files_sequential``), or from the shell: ``python -m monai_ood.integrations.nnunet predict``.
For arrays (``predict_from_list_of_npy_arrays``, ``ofile`` ``None``) the maps are kept in
:attr:`nnUNetPrototypeOODPredictor.ood_maps` instead of being written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import join, load_json, save_json
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.export_prediction import (
    convert_predicted_logits_to_segmentation_with_correct_shape,
    export_prediction_from_logits,
)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import empty_cache
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.label_handling.label_handling import (
    convert_labelmap_to_one_hot,
    determine_num_input_channels,
)
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch._dynamo import OptimizedModule

from ...calibration import Calibration
from ...detectors.fused import FusedDetector
from ...engines.checkpoint import load_detector
from ...files import atomic_write_text, lock_folder
from .calibration import calibration_path, load_calibration
from .detector import DEFAULT_CHECKPOINT, detector_path
from .geometry import map_to_input_image, map_to_original_array, write_map
from .sliding_window import score_case

__all__ = [
    "OOD_FOLDER",
    "find_trainer_class",
    "nnUNetPrototypeOODPredictor",
    "ood_map_path",
    "read_ood_table",
]

#: the subfolder of a prediction folder that holds the maps and the table
OOD_FOLDER = "ood"
SCORE_SUFFIX = "_score"
CALIBRATED_SUFFIX = "_score_calibrated"
MAP_FILE_ENDING = ".nii.gz"
TABLE_NAME = "ood_scores"
TABLE_COLUMNS = ["case", "image_score", "calibrated_degree", "score_map", "calibrated_map"]
#: held while a table is read and rewritten (jobs of one folder update it one after the other)
TABLE_LOCK = f".{TABLE_NAME}.lock"
_SUFFIXES = {"score": SCORE_SUFFIX, "calibrated": CALIBRATED_SUFFIX}


def ood_map_path(truncated_output_file: str | os.PathLike, name: str = "score") -> Path:
    """Where the map ``name`` (``"score"`` for ``A``, ``"calibrated"`` for ``A_xi``) of the case whose
    segmentation is ``<truncated_output_file><file_ending>`` goes: ``<folder>/ood/<case>_score.nii.gz``."""
    path = Path(truncated_output_file)
    return path.parent / OOD_FOLDER / f"{path.name}{_SUFFIXES[name]}{MAP_FILE_ENDING}"


def read_ood_table(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The rows of ``<folder>/ood_scores.json`` by case (``folder`` is the ``ood/`` subfolder); ``{}``
    without one, and, with a warning, for a file that is not such a table (it is then rewritten)."""
    path = Path(folder) / f"{TABLE_NAME}.json"
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return {str(row["case"]): dict(row) for row in rows}
    except (ValueError, KeyError, TypeError) as error:
        warnings.warn(f"{str(path)!r} is not an OOD score table ({error}); it is written anew", stacklevel=2)
        return {}


def _find_in_folder(folder: str, name: str):
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    try:
        return recursive_find_python_class(
            folder, name, None, base_folder=folder, cleanup_imports_from_base_folder=True
        )
    except TypeError:  # nnU-Net versions without import clean-up
        return recursive_find_python_class(folder, name, None, base_folder=folder)


def find_trainer_class(name: str) -> type:
    """The trainer class called ``name``: this package's, then ``nnUNet_extTrainer``'s folders, then nnU-Net's.

    nnU-Net's own lookup imports every trainer module it ships before it reads ``nnUNet_extTrainer``;
    looking here first finds this package's trainers (and yours on ``nnUNet_extTrainer``) without that.

    Raises:
        RuntimeError: if no trainer of that name exists (nnU-Net's message).
    """
    from . import trainer as ours

    found = getattr(ours, name, None)
    if isinstance(found, type) and issubclass(found, nnUNetTrainer):
        return found
    for folder in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep):
        if folder.strip() and os.path.isdir(folder):
            found = _find_in_folder(folder, name)
            if found is not None:
                return found
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    return recursive_find_trainer_class_by_name(name)


class nnUNetPrototypeOODPredictor(nnUNetPredictor):  # noqa: N801 (nnU-Net's naming)
    """``nnUNetPredictor`` that writes ``A`` and ``A_xi`` beside the segmentations (see the module docstring).

    Args:
        *args, **kwargs: ``nnUNetPredictor``'s (``tile_step_size``, ``use_mirroring``, ``device``, ...).
        write_score_maps: ``False`` predicts segmentations only, exactly as ``nnUNetPredictor``.

    Attributes:
        detectors: the default detector of every fold (:class:`~monai_ood.detectors.FusedDetector`).
        calibrations: one :class:`~monai_ood.calibration.Calibration` (or ``None``) per fold.
        ood_rows: the per-case table of the last prediction.
        ood_maps: maps of cases predicted without an output file, at the input geometry:
            ``{"score": array, "calibrated": array or None}`` per case, in order.
    """

    def __init__(self, *args, write_score_maps: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.write_score_maps = write_score_maps
        self.detectors: list[FusedDetector] = []
        self.calibrations: list[Calibration | None] = []
        self.ood_rows: list[dict[str, Any]] = []
        self.ood_maps: list[dict[str, np.ndarray | None]] = []
        self._inputs_of_output: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ set-up

    def initialize_from_trained_model_folder(
        self,
        model_training_output_dir: str,
        use_folds: tuple[int | str, ...] | list | str | None,
        checkpoint_name: str = DEFAULT_CHECKPOINT,
    ) -> None:
        """As ``nnUNetPredictor``'s, finding the trainer with :func:`find_trainer_class`, and loading each
        fold's default detector and calibration.

        Raises:
            FileNotFoundError: no checkpoint, or (with ``write_score_maps``) no detector for a fold.
            ValueError: a detector that does not fit the network, or a calibration of another format,
                map or weights (one line each, naming the command that fits them again).
        """
        if use_folds is None:
            use_folds = nnUNetPredictor.auto_detect_available_folds(
                model_training_output_dir, checkpoint_name
            )
        if isinstance(use_folds, (str, int)):
            use_folds = [use_folds]
        use_folds = [f if f == "all" else int(f) for f in use_folds]
        if not use_folds:
            raise FileNotFoundError(f"no fold_*/{checkpoint_name} in {model_training_output_dir!r}")
        dataset_json = load_json(join(model_training_output_dir, "dataset.json"))
        plans_manager = PlansManager(load_json(join(model_training_output_dir, "plans.json")))

        parameters = []
        for i, fold in enumerate(use_folds):
            checkpoint = torch.load(
                join(model_training_output_dir, f"fold_{fold}", checkpoint_name),
                map_location=torch.device("cpu"),
                weights_only=False,
            )
            if i == 0:
                trainer_name = checkpoint["trainer_name"]
                configuration_name = checkpoint["init_args"]["configuration"]
                mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes")
            parameters.append(checkpoint["network_weights"])

        configuration_manager = plans_manager.get_configuration(configuration_name)
        trainer_class = find_trainer_class(trainer_name)
        network = trainer_class.build_network_architecture(
            plans_manager,
            configuration_manager,
            determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
            enable_deep_supervision=False,
        )
        if self.write_score_maps and not hasattr(network, "ood"):
            raise ValueError(
                f"{trainer_name} does not build a network with the prototype OOD head; train with "
                "nnUNetTrainerPrototypeOOD (or a subclass) to get score maps"
            )
        network.load_state_dict(parameters[0])
        self.manual_initialization(
            network,
            plans_manager,
            configuration_manager,
            parameters,
            dataset_json,
            trainer_name,
            mirroring_axes,
        )
        self.detectors, self.calibrations = [], []
        if not self.write_score_maps:
            return

        def remedy(fold) -> str:
            return (
                f"python -m monai_ood.integrations.nnunet calibrate {plans_manager.dataset_name} "
                f"{configuration_name} {fold} -tr {trainer_name} -p {plans_manager.plans_name} "
                f"-chk {checkpoint_name}"
            )

        for fold, weights in zip(use_folds, parameters, strict=True):
            folder = join(model_training_output_dir, f"fold_{fold}")
            path = detector_path(folder, checkpoint_name)
            if not path.is_file():
                raise FileNotFoundError(
                    f"fold {fold} has no default detector ({path.name}), needed for score maps: fit it with "
                    f"{remedy(fold)} (or predict with --no-score-maps)"
                )
            try:
                detector = load_detector(path, network)
            except ValueError as error:
                message = " ".join(str(error).split())  # one line
                raise ValueError(f"{message}: fit it again with {remedy(fold)}") from error
            self.detectors.append(detector)
            self.calibrations.append(
                load_calibration(calibration_path(folder, checkpoint_name), weights, detector, remedy(fold))
            )
        missing = [f for f, c in zip(use_folds, self.calibrations, strict=True) if c is None]
        if missing:
            warnings.warn(
                f"no OOD calibration for fold(s) {missing} ({calibration_path('fold_X', checkpoint_name).name}): "
                f"writing raw score maps only; calibrate with: {remedy(missing[0] if len(missing) == 1 else 'FOLD')}",
                stacklevel=2,
            )

    def ood_network(self):
        """The prototype network without a ``torch.compile`` wrapper."""
        return self.network._orig_mod if isinstance(self.network, OptimizedModule) else self.network

    # ------------------------------------------------------------------ score maps

    def predict_ood_maps(self, data: torch.Tensor | np.ndarray) -> dict[str, Any]:
        """``A``, ``A_xi`` and the image score of one preprocessed case on the preprocessed grid,
        averaged over the folds.

        Returns:
            ``{"score": (*spatial) float32 tensor, "calibrated": same or None, "image_score": float}``
            (``calibrated`` is ``None`` unless every fold has a calibration).

        Raises:
            RuntimeError: if the detectors were not loaded (``write_score_maps=False``).
        """
        parameters = self.list_of_parameters or [None]
        if len(self.detectors) != len(parameters):
            raise RuntimeError(
                "the predictor has no detectors for its folds: initialise it with write_score_maps=True"
            )
        self.ood_network().to(self.device)  # maps come before nnU-Net moves the network
        calibrations = (
            self.calibrations if len(self.calibrations) == len(parameters) else [None] * len(parameters)
        )
        scores, calibrated, image_scores = [], [], []
        for params, detector, calibration in zip(parameters, self.detectors, calibrations, strict=True):
            if params is not None:
                self.ood_network().load_state_dict(params)
            case = score_case(
                detector, data, self.configuration_manager.patch_size, self.tile_step_size, self.use_gaussian
            )
            scores.append(case.score_map)
            image_scores.append(case.image_score)
            calibrated.append(calibration.transform(case.score_map) if calibration is not None else None)
        out: dict[str, Any] = {
            "score": torch.stack(scores).mean(0),
            "calibrated": None,
            "image_score": float(np.mean(image_scores)),
        }
        if all(c is not None for c in calibrated):
            out["calibrated"] = torch.stack(calibrated).mean(0)
        return out

    def export_ood_maps(
        self,
        data: torch.Tensor | np.ndarray,
        properties: dict,
        ofile: str | None,
        input_files: list[str] | None = None,
    ) -> dict[str, Any]:
        """Compute the maps of one preprocessed case, write them beside ``ofile`` (or keep them) and return its row."""
        out = self.predict_ood_maps(data)
        maps = {"score": out["score"], "calibrated": out["calibrated"]}
        row: dict[str, Any] = {
            "case": os.path.basename(ofile) if ofile is not None else str(len(self.ood_maps)),
            "image_score": out["image_score"],
            "calibrated_degree": float(maps["calibrated"].mean()) if maps["calibrated"] is not None else None,
        }
        # back on the input's grid; clipped, since a higher-order resampling can overshoot the ranges
        upper = {"score": None, "calibrated": 1.0}
        originals = {
            name: np.clip(
                map_to_original_array(value, properties, self.plans_manager, self.configuration_manager),
                0.0,
                upper[name],
            )
            for name, value in maps.items()
            if value is not None
        }
        if ofile is None:
            self.ood_maps.append({"score": originals["score"], "calibrated": originals.get("calibrated")})
            return row
        reference = input_files[0] if input_files else None
        notes = {
            "score": "monai-ood A(x): default detector map",
            "calibrated": "monai-ood A_xi: Weibull CDF of A",
        }
        for name, array in originals.items():
            image = map_to_input_image(array, properties, self.plans_manager.image_reader_writer_class)
            target = ood_map_path(ofile, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            row[f"{name}_map"] = str(write_map(image, target, reference, notes[name]))
        return row

    def map_names(self) -> list[str]:
        """The maps every case gets: ``["score"]``, plus ``"calibrated"`` when every fold has a calibration."""
        calibrated = bool(self.calibrations) and all(c is not None for c in self.calibrations)
        return ["score", "calibrated"] if calibrated else ["score"]

    def _with_score_maps(self, data_iterator: Iterable[dict]) -> Iterator[dict]:
        for item in data_iterator:
            data = item["data"]
            if isinstance(data, str):  # nnU-Net hands large cases over as temporary .npy files
                path = data
                data = torch.from_numpy(np.load(path))
                os.remove(path)
            ofile = item.get("ofile")
            row = self.export_ood_maps(
                data, item["data_properties"], ofile, self._inputs_of_output.get(ofile) if ofile else None
            )
            self._record(row)
            yield {**item, "data": data}

    def _record(self, row: dict[str, Any]) -> None:
        """Keep a case's row and, for a case written to a folder, put it in that folder's table."""
        self.ood_rows.append(row)
        if "score_map" not in row:
            return
        folder = Path(row["score_map"]).parent
        with lock_folder(folder, TABLE_LOCK, wait=600.0):
            rows = read_ood_table(folder)
            rows[row["case"]] = row
            # the rows of other cases stay while their maps do (other jobs, earlier runs)
            rows = {
                case: rows[case]
                for case in sorted(rows)
                if (folder / f"{case}{SCORE_SUFFIX}{MAP_FILE_ENDING}").is_file()
            }
            text = io.StringIO()
            writer = csv.DictWriter(
                text, fieldnames=TABLE_COLUMNS, extrasaction="ignore", lineterminator="\n"
            )
            writer.writeheader()
            writer.writerows(rows.values())
            atomic_write_text(folder / f"{TABLE_NAME}.csv", text.getvalue(), overwrite=True)
            atomic_write_text(
                folder / f"{TABLE_NAME}.json",
                json.dumps(list(rows.values()), indent=2, allow_nan=False) + "\n",
                overwrite=True,
            )

    # ------------------------------------------------------------------ nnU-Net's entry points

    def _is_done(self, ofile: str, save_probabilities: bool, tables: dict[Path, dict]) -> bool:
        """Whether a case has all its outputs: segmentation (and ``.npz``), maps and table row."""
        files = [Path(ofile + self.dataset_json["file_ending"])]
        if save_probabilities:
            files.append(Path(ofile + ".npz"))
        if not self.write_score_maps:
            return all(f.is_file() for f in files)
        files += [ood_map_path(ofile, name) for name in self.map_names()]
        folder = ood_map_path(ofile).parent
        if folder not in tables:
            tables[folder] = read_ood_table(folder)
        return all(f.is_file() for f in files) and os.path.basename(ofile) in tables[folder]

    def _manage_input_and_output_lists(
        self,
        list_of_lists_or_source_folder,
        output_folder_or_list_of_truncated_output_files,
        folder_with_segs_from_prev_stage: str | None = None,
        overwrite: bool = True,
        part_id: int = 0,
        num_parts: int = 1,
        save_probabilities: bool = False,
    ):
        """nnU-Net's case lists (this part's share of them), where ``overwrite=False`` skips a case only when
        its segmentation, its maps and its table row are all there."""
        lists, outputs, segs = super()._manage_input_and_output_lists(
            list_of_lists_or_source_folder,
            output_folder_or_list_of_truncated_output_files,
            folder_with_segs_from_prev_stage,
            True,
            part_id,
            num_parts,
            save_probabilities,
        )
        if not overwrite and outputs is not None:
            tables: dict[Path, dict] = {}
            todo = [
                i for i, ofile in enumerate(outputs) if not self._is_done(ofile, save_probabilities, tables)
            ]
            what = "segmentation, OOD maps and table row" if self.write_score_maps else "segmentation"
            print(
                f"continuing: {len(outputs) - len(todo)} of {len(outputs)} cases have their {what} already; "
                f"predicting the other {len(todo)}"
            )
            lists, outputs = [lists[i] for i in todo], [outputs[i] for i in todo]
            segs = [segs[i] for i in todo] if segs is not None else None
        if outputs is not None:
            self._inputs_of_output.update(dict(zip(outputs, lists, strict=True)))
        return lists, outputs, segs

    def predict_from_files(
        self,
        list_of_lists_or_source_folder,
        output_folder_or_list_of_truncated_output_files,
        save_probabilities: bool = False,
        overwrite: bool = True,
        num_processes_preprocessing: int = default_num_processes,
        num_processes_segmentation_export: int = default_num_processes,
        folder_with_segs_from_prev_stage: str | None = None,
        num_parts: int = 1,
        part_id: int = 0,
    ):
        """nnU-Net's ``predict_from_files`` (its arguments, by the same names: nnU-Net records them from
        this signature); each case's maps and table row are written before its segmentation is exported."""
        self.ood_rows, self.ood_maps = [], []
        return super().predict_from_files(
            list_of_lists_or_source_folder,
            output_folder_or_list_of_truncated_output_files,
            save_probabilities,
            overwrite,
            num_processes_preprocessing,
            num_processes_segmentation_export,
            folder_with_segs_from_prev_stage,
            num_parts,
            part_id,
        )

    def predict_from_data_iterator(
        self,
        data_iterator,
        save_probabilities: bool = False,
        num_processes_segmentation_export: int = default_num_processes,
    ):
        """nnU-Net's prediction loop; each case's maps are written before its segmentation is exported."""
        if not self.write_score_maps:
            return super().predict_from_data_iterator(
                data_iterator, save_probabilities, num_processes_segmentation_export
            )
        self.ood_rows, self.ood_maps = [], []
        result = super().predict_from_data_iterator(
            self._with_score_maps(data_iterator), save_probabilities, num_processes_segmentation_export
        )
        if isinstance(data_iterator, MultiThreadedAugmenter):
            data_iterator._finish()
        return result

    def predict_from_files_sequential(
        self,
        list_of_lists_or_source_folder,
        output_folder_or_list_of_truncated_output_files,
        save_probabilities: bool = False,
        overwrite: bool = True,
        folder_with_segs_from_prev_stage: str | None = None,
        num_parts: int = 1,
        part_id: int = 0,
    ):
        """nnU-Net's sequential prediction (no worker processes), each case's maps and table row right
        after its segmentation, from the same preprocessing.

        nnU-Net's steps, in its order (its argument, ``dataset.json`` and ``plans.json`` files, the cascade
        check, the case lists, preprocessing, logits, export); ``num_parts`` / ``part_id`` split the cases
        as in ``predict_from_files`` (nnU-Net's sequential prediction has no such arguments).

        Returns:
            As nnU-Net's: the segmentations of cases without an output file, else ``[]``.
        """
        arguments = deepcopy({k: v for k, v in locals().items() if k != "self"})
        target = output_folder_or_list_of_truncated_output_files
        if isinstance(target, str):
            output_folder = target
        elif isinstance(target, list) and target:
            output_folder = os.path.dirname(target[0]) or os.curdir
        else:
            output_folder = None
        if output_folder is not None:
            # what was used to make the predictions, and what nnU-Net's postprocessing reads back
            os.makedirs(output_folder, exist_ok=True)
            recursive_fix_for_json_export(arguments)
            save_json(arguments, join(output_folder, "predict_from_raw_data_args.json"))
            save_json(self.dataset_json, join(output_folder, "dataset.json"), sort_keys=False)
            save_json(self.plans_manager.plans, join(output_folder, "plans.json"), sort_keys=False)
        if (
            self.configuration_manager.previous_stage_name is not None
            and folder_with_segs_from_prev_stage is None
        ):
            raise ValueError(
                "the configuration is a cascade: give the previous stage's "
                f"({self.configuration_manager.previous_stage_name}) predictions as folder_with_segs_from_prev_stage"
            )
        self.ood_rows, self.ood_maps = [], []
        lists, outputs, segs = self._manage_input_and_output_lists(
            list_of_lists_or_source_folder,
            target,
            folder_with_segs_from_prev_stage,
            overwrite,
            part_id,
            num_parts,
            save_probabilities,
        )
        preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose)
        outputs = outputs if outputs is not None else [None] * len(lists)
        segs = segs if segs is not None else [None] * len(lists)
        segmentations = []
        for files, ofile, seg_file in zip(lists, outputs, segs, strict=True):
            data, seg, properties = preprocessor.run_case(
                files, seg_file, self.plans_manager, self.configuration_manager, self.dataset_json
            )
            if folder_with_segs_from_prev_stage is not None:
                one_hot = convert_labelmap_to_one_hot(
                    seg[0], self.label_manager.foreground_labels, data.dtype
                )
                data = np.vstack((data, one_hot))
            data = torch.from_numpy(data)
            logits = self.predict_logits_from_preprocessed_data(data).cpu()
            if ofile is not None:
                export_prediction_from_logits(
                    logits,
                    properties,
                    self.configuration_manager,
                    self.plans_manager,
                    self.dataset_json,
                    ofile,
                    save_probabilities,
                )
            else:
                segmentations.append(
                    convert_predicted_logits_to_segmentation_with_correct_shape(
                        logits,
                        self.plans_manager,
                        self.configuration_manager,
                        self.label_manager,
                        properties,
                        save_probabilities,
                    )
                )
            if self.write_score_maps:
                self._record(self.export_ood_maps(data, properties, ofile, files))
        compute_gaussian.cache_clear()
        empty_cache(self.device)
        return segmentations
