"""Re-exports monai-ood's nnU-Net trainers for nnU-Net's ``nnUNet_extTrainer`` discovery (see ``__init__``)."""

from monai_ood.integrations.nnunet.trainer import PrototypeOODTrainerMixin, nnUNetTrainerPrototypeOOD

__all__ = ["PrototypeOODTrainerMixin", "nnUNetTrainerPrototypeOOD"]
