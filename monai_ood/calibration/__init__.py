from .degree import DegreeCalibrator
from .record import CALIBRATION_FORMAT, CALIBRATION_VERSION, Calibration, fingerprint
from .weibull import WeibullCalibrator

__all__ = [
    "CALIBRATION_FORMAT",
    "CALIBRATION_VERSION",
    "Calibration",
    "DegreeCalibrator",
    "WeibullCalibrator",
    "fingerprint",
]
