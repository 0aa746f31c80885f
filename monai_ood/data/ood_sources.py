"""Temporary re-export: the OOD sets moved to :mod:`monai_ood.benchmark.ood_sets`."""

from monai_ood.benchmark.ood_sets import *  # noqa: F401,F403
from monai_ood.benchmark.ood_sets import __all__  # noqa: F401
