from .outlier_synthesis import OutlierSynthesis, OutlierSynthesisd, OutlierSynthesisD, OutlierSynthesisDict

__all__ = ["OutlierSynthesis", "OutlierSynthesisd", "OutlierSynthesisD", "OutlierSynthesisDict"]
