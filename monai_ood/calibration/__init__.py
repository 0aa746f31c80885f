from .weibull import WeibullCalibrator

__all__ = ["WeibullCalibrator"]
