from .augmentation import affine_augmentation, warped_copies
from .outlier_synthesis import OutlierSynthesis, OutlierSynthesisD, OutlierSynthesisd, OutlierSynthesisDict

__all__ = [
    "affine_augmentation",
    "warped_copies",
    "OutlierSynthesis",
    "OutlierSynthesisd",
    "OutlierSynthesisD",
    "OutlierSynthesisDict",
]
