"""PNG montages of slices: image | segmentation overlay | A_xi heat-map overlay, one row per case.

Drawn with matplotlib's object API (:class:`~matplotlib.figure.Figure` on a ``FigureCanvasAgg``), not
pyplot: no display is needed and the backend an application chose stays untouched. Colours are
those of the Slicer colour tables (:func:`monai_ood.io.slicer.heatmap_colors`,
:func:`monai_ood.io.slicer.label_colors`), so a montage and Slicer look alike.

Each panel is ``PANEL_INCHES`` square at ``DPI``: a montage of ``n`` rows is ``900 x 300 n`` pixels,
plus ``TITLE_INCHES * DPI`` (40) pixels of height with a title.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_ood.io.images import atomic_write
from monai_ood.io.slicer import default_class_names, heatmap_colors, label_colors

__all__ = ["DPI", "OVERLAY_ALPHA", "PANEL_INCHES", "TITLE_INCHES", "save_montage"]

PANEL_INCHES = 3.0
TITLE_INCHES = 0.4
DPI = 100
OVERLAY_ALPHA = 0.5  # as the foreground opacity load_in_slicer.py sets
_COLUMNS = ("image", "segmentation", "A_xi")
_A_XI_TOLERANCE = 1e-6  # float rounding of scores computed in [0, 1]
_HEADING_INCHES = 0.3
_LEGEND_INCHES = 0.35
_NOTE_BOX = {"facecolor": "white", "alpha": 0.8, "edgecolor": "none"}


def _check_row(index: int, row: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise ValueError(f"row {index} must be a dict, got {type(row).__name__}")
    name = str(row.get("name", f"row {index}"))
    if "image" not in row or row["image"] is None:
        raise ValueError(f"row {index} ({name!r}) has no 'image'")
    image = np.asarray(row["image"], dtype=np.float64)
    if image.ndim != 2 or min(image.shape) == 0:
        raise ValueError(
            f"row {index} ({name!r}): 'image' must be a non-empty 2D array, got shape {image.shape}"
        )
    if not np.isfinite(image).all():
        raise ValueError(f"row {index} ({name!r}): 'image' holds NaN or Inf values")
    segmentation = row.get("segmentation")
    if segmentation is not None:
        segmentation = np.asarray(segmentation)
        if segmentation.shape != image.shape:
            raise ValueError(
                f"row {index} ({name!r}): 'segmentation' shape {segmentation.shape} does not match "
                f"the image shape {image.shape}"
            )
        if not np.issubdtype(segmentation.dtype, np.integer) and not np.array_equal(
            segmentation, np.round(segmentation)
        ):
            raise ValueError(f"row {index} ({name!r}): 'segmentation' must hold integer labels")
        segmentation = segmentation.astype(np.int64)
        if segmentation.min() < 0:
            raise ValueError(f"row {index} ({name!r}): labels must be >= 0, got {segmentation.min()}")
    a_xi = row.get("a_xi")
    if a_xi is not None:
        a_xi = np.asarray(a_xi, dtype=np.float64)
        if a_xi.shape != image.shape:
            raise ValueError(
                f"row {index} ({name!r}): 'a_xi' shape {a_xi.shape} does not match the image shape {image.shape}"
            )
        if not np.isfinite(a_xi).all():
            raise ValueError(f"row {index} ({name!r}): 'a_xi' holds NaN or Inf values")
        if a_xi.min() < -_A_XI_TOLERANCE or a_xi.max() > 1 + _A_XI_TOLERANCE:
            raise ValueError(
                f"row {index} ({name!r}): 'a_xi' must lie in [0, 1], got [{a_xi.min():.4g}, {a_xi.max():.4g}]"
            )
        a_xi = np.clip(a_xi, 0.0, 1.0)
    score = row.get("score")
    if score is not None:
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise ValueError(
                f"row {index} ({name!r}): 'score' must be a number or None, got {score!r}"
            ) from None
    return {"name": name, "image": image, "segmentation": segmentation, "a_xi": a_xi, "score": score}


def _window(image: np.ndarray) -> tuple[float, float]:
    # Robust display window, as the intensity preprocessing uses: one bright voxel must not grey out the rest.
    low, high = (float(v) for v in np.percentile(image, [1.0, 99.0]))
    if high <= low:
        low, high = float(image.min()), float(image.max())
    if high <= low:  # a constant image: any window shows it as one grey
        high = low + 1.0
    return low, high


def save_montage(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str | None = None,
    overwrite: bool = False,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Save a PNG montage: one row per case, columns image | segmentation | A_xi.

    Args:
        rows: one dict per case: ``"name"`` (str), ``"image"`` (2D array), ``"segmentation"`` (2D
            integer labels of the same shape, or ``None``), ``"a_xi"`` (2D array in [0, 1] of the same
            shape, or ``None``) and ``"score"`` (float or ``None``, shown in the row title).
        path: the PNG file (must end in ``.png``).
        title: a title over the montage.
        overwrite: replace an existing file.
        class_names: names for the segmentation legend, one per class including the background
            (default: ``background, CSF, GM, WM`` for 4 classes, ``class_k`` otherwise).

    Returns:
        The written path.

    Raises:
        ValueError: no rows, a row without an image, shapes that do not match, labels that are not
            non-negative integers, A_xi outside [0, 1], or a path not ending in ``.png``.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        ImportError: matplotlib is not installed (``pip install monai-ood[data]``).
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"the montage is a PNG file: path must end in .png, got {str(path)!r}")
    if isinstance(rows, Mapping) or len(rows) == 0:
        raise ValueError(f"rows must be a non-empty list of dicts, got {rows!r}"[:200])
    checked = [_check_row(i, row) for i, row in enumerate(rows)]
    if path.exists() and not overwrite:  # before drawing, which is the slow part
        raise FileExistsError(f"output {str(path)!r} already exists; pass --overwrite to replace it")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as error:
        raise ImportError("save_montage needs matplotlib: pip install 'monai-ood[data]'") from error

    max_label = max(
        (int(r["segmentation"].max()) for r in checked if r["segmentation"] is not None), default=0
    )
    num_classes = max(2, max_label + 1, len(class_names) if class_names is not None else 0)
    names = list(class_names) if class_names is not None else default_class_names(num_classes)
    names += [f"class_{k}" for k in range(len(names), num_classes)]
    label_rgba = label_colors(num_classes) / 255.0
    label_rgba[1:, 3] = OVERLAY_ALPHA
    heat = ListedColormap(heatmap_colors(256) / 255.0, name="ood_heatmap")

    title_height = TITLE_INCHES if title else 0.0
    height = len(checked) * PANEL_INCHES + title_height
    figure = Figure(figsize=(len(_COLUMNS) * PANEL_INCHES, height), dpi=DPI)
    FigureCanvasAgg(figure)
    # Margins in inches (column headings above, class legend below), as fractions of the figure.
    top = 1.0 - (title_height + _HEADING_INCHES) / height
    bottom = _LEGEND_INCHES / height
    grid = figure.add_gridspec(
        len(checked), len(_COLUMNS), left=0.05, right=0.88, bottom=bottom, top=top, wspace=0.05, hspace=0.15
    )
    if title:
        figure.suptitle(title, y=1.0 - 0.5 * title_height / height, va="center", fontsize=12)

    heat_image = None
    for i, row in enumerate(checked):
        low, high = _window(row["image"])
        axes = [figure.add_subplot(grid[i, j]) for j in range(len(_COLUMNS))]
        for j, ax in enumerate(axes):
            ax.imshow(row["image"], cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(_COLUMNS[j], fontsize=10)
        score = "" if row["score"] is None else f"\nscore {row['score']:.4g}"
        axes[0].set_ylabel(f"{row['name']}{score}", fontsize=9)
        if row["segmentation"] is not None:
            axes[1].imshow(label_rgba[row["segmentation"]], interpolation="nearest")
        else:
            axes[1].text(
                0.5,
                0.5,
                "no segmentation",
                ha="center",
                va="center",
                transform=axes[1].transAxes,
                bbox=_NOTE_BOX,
            )
        if row["a_xi"] is not None:
            heat_image = axes[2].imshow(
                row["a_xi"], cmap=heat, vmin=0.0, vmax=1.0, alpha=OVERLAY_ALPHA, interpolation="nearest"
            )
        else:
            axes[2].text(
                0.5, 0.5, "no A_xi", ha="center", va="center", transform=axes[2].transAxes, bbox=_NOTE_BOX
            )

    if heat_image is not None:
        # One colour bar for the whole column, outside the panels so every panel keeps its size.
        bar = figure.add_axes([0.895, bottom, 0.015, top - bottom])
        colorbar = figure.colorbar(heat_image, cax=bar, ticks=[0.0, 0.25, 0.5, 0.75, 1.0])
        colorbar.set_label("A_xi (1 = out-of-distribution)", fontsize=8)
    if any(r["segmentation"] is not None for r in checked):
        handles = [Patch(color=label_rgba[k, :3], label=names[k]) for k in range(1, num_classes)]
        figure.legend(
            handles=handles,
            loc="lower center",
            ncol=min(len(handles), 6),
            fontsize=8,
            frameon=False,
            bbox_to_anchor=(0.5, 0.0),
        )

    return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=DPI), overwrite)
