"""monai-ood: auxiliary prototypical out-of-distribution heads for MONAI segmentation networks."""

__version__ = "0.1.0"
