from .base import Detector, DetectorOutput, NotFittedError
from .prototype import PrototypeDetector

__all__ = ["Detector", "DetectorOutput", "NotFittedError", "PrototypeDetector"]
