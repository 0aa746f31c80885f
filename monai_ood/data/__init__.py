"""Data: your datalists (:mod:`.datalist`), and the embedded InD pool and OOD sets for convenience.

The embedded data are the benchmark's and live in :mod:`monai_ood.benchmark` (``pool``, ``ood_sets``);
they are re-exported here because ``monai-ood train`` and the bundles train on the pool by default. Every
image goes through :func:`monai_ood.preprocessing.volume_to_slices`, the code path used for scoring.
"""

from ..benchmark.ood_sets import (
    ARTEFACTS,
    CATEGORIES,
    MissingSourceWarning,
    OODItem,
    apply_artefact,
    artefact_items,
    load_ood_sets,
    ood_source_images,
)
from ..benchmark.pool import (
    CLASS_NAMES,
    NUM_CLASSES,
    brain_cache_path,
    brain_test_variants,
    load_brain_dataset,
    load_mni152_labels,
    load_mni152_t1,
    mni152_2009a_paths,
)
from .datalist import datalist_to_slices, load_datalist

__all__ = [
    "ARTEFACTS",
    "CATEGORIES",
    "CLASS_NAMES",
    "NUM_CLASSES",
    "MissingSourceWarning",
    "OODItem",
    "apply_artefact",
    "artefact_items",
    "brain_cache_path",
    "brain_test_variants",
    "datalist_to_slices",
    "load_brain_dataset",
    "load_datalist",
    "load_mni152_labels",
    "load_mni152_t1",
    "load_ood_sets",
    "mni152_2009a_paths",
    "ood_source_images",
]
