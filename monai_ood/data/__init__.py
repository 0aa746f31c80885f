"""Data: the embedded brain tissue dataset (InD), the benchmark's OOD sets, and user datalists.

All sources install from package registries and load offline (see BENCHMARK.md); every image goes
through :func:`monai_ood.preprocessing.volume_to_slices`, the code path used for scoring.
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
