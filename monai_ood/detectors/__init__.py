"""OOD detectors with one contract (:class:`Detector`: ``fit`` / ``predict``, higher = more OOD), and the
scoring terms they fuse (:mod:`.terms`: ``fit_features`` / ``predict_features`` on one shared pass).

Each method is one file plus one entry of :data:`DETECTORS` (name -> class): stored detectors are rebuilt
through it (:func:`monai_ood.engines.checkpoint.detector_from_state`).
"""

from .autoencoder import AutoencoderDetector
from .base import Detector, DetectorOutput, NotFittedError
from .energy import EnergyDetector
from .ensemble import EnsembleDetector, EnsembleDiceDetector, pairwise_dice
from .entropy import EntropyDetector
from .fcdd import FCDDDetector, FCDDLoss, FCDDNet, train_fcdd
from .feature_statistics import FeatureStatisticsDetector
from .fused import FusedDetector, default_terms, fuse_scores
from .intensity_histogram import IntensityHistogramDetector, intensity_histograms
from .mahalanobis import MahalanobisDetector
from .mc_dropout import MCDropoutDetector
from .mecam import MECAMDetector, find_decoder_exits
from .msp import MaxSoftmaxDetector
from .prototype import PrototypeDetector
from .terms import TERMS, ClassPrototypeTerm, Features, IntensityTerm, StageStatisticsTerm, Term, TermOutput

DETECTORS = {
    cls.name: cls
    for cls in (
        FusedDetector,
        PrototypeDetector,
        MaxSoftmaxDetector,
        EntropyDetector,
        EnergyDetector,
        MCDropoutDetector,
        EnsembleDetector,
        EnsembleDiceDetector,
        FCDDDetector,
        MahalanobisDetector,
        FeatureStatisticsDetector,
        IntensityHistogramDetector,
        MECAMDetector,
        AutoencoderDetector,
    )
}

__all__ = [
    "DETECTORS",
    "TERMS",
    "ClassPrototypeTerm",
    "Features",
    "FusedDetector",
    "IntensityTerm",
    "StageStatisticsTerm",
    "Term",
    "TermOutput",
    "default_terms",
    "fuse_scores",
    "AutoencoderDetector",
    "Detector",
    "DetectorOutput",
    "EnergyDetector",
    "EnsembleDetector",
    "EnsembleDiceDetector",
    "EntropyDetector",
    "FCDDDetector",
    "FCDDLoss",
    "FCDDNet",
    "FeatureStatisticsDetector",
    "IntensityHistogramDetector",
    "MCDropoutDetector",
    "MECAMDetector",
    "MahalanobisDetector",
    "MaxSoftmaxDetector",
    "NotFittedError",
    "PrototypeDetector",
    "find_decoder_exits",
    "intensity_histograms",
    "pairwise_dice",
    "train_fcdd",
]
