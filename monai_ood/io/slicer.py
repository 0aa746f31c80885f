"""Files that make the outputs readable in 3D Slicer: colour tables and a loader script.

Slicer reads colour tables in its discrete text format (``.ctbl``: ``# Color table file`` header, then
``index name r g b a`` lines, 0-255 integers, names without spaces):

* ``ood_heatmap.ctbl``: 256 entries, blue -> light grey -> red (Moreland's "cool to warm" diverging
  map, the one matplotlib calls ``coolwarm``), for A_xi in [0, 1]: entry ``i`` is A_xi = i / 255.
  Slicer maps a float volume onto a table through its window, so the loader sets the window to 0..1.
  Blue is in-distribution, red out-of-distribution, light grey the undecided middle.
* ``labels.ctbl``: one entry per class; the background is transparent, classes use the
  colour-blind-safe Okabe-Ito palette (then evenly spread hues beyond seven classes).

:func:`heatmap_colors` and :func:`label_colors` are also what :mod:`monai_ood.visualize` draws with, so
the PNG montages and Slicer agree.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from monai_ood.io.images import atomic_write

__all__ = [
    "default_class_names",
    "heatmap_colors",
    "heatmap_ctbl",
    "label_colors",
    "labels_ctbl",
    "loader_script",
    "write_slicer_files",
]


# matplotlib's coolwarm sampled at 17 evenly spaced points (0-255 RGB): a piecewise-linear copy keeps
# this module free of matplotlib and stays within 8 units (of 255) of the original on every channel.
_COOLWARM_ANCHORS = np.array(
    [
        [59, 76, 192],
        [78, 104, 216],
        [98, 130, 234],
        [119, 154, 247],
        [141, 176, 254],
        [163, 194, 254],
        [185, 208, 249],
        [204, 217, 237],
        [221, 220, 220],
        [236, 211, 197],
        [245, 196, 172],
        [247, 176, 147],
        [244, 152, 122],
        [235, 125, 98],
        [221, 95, 75],
        [202, 59, 55],
        [180, 4, 38],
    ],
    dtype=float,
)

# Okabe & Ito (2008): sky blue, orange, bluish green, yellow, blue, vermillion, reddish purple. With the
# brain classes: CSF sky blue, GM orange, WM bluish green.
_OKABE_ITO = (
    (86, 180, 233),
    (230, 159, 0),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
)


def heatmap_colors(n: int = 256) -> np.ndarray:
    """The heat-map colours for A_xi, blue (0) -> light grey (0.5) -> red (1).

    Args:
        n: number of colours, evenly spaced over [0, 1].

    Returns:
        ``(n, 3)`` uint8 RGB.

    Raises:
        ValueError: ``n`` < 2.
    """
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n!r}")
    positions = np.linspace(0.0, 1.0, len(_COOLWARM_ANCHORS))
    x = np.linspace(0.0, 1.0, n)
    rgb = np.stack([np.interp(x, positions, _COOLWARM_ANCHORS[:, c]) for c in range(3)], axis=1)
    return np.round(rgb).astype(np.uint8)


def label_colors(num_classes: int) -> np.ndarray:
    """Label colours: transparent background (class 0), then distinct opaque colours.

    Args:
        num_classes: number of classes including the background.

    Returns:
        ``(num_classes, 4)`` uint8 RGBA.

    Raises:
        ValueError: ``num_classes`` < 2.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (background and one class), got {num_classes!r}")
    colors = [(0, 0, 0, 0)]
    for k in range(1, num_classes):
        if k <= len(_OKABE_ITO):
            rgb = _OKABE_ITO[k - 1]
        else:
            # Golden-ratio hue steps keep many extra classes apart without a fixed list.
            hue = ((k - len(_OKABE_ITO)) * 0.618033988749895) % 1.0
            rgb = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.65, 0.9))
        colors.append((*rgb, 255))
    return np.array(colors, dtype=np.uint8)


def default_class_names(num_classes: int) -> list[str]:
    """The embedded data's class names (:data:`monai_ood.benchmark.pool.CLASS_NAMES`) for 4 classes;
    otherwise ``background, class_1, ...``."""
    from ..benchmark.pool import CLASS_NAMES as BRAIN_CLASS_NAMES

    if num_classes == len(BRAIN_CLASS_NAMES):
        return list(BRAIN_CLASS_NAMES)
    return ["background"] + [f"class_{k}" for k in range(1, num_classes)]


