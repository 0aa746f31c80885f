"""The OOD benchmark of ``../shared/BENCHMARK.md`` (v2): its data sources, InD pool, OOD sets and harness.

Kept out of :mod:`monai_ood.data` (the library's own data loading: user datalists): import the modules
directly, e.g. ``from monai_ood.benchmark.pool import load_brain_dataset``.
"""
