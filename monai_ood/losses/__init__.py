from .inclusion import DISTANCE_FLOOR, log_prob_exclusion, log_prob_inclusion
from .outlier_exposure import (
    OutlierExposureLoss,
    SegOODLoss,
    class_inclusion_fractions,
    labels_to_feature_grid,
)

__all__ = [
    "DISTANCE_FLOOR",
    "OutlierExposureLoss",
    "SegOODLoss",
    "class_inclusion_fractions",
    "labels_to_feature_grid",
    "log_prob_exclusion",
    "log_prob_inclusion",
]
