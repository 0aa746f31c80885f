from .augmentation import affine_augmentation
from .outlier_synthesis import OutlierSynthesis, OutlierSynthesisD, OutlierSynthesisd, OutlierSynthesisDict

__all__ = [
    "affine_augmentation",
    "OutlierSynthesis",
    "OutlierSynthesisd",
    "OutlierSynthesisD",
    "OutlierSynthesisDict",
]
