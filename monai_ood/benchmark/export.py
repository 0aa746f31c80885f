"""The embedded benchmark as folders of files, so that it is one use of ``monai-ood evaluate --ind --ood``.

:func:`write_benchmark_folders` writes the InD reference (the test slices of the pool and their mild
variants) and every OOD set of :func:`~monai_ood.benchmark.harness.benchmark_sets` as one-slice NIfTI
volumes at the model's slice geometry (:func:`~monai_ood.benchmark.ood_sets.image2d_to_volume`, the
preprocessing's pixel spacing), one folder per set, the InD labels in ``labels/`` named like their images
(for failure detection), and ``sets.json`` with the ``--ind`` / ``--ood`` / ``--labels`` arguments. A slice
read back through :func:`~monai_ood.preprocessing.volume_to_slices` is the slice the harness scores on the
same grid, windowed once more at its 1st and 99th percentiles: on 32 x 32 slices of 3 mm that moved a pixel
by 0.004 (median over the InD reference) and by up to 0.1 on a warped variant with few saturated pixels,
so ``evaluate`` on the folders ranks the images as the harness does without giving the same numbers.

The embedded evaluation (``monai-ood evaluate`` without ``--ind``) adds what files cannot carry: the
artefacts' severity correlation and the lesion masks for localisation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..files import atomic_write, atomic_write_text
from .plots import slug

__all__ = ["write_benchmark_folders"]


def _write(array: np.ndarray, preprocessing, path: Path, label: bool = False) -> None:
    from .ood_sets import image2d_to_volume

    volume = image2d_to_volume(
        np.asarray(array, dtype=np.float32), preprocessing, spacing=preprocessing.spacing
    )
    if label:
        volume = sitk.Cast(sitk.Round(volume), sitk.sitkUInt8)
    atomic_write(path, lambda temporary: sitk.WriteImage(volume, str(temporary), True), overwrite=True)


def write_benchmark_folders(
    folder: str | os.PathLike,
    preprocessing=None,
    seed: int = 0,
    cache_dir=None,
    artefact_limit: int | None = None,
    categories=("C1", "C2", "C3"),
) -> dict:
    """Write the embedded benchmark's InD reference and OOD sets as folders of NIfTI files.

    Args:
        folder: the output folder (created; files in it are replaced).
        preprocessing: the model's :class:`~monai_ood.preprocessing.SlicePreprocessing` (default one).
        seed: seed of the InD variants, artefacts and lesions (as ``benchmark_sets``).
        cache_dir: cache of the embedded pool.
        artefact_limit: as :func:`~monai_ood.benchmark.harness.benchmark_sets`.
        categories: the OOD categories to write (the lesion set is left out by default: a lesion is
            a local change the image score is not meant to rank).

    Returns:
        The contents of ``sets.json``: ``ind`` (folder), ``labels`` (folder), ``ood``
        (``[{"name", "folder", "category", "n"}]``) and ``evaluate_arguments`` (the command-line
        arguments of ``monai-ood evaluate`` on them).
    """
    from ..preprocessing import SlicePreprocessing
    from .harness import benchmark_sets

    preprocessing = preprocessing or SlicePreprocessing()
    folder = Path(folder)
    sets = benchmark_sets(preprocessing, seed=seed, cache_dir=cache_dir, artefact_limit=artefact_limit)
    ind_dir, label_dir = folder / "ind", folder / "labels"
    for directory in (ind_dir, label_dir):
        directory.mkdir(parents=True, exist_ok=True)
    for k, item in enumerate(sets.ind):
        _write(item["image"][0], preprocessing, ind_dir / f"ind_{k:04d}.nii.gz")
        _write(item["label"][0], preprocessing, label_dir / f"ind_{k:04d}.nii.gz", label=True)
    ood = []
    for name, items in sets.ood.items():
        category = items[0].category
        if category not in categories:
            continue
        stem = slug(name)
        directory = folder / stem
        directory.mkdir(parents=True, exist_ok=True)
        for k, item in enumerate(items):
            _write(item.image[0], preprocessing, directory / f"{stem}_{k:04d}.nii.gz")
        ood.append({"name": name, "folder": str(directory), "category": category, "n": len(items)})
    arguments = ["--ind", str(ind_dir), "--labels", str(label_dir)]
    for row in ood:
        arguments += ["--ood", f"{row['name']}={row['folder']}:{row['category']}"]
    summary = {
        "ind": str(ind_dir),
        "labels": str(label_dir),
        "ood": ood,
        "seed": seed,
        "evaluate_arguments": arguments,
    }
    atomic_write_text(folder / "sets.json", json.dumps(summary, indent=1), overwrite=True)
    return summary