def _ctbl(title: str, entries: Sequence[tuple[int, str, Sequence[int]]], notes: Sequence[str]) -> str:
    lines = [f"# Color table file {title}", f"# {len(entries)} values"]
    lines += [f"# {note}" for note in notes]
    lines += [f"{index} {name} {' '.join(str(int(c)) for c in rgba)}" for index, name, rgba in entries]
    return "\n".join(lines) + "\n"


def heatmap_ctbl() -> str:
    """The text of ``ood_heatmap.ctbl``: 256 entries, entry ``i`` for A_xi = i / 255, all opaque."""
    colors = heatmap_colors(256)
    entries = [(i, f"A_xi_{i / 255:.3f}", (*colors[i], 255)) for i in range(256)]
    notes = [
        "monai-ood OOD heat map: A_xi in [0, 1], blue = in-distribution, red = out-of-distribution.",
        "Use with the volume display window set to 0..1 (load_in_slicer.py does this).",
    ]
    return _ctbl("ood_heatmap.ctbl", entries, notes)


def _check_class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (background and one class), got {num_classes!r}")
    names = [str(name) for name in (default_class_names(num_classes) if class_names is None else class_names)]
    if len(names) != num_classes:
        raise ValueError(f"expected {num_classes} class names, got {len(names)}: {names!r}")
    if any(not name.strip() for name in names):
        raise ValueError(f"class names must not be empty, got {names!r}")
    # The .ctbl format splits on whitespace: Slicer's convention is underscores for spaces.
    return ["_".join(name.split()) for name in names]


def labels_ctbl(num_classes: int = 4, class_names: Sequence[str] | None = None) -> str:
    """The text of ``labels.ctbl`` for a segmentation with ``num_classes`` classes (label values).

    Args:
        num_classes: number of classes including the background (label 0).
        class_names: one name per class; spaces become underscores. Defaults to
            :func:`default_class_names`.

    Returns:
        The colour table text.

    Raises:
        ValueError: fewer than 2 classes, or names that do not match ``num_classes`` or are empty.
    """
    names = _check_class_names(num_classes, class_names)
    colors = label_colors(num_classes)
    entries = [(k, names[k], colors[k]) for k in range(num_classes)]
    return _ctbl("labels.ctbl", entries, ["monai-ood segmentation labels; label 0 is transparent."])


def loader_script() -> str:
    """The text of ``load_in_slicer.py`` (shipped as package data in ``monai_ood/io/resources``)."""
    return resources.files("monai_ood.io").joinpath("resources", "load_in_slicer.py").read_text("utf-8")


def _unchanged(path: Path, data: bytes) -> bool:
    # Identical content is not an overwrite, so repeated runs into one folder just work.
    return path.is_file() and path.read_bytes() == data


def write_slicer_files(
    output_dir: str | os.PathLike,
    num_classes: int = 4,
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the colour tables and the loader script next to the outputs.

    Files already there with the same content are left alone (so several runs into one folder do not
    need ``--overwrite``); different content is only replaced with ``overwrite``.

    Args:
        output_dir: folder of the outputs (created if missing).
        num_classes: number of segmentation classes including the background.
        class_names: one name per class (default: :func:`default_class_names`).
        overwrite: replace files with different content.

    Returns:
        ``{"heatmap": .../ood_heatmap.ctbl, "labels": .../labels.ctbl, "loader": .../load_in_slicer.py}``.

    Raises:
        FileExistsError: a file exists with different content and ``overwrite`` is false.
        ValueError: invalid ``num_classes`` or ``class_names``.
    """
    output_dir = Path(output_dir)
    texts = {
        "heatmap": ("ood_heatmap.ctbl", heatmap_ctbl()),
        "labels": ("labels.ctbl", labels_ctbl(num_classes, class_names)),
        "loader": ("load_in_slicer.py", loader_script()),
    }
    data = {key: (output_dir / name, text.encode("utf-8")) for key, (name, text) in texts.items()}
    conflicts = [str(p) for p, content in data.values() if p.exists() and not _unchanged(p, content)]
    if conflicts and not overwrite:  # check all first: write either all three files or none
        raise FileExistsError(f"{', '.join(conflicts)} already exist(s) with other content; pass --overwrite")
    output_dir.mkdir(parents=True, exist_ok=True)
    for path, content in data.values():
        if not _unchanged(path, content):
            atomic_write(
                path, lambda temporary, content=content: temporary.write_bytes(content), overwrite=True
            )
    return {key: path for key, (path, _) in data.items()}
