from .outlier_synthesis import OutlierSynthesis, OutlierSynthesisD, OutlierSynthesisd, OutlierSynthesisDict

__all__ = ["OutlierSynthesis", "OutlierSynthesisd", "OutlierSynthesisD", "OutlierSynthesisDict"]
