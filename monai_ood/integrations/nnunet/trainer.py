"""``nnUNetTrainerPrototypeOOD``: nnU-Net's trainer with the auxiliary prototype OOD head of Cho et al. (2023).

What changes against ``nnUNetTrainer`` (everything else, plans, data augmentation, deep supervision,
loss, optimiser, schedule, checkpoints, validation, is nnU-Net's own):

* **Network** (:meth:`~PrototypeOODTrainerMixin.build_network_architecture`): the planned network wrapped
  in :class:`~monai_ood.integrations.nnunet.network.nnUNetPrototypeOODNet`, the projection head and the
  K prototypes on the encoder's last stage. The predictor rebuilds the same wrapper from the checkpoint.
* **Outliers**: the training and validation pipelines end with :class:`OutlierChannels`, which turns the
  augmented patch into an outlier with :class:`~monai_ood.transforms.OutlierSynthesis` (180° rotation,
  flip, jigsaw, swap, gamma or elastic, one at random) in nnU-Net's data-augmentation workers, and ships
  it as extra channels of ``batch["data"]``; the train step splits them off again.
* **Loss**: nnU-Net's loss (Dice + CE over the deep-supervision outputs) ``+ ood_lambda * L_out`` (paper
  eq. 8, :class:`~monai_ood.losses.OutlierExposureLoss`), labels brought to the feature grid by majority
  vote; voxels with nnU-Net's ignore label are left out of ``L_out``. Outliers only pass the encoder.
* **Logging**: ``train_ood_losses`` and ``val_ood_losses`` (``L_out`` per epoch) are registered with
  nnU-Net's logger and written to the training log beside nnU-Net's losses (which stay the
  segmentation loss, so ``progress.png`` reads as usual).
* **Default detector and calibration** (:meth:`~PrototypeOODTrainerMixin.fit_ood`): at the end of
  training the project's default detector (:class:`~monai_ood.detectors.FusedDetector`, terms on the
  encoder stages ``encoder.stages.<i>``) is fitted on patches of the fold's preprocessed training cases
  (standardisation and fusion choice on patches of its validation cases;
  :mod:`~monai_ood.integrations.nnunet.detector`) and stored as ``fold_<f>/ood_detector.pt``; the
  Weibull calibration of its map on the validation cases' sliding-window tiles is stored as
  ``fold_<f>/ood_calibration.json`` (:class:`monai_ood.calibration.Calibration`), both beside
  ``checkpoint_final.pth``. The trained head is what shapes the encoder the detector reads; the
  predictor writes the detector's map.
* **Pretrained weights** (``nnUNetv2_train ... -pretrained_weights FILE``): a checkpoint of nnU-Net's own
  trainer loads into the wrapper's ``backbone.*``, the head left initialised
  (:mod:`~monai_ood.integrations.nnunet.pretrained`; ``initialize`` routes nnU-Net's loader there for
  this network), with one line in the training log of what was loaded and what was not.
* ``torch.compile`` is not used (the head works through forward hooks and encoder-only passes).

Region-based training (``regions_class_order``) is not supported: prototypes are per class.

Change a setting by subclassing, the nnU-Net way (put the file in a folder on ``nnUNet_extTrainer``)::

    class nnUNetTrainerPrototypeOOD_c64(nnUNetTrainerPrototypeOOD):
        ood_head_channels = 64

or combine the head with another trainer variant with the mixin::

    class MyTrainer(PrototypeOODTrainerMixin, nnUNetTrainerNoMirroring):
        pass
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
from torch import autocast
from torch import distributed as dist
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from ...calibration import Calibration
from ...detectors.fused import SELECTION_OPS, FusedDetector
from ...engines.checkpoint import save_detector
from ...losses import OutlierExposureLoss, labels_to_feature_grid, log_prob_inclusion
from ...transforms.outlier_synthesis import PAPER_OPS, OutlierSynthesis
from .calibration import calibration_path, fit_calibration
from .detector import DEFAULT_CHECKPOINT, deep_supervision_off, detector_path, fit_detector, sample_patches
from .network import nnUNetPrototypeOODNet
from .pretrained import PretrainedWeights, load_pretrained_weights, route_nnunet_loader

__all__ = ["OutlierChannels", "PrototypeOODTrainerMixin", "masked_inlier_term", "nnUNetTrainerPrototypeOOD"]

OOD_LOG_KEYS = ("train_ood_losses", "val_ood_losses")


class OutlierChannels(BasicTransform):
    """Append an outlier made from the sample's own (augmented) image as extra channels.

    A batchgeneratorsv2 transform for the end of nnU-Net's pipelines: ``image`` ``(C, *patch)`` becomes
    ``(2C, *patch)``, the first ``C`` channels unchanged, the last ``C`` the outlier. nnU-Net's data
    loader keeps only ``image`` and ``segmentation``, so the outlier travels inside ``image``.

    Each worker process reseeds the synthesis from NumPy's global generator (which nnU-Net's background
    workers seed one by one) the first time it runs, so the workers do not all draw the same outliers.

    Args:
        synthesis: the outlier transform; defaults to all six operations of the paper.
    """

    def __init__(self, synthesis: OutlierSynthesis | None = None) -> None:
        super().__init__()
        self.synthesis = synthesis if synthesis is not None else OutlierSynthesis()
        self._seeded_in: int | None = None

    def apply(self, data_dict: dict, **params) -> dict:
        image = data_dict.get("image")
        if image is None:
            return data_dict
        if self._seeded_in != os.getpid():
            self.synthesis.set_random_state(seed=int(np.random.randint(0, 2**31 - 1)))
            self._seeded_in = os.getpid()
        outlier = torch.as_tensor(self.synthesis(image), dtype=image.dtype)
        data_dict["image"] = torch.cat([image, outlier], dim=0)
        return data_dict


def masked_inlier_term(
    distances: torch.Tensor, labels: torch.Tensor, ignore_label: int, num_dims: int
) -> torch.Tensor:
    """The InD term of ``L_out`` (paper eq. 8) without the voxels labelled ``ignore_label``.

    The ignore label takes part in the majority vote that brings labels to the feature grid as one more
    class; feature cells it wins are left out of each image's mean, and images without any other cell
    are left out of the batch mean.

    Args:
        distances: ``(B, K, *S)`` distances to the K prototypes.
        labels: ``(B, 1, *spatial)`` class indices in ``[0, K)`` or ``ignore_label``.
        ignore_label: nnU-Net's ignore label.
        num_dims: chi-square degrees of freedom (the embedding size).
    """
    num_classes = distances.shape[1]
    labels = labels.long()
    labels = torch.where(labels == ignore_label, torch.full_like(labels, num_classes), labels)
    grid = labels_to_feature_grid(labels.to(distances.device), num_classes + 1, tuple(distances.shape[2:]))
    valid = grid < num_classes
    own = distances.gather(1, grid.clamp(max=num_classes - 1).unsqueeze(1))[:, 0]
    log_p = log_prob_inclusion(own, num_dims).masked_fill(~valid, float("-inf")).flatten(1)
    count = valid.flatten(1).sum(dim=1)
    keep = count > 0
    if not bool(keep.any()):
        return distances.sum() * 0.0
    return -(torch.logsumexp(log_p[keep], dim=1) - count[keep].to(log_p.dtype).log()).mean()


class PrototypeOODTrainerMixin:
    """The prototype OOD head for any ``nnUNetTrainer`` (put it first among the bases); see the module docstring.

    Attributes (override in a subclass):
        ood_lambda: weight of ``L_out`` (the paper: 0.1).
        ood_head_channels: embedding size ``c_g`` (the paper: 256).
        ood_head_act: activation of the projection head (MONAI spec).
        ood_layer: dotted name of the hooked layer; ``None`` = the bottleneck ``encoder.stages.<last>``.
        ood_outlier_norm: how batch norms treat outliers (``"running"`` or ``"batch"``).
        ood_outlier_ops: operations :class:`~monai_ood.transforms.OutlierSynthesis` picks from.
        ood_outlier_kwargs: further arguments of :class:`~monai_ood.transforms.OutlierSynthesis`.
        ood_calibrate: fit and store the default detector and its calibration at the end of training.
        ood_detector_layers: the stages the detector's terms read; ``None`` = the backbone registry's
            encoder stages ``encoder.stages.<i>``.
        ood_detector_fusion: the detector's fusion rule, ``"auto"`` (chosen on synthesised outliers) or
            one of ``"sum"``, ``"max"``, ``"hazard"``.
        ood_detector_selection_ops: the outlier ops the ``"auto"`` choice is made on (the core's
            :data:`~monai_ood.detectors.fused.SELECTION_OPS`; each costs one pass over the validation
            patches).
        ood_detector_train_patches: patches of the training cases the detector's terms are fitted on.
        ood_detector_val_patches: patches of the validation cases it is standardised (and its fusion
            rule chosen) on.
        ood_tile_step_size: tile overlap of the calibration's sliding window (nnU-Net's default 0.5).
    """

    ood_lambda: float = 0.1
    ood_head_channels: int = 256
    ood_head_act: Any = "PRELU"
    ood_layer: str | None = None
    ood_outlier_norm: str = "running"
    ood_outlier_ops: Sequence[str] = PAPER_OPS
    ood_outlier_kwargs: Mapping[str, Any] = MappingProxyType({})
    ood_calibrate: bool = True
    ood_detector_layers: Sequence[str] | None = None
    ood_detector_fusion: str = "auto"
    ood_detector_selection_ops: Sequence[str] = SELECTION_OPS
    ood_detector_train_patches: int = 64
    ood_detector_val_patches: int = 32
    ood_tile_step_size: float = 0.5

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature)
    ) -> None:
        # nnUNetTrainer records its init arguments from this signature: keep it exactly as nnU-Net's
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ood_loss_fn: OutlierExposureLoss | None = None
        self._register_ood_log_keys()

    # ------------------------------------------------------------------ network

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager,
        configuration_manager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nnUNetPrototypeOODNet:
        """nnU-Net's planned network with the head (also what the predictor builds to load a checkpoint)."""
        backbone = super().build_network_architecture(
            plans_manager,
            configuration_manager,
            num_input_channels,
            num_output_channels,
            enable_deep_supervision,
        )
        return nnUNetPrototypeOODNet(
            backbone,
            num_classes=num_output_channels,
            layer=cls.ood_layer,
            head_channels=cls.ood_head_channels,
            head_act=cls.ood_head_act,
            outlier_norm=cls.ood_outlier_norm,
        )

    def ood_network(self) -> nnUNetPrototypeOODNet:
        """The prototype network without a DDP or ``torch.compile`` wrapper."""
        net = self.network.module if isinstance(self.network, DistributedDataParallel) else self.network
        return net._orig_mod if isinstance(net, OptimizedModule) else net

    def initialize(self) -> None:
        if self.label_manager.has_regions:
            raise NotImplementedError(
                f"{type(self).__name__} needs one prototype per class; region-based training "
                "(regions_class_order in dataset.json) is not supported"
            )
        super().initialize()
        route_nnunet_loader(self)  # nnUNetv2_train -pretrained_weights loads right after initialize
        self.ood_loss_fn = OutlierExposureLoss(self.ood_network().num_dims)
        net = self.ood_network()
        self.print_to_log_file(
            f"Prototype OOD head on {net.layer!r} ({net.feature_channels} channels -> c_g = {net.num_dims}), "
            f"K = {net.num_classes} prototypes, lambda = {self.ood_lambda}, outlier ops {tuple(self.ood_outlier_ops)}"
        )

    def load_pretrained_weights(self, source) -> PretrainedWeights:
        """Load an nnU-Net checkpoint, plain or of this trainer, into the network (what
        ``-pretrained_weights`` does; see :func:`~monai_ood.integrations.nnunet.pretrained.load_pretrained_weights`)
        and log the one-line summary."""
        summary = load_pretrained_weights(self.ood_network(), source)
        self.print_to_log_file(summary.line())
        return summary

    def _do_i_compile(self) -> bool:
        if super()._do_i_compile():
            self.print_to_log_file(
                "torch.compile is not used with the prototype OOD head (forward hooks, encoder-only passes)"
            )
        return False

    # ------------------------------------------------------------------ data

    def _outlier_transform(self) -> OutlierChannels:
        return OutlierChannels(OutlierSynthesis(tuple(self.ood_outlier_ops), **dict(self.ood_outlier_kwargs)))

    def get_training_transforms(self, *args, **kwargs) -> BasicTransform:
        """nnU-Net's training pipeline, then :class:`OutlierChannels`."""
        return ComposeTransforms(
            [super().get_training_transforms(*args, **kwargs), self._outlier_transform()]
        )

    def get_validation_transforms(self, *args, **kwargs) -> BasicTransform:
        """nnU-Net's validation pipeline, then :class:`OutlierChannels` (for the validation ``L_out``)."""
        return ComposeTransforms(
            [super().get_validation_transforms(*args, **kwargs), self._outlier_transform()]
        )

    def split_outliers(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(images, outliers)`` of a batch whose outliers ride along as extra channels (or ``None``)."""
        channels = self.num_input_channels
        if data.shape[1] == channels:
            return data, None
        if data.shape[1] == 2 * channels:
            return data[:, :channels], data[:, channels:]
        raise ValueError(
            f"expected {channels} input channels (or {2 * channels} with outliers), got {data.shape[1]}"
        )

    # ------------------------------------------------------------------ loss

    def compute_ood_loss(
        self,
        distances: torch.Tensor,
        target: torch.Tensor | Sequence[torch.Tensor],
        outlier_distances: torch.Tensor | None,
    ) -> torch.Tensor:
        """``L_out`` of a batch; ``target`` is nnU-Net's (the full-resolution one is used under deep supervision)."""
        labels = target[0] if isinstance(target, (list, tuple)) else target
        ignore = self.label_manager.ignore_label
        if ignore is None:
            return self.ood_loss_fn(distances, labels, outlier_distances)
        loss = masked_inlier_term(distances, labels, ignore, self.ood_loss_fn.num_dims)
        if outlier_distances is not None and outlier_distances.shape[0] > 0:
            loss = loss + self.ood_loss_fn.outlier_term(outlier_distances)
        return loss

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's train step with ``+ ood_lambda * L_out``; reports ``loss`` (segmentation) and ``ood_loss``."""
        target = batch["target"]
        data = batch["data"].to(self.device, non_blocking=True)
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        images, outliers = self.split_outliers(data)

        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output, distances, outlier_distances = self.network(images, outliers, with_ood=True)
            seg_loss = self.loss(output, target)
            ood_loss = self.compute_ood_loss(distances, target, outlier_distances)
            loss = seg_loss + self.ood_lambda * ood_loss

        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": seg_loss.detach().cpu().numpy(), "ood_loss": ood_loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step (same forward pass) plus the validation ``L_out`` as ``ood_loss``."""
        images, outliers = self.split_outliers(batch["data"])
        target = batch["target"]
        # nnU-Net's step overwrites ignore labels in place: keep a copy for L_out
        labels = (target[0] if isinstance(target, list) else target).clone()
        net = self.ood_network()
        with net.recording_features() as recorded:
            result = super().validation_step({**batch, "data": images})
        with self._autocast():
            distances = net.distances(recorded[-1])
            outlier_distances = None
            if outliers is not None:
                outlier_distances = net.distances(net.encode(outliers.to(self.device, non_blocking=True)))
            ood_loss = self.compute_ood_loss(distances, labels.to(self.device), outlier_distances)
        result["ood_loss"] = ood_loss.detach().cpu().numpy()
        return result

    # ------------------------------------------------------------------ logging

    def _local_logging(self) -> dict:
        # nnU-Net >= 2.6 wraps its LocalLogger in a MetaLogger; older versions log directly
        logger = getattr(self.logger, "local_logger", self.logger)
        return logger.my_fantastic_logging

    def _register_ood_log_keys(self) -> None:
        """nnU-Net's logger only accepts registered keys: add ours (padded to the epochs already logged)."""
        logging = self._local_logging()
        epochs = len(logging.get("epoch_start_timestamps", []))
        for key in OOD_LOG_KEYS:
            values = logging.setdefault(key, [])
            values.extend([float("nan")] * (epochs - len(values)))

    def _log_epoch_mean(self, key: str, outputs: list[dict]) -> None:
        values = [float(o["ood_loss"]) for o in outputs if "ood_loss" in o]
        if self.is_ddp:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, values)
            values = [v for part in gathered for v in part]
        self.logger.log(key, float(np.mean(values)) if values else float("nan"), self.current_epoch)

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        self._log_epoch_mean("train_ood_losses", train_outputs)

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        self._log_epoch_mean("val_ood_losses", val_outputs)

    def on_epoch_end(self) -> None:
        for key, name in zip(OOD_LOG_KEYS, ("train_ood_loss", "val_ood_loss"), strict=True):
            self.print_to_log_file(name, np.round(self.logger.get_value(key, step=-1), decimals=4))
        super().on_epoch_end()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        self._register_ood_log_keys()  # a checkpoint's logging replaces the logger's

    # ------------------------------------------------------------------ detector and calibration

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.local_rank != 0:
            return
        for path in (detector_path(self.output_folder), calibration_path(self.output_folder)):
            path.unlink(missing_ok=True)  # fitted on the weights of an earlier training of this fold
        if self.ood_calibrate:
            try:
                self.fit_ood()
            except (ValueError, RuntimeError) as error:  # a failed fit must not lose the finished training
                self.print_to_log_file(
                    f"WARNING: fitting the OOD detector or its calibration failed ({error}); segmentations "
                    "still work, score maps need: python -m monai_ood.integrations.nnunet calibrate "
                    f"{self.plans_manager.dataset_name} {self.configuration_name} {self.fold} -tr "
                    f"{type(self).__name__} -p {self.plans_manager.plans_name}"
                )

    def _dataset(self, keys: Sequence[str]):
        return self.dataset_class(
            self.preprocessed_dataset_folder,
            list(keys),
            folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage,
        )

    def _case_loader(self, keys: Sequence[str]):
        """``load(key) -> (data, seg, properties)`` of preprocessed cases, the previous stage's one-hot
        segmentation appended to the data for a cascade (as nnU-Net's data loader does)."""
        dataset = self._dataset(keys)

        def load(key: str):
            data, seg, seg_prev, properties = dataset.load_case(key)
            if self.is_cascaded:
                one_hot = convert_labelmap_to_one_hot(
                    seg_prev[:], self.label_manager.foreground_labels, output_dtype=np.float32
                )
                data = np.vstack((np.asarray(data[:], dtype=np.float32), one_hot))
            return data, seg, properties

        return load

    def fit_ood(self, checkpoint_name: str = DEFAULT_CHECKPOINT) -> tuple[FusedDetector, Calibration]:
        """Fit the default detector and its calibration with the current weights and store both.

        The detector is fitted on ``ood_detector_train_patches`` patches of the fold's training cases and
        standardised on ``ood_detector_val_patches`` patches of its validation cases
        (:mod:`~monai_ood.integrations.nnunet.detector`); the calibration is the Weibull fit of its map on
        the validation cases' sliding-window tiles (:mod:`~monai_ood.integrations.nnunet.calibration`).

        Args:
            checkpoint_name: the checkpoint these weights are saved in; names the files
                (``ood_detector.pt`` and ``ood_calibration.json`` for ``checkpoint_final.pth``).

        Returns:
            ``(detector, calibration)``.

        Raises:
            ValueError: without validation cases, or for a fit the detector or the Weibull rejects.
        """
        net = self.ood_network()
        train_keys, val_keys = self.do_split()
        if not val_keys:
            raise ValueError(f"fold {self.fold} has no validation cases to standardise and calibrate on")
        patch_size = [int(p) for p in self.configuration_manager.patch_size]
        ignore = self.label_manager.ignore_label
        train = sample_patches(
            train_keys, self._case_loader(train_keys), patch_size, self.ood_detector_train_patches, 0, ignore
        )
        val = sample_patches(
            val_keys, self._case_loader(val_keys), patch_size, self.ood_detector_val_patches, 1, ignore
        )
        was_training = net.training
        try:
            with deep_supervision_off(net):
                detector = fit_detector(
                    net,
                    train,
                    val,
                    num_classes=self.label_manager.num_segmentation_heads,
                    layers=self.ood_detector_layers,
                    fusion=self.ood_detector_fusion,
                    batch_size=int(self.configuration_manager.batch_size),
                    selection_ops=tuple(self.ood_detector_selection_ops),
                )
                del train, val
                detector_file = save_detector(detector_path(self.output_folder, checkpoint_name), detector)
                load = self._case_loader(val_keys)
                metadata = {
                    "fold": self.fold,
                    "checkpoint": checkpoint_name,
                    "cases": list(val_keys),
                    "trainer": type(self).__name__,
                    "plans": self.plans_manager.plans_name,
                    "configuration": self.configuration_name,
                    "detector": detector_file.name,
                    "tile_step_size": self.ood_tile_step_size,
                }
                calibration = fit_calibration(
                    detector,
                    net,
                    (load(key)[0] for key in val_keys),
                    patch_size,
                    self.ood_tile_step_size,
                    metadata,
                )
        finally:
            net.train(was_training)
        path = calibration.save(calibration_path(self.output_folder, checkpoint_name))
        self.print_to_log_file(
            f"OOD detector on {detector.layers} ({len(detector.terms)} terms, fusion "
            f"{detector.selection_.get('chosen', detector.fusion_)!r}) -> {detector_file}; calibration on "
            f"{len(val_keys)} validation case(s): {calibration!r} -> {path}"
        )
        return detector, calibration


class nnUNetTrainerPrototypeOOD(PrototypeOODTrainerMixin, nnUNetTrainer):  # noqa: N801 (nnU-Net's naming)
    """``nnUNetTrainer`` with the prototype OOD head: ``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerPrototypeOOD``."""
