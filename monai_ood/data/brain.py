"""Temporary re-export: the embedded dataset moved to :mod:`monai_ood.benchmark.pool`."""

from monai_ood.benchmark.pool import *  # noqa: F401,F403
from monai_ood.benchmark.pool import __all__  # noqa: F401
