from .augmentation import affine_augmentation, warped_copies
from .outlier_synthesis import OutlierSynthesis, OutlierSynthesisd

__all__ = [
    "affine_augmentation",
    "warped_copies",
    "OutlierSynthesis",
    "OutlierSynthesisd",
]
