"""OOD detectors with one contract (:class:`Detector`: ``fit`` / ``predict``, higher = more OOD).

Each method is one file; :data:`DETECTORS` maps the benchmark's names to the classes.
"""

from .autoencoder import AutoencoderDetector
from .base import Detector, DetectorOutput, NotFittedError
from .energy import EnergyDetector
from .ensemble import EnsembleDetector
from .entropy import EntropyDetector
from .fcdd import FCDDDetector, FCDDLoss, FCDDNet, train_fcdd
from .mahalanobis import MahalanobisDetector
from .mc_dropout import MCDropoutDetector
from .mecam import MECAMDetector, find_decoder_exits
from .msp import MaxSoftmaxDetector
from .prototype import PrototypeDetector

DETECTORS = {
    cls.name: cls
    for cls in (
        PrototypeDetector,
        MaxSoftmaxDetector,
        EntropyDetector,
        EnergyDetector,
        MCDropoutDetector,
        EnsembleDetector,
        FCDDDetector,
        MahalanobisDetector,
        MECAMDetector,
        AutoencoderDetector,
    )
}

__all__ = [
    "DETECTORS",
    "AutoencoderDetector",
    "Detector",
    "DetectorOutput",
    "EnergyDetector",
    "EnsembleDetector",
    "EntropyDetector",
    "FCDDDetector",
    "FCDDLoss",
    "FCDDNet",
    "MCDropoutDetector",
    "MECAMDetector",
    "MahalanobisDetector",
    "MaxSoftmaxDetector",
    "NotFittedError",
    "PrototypeDetector",
    "find_decoder_exits",
    "train_fcdd",
]
