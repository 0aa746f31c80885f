"""Triage: the scored scans of an output folder ranked worst first, as ``triage.csv`` and a self-contained
HTML report (thumbnails inline as PNG data, no external file, viewable offline).

The ranking is by OOD degree (:mod:`monai_ood.calibration.degree`: the fraction of validation images
that score lower), or by the image score when the model has no degree. Each row shows the scan's most
atypical slice (the slice of the input's voxel grid with the largest mean A_xi, else A) with A_xi over
the image, the degree, the image score, the segmentation's foreground volume, the input's path and
geometry; rows at or above the threshold are flagged and a line separates them from the rest.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .files import atomic_write_text

__all__ = ["TRIAGE_FIELDS", "rank_scans", "screenshot", "thumbnail_png", "write_triage"]

TRIAGE_FIELDS = [
    "rank",
    "input",
    "ood_degree",
    "image_score",
    "calibrated_degree",
    "flagged",
    "foreground_ml",
    "size",
    "spacing_mm",
    "atypical_slice",
]


def rank_scans(output: Path) -> list[dict]:
    """The ``ok`` volume rows of ``output/scores.json``, worst first (degree, else image score)."""
    table = json.loads((output / "scores.json").read_text(encoding="utf-8"))
    rows = [dict(row) for row in table["volumes"] if row.get("status", "ok") == "ok"]
    by_degree = all(row.get("ood_degree") is not None for row in rows)
    key = "ood_degree" if by_degree else "image_score"
    rows.sort(key=lambda row: (-float(row[key]), row["input"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
        row["ranked_by"] = key
    return rows


def _slice_of(array: np.ndarray, index: int) -> np.ndarray:
    return array[index] if array.ndim == 3 else array


def thumbnail_png(image: sitk.Image, score: sitk.Image, size: int = 160) -> tuple[bytes, int]:
    """``(PNG bytes, slice index)``: the slice (array axis 0) of ``score`` with the largest mean, the image
    in grey and the map over it in the heat-map colours (transparent below 0.5 of its range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io.slicer import heatmap_colors

    values = sitk.GetArrayFromImage(score).astype(np.float32)
    pixels = sitk.GetArrayFromImage(image).astype(np.float32)
    index = int(np.argmax(values.reshape(values.shape[0], -1).mean(1))) if values.ndim == 3 else 0
    grey, heat = _slice_of(pixels, index), _slice_of(values, index)
    low, high = np.percentile(grey, [1, 99]) if grey.size else (0.0, 1.0)
    grey = np.clip((grey - low) / max(high - low, 1e-12), 0, 1)
    top = float(heat.max()) if heat.size else 1.0
    scaled = np.clip(heat / top, 0, 1) if top > 0 else np.zeros_like(heat)
    colors = heatmap_colors().astype(np.float32) / 255.0
    rgb = colors[np.round(scaled * (len(colors) - 1)).astype(int)]
    alpha = np.where(scaled > 0.5, 0.6, 0.0)[..., None]
    composite = grey[..., None] * (1 - alpha) + rgb * alpha
    spacing = image.GetSpacing()
    aspect = spacing[1] / spacing[0] if len(spacing) >= 2 and spacing[0] > 0 else 1.0
    figure = plt.figure(figsize=(size / 100, size / 100), dpi=100)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.imshow(composite, origin="lower", aspect=aspect, interpolation="nearest")
    axes.set_axis_off()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor="black")
    plt.close(figure)
    return buffer.getvalue(), index


def _foreground_ml(segmentation: sitk.Image) -> float:
    voxels = int((sitk.GetArrayViewFromImage(segmentation) > 0).sum())
    return voxels * float(np.prod(segmentation.GetSpacing())) / 1000.0


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
td, th { border-bottom: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: middle; }
tr.flagged td { background: #fde2e2; }
tr.threshold td { background: #c0392b; color: white; font-weight: bold; padding: 2px 10px; }
img { border: 3px solid #1f77b4; display: block; }
td.path { font-family: monospace; font-size: 85%; max-width: 28em; word-break: break-all; }
"""


def write_triage(output: Path, threshold: float = 0.95) -> tuple[Path, Path, list[dict]]:
    """Write ``triage.csv`` and ``triage.html`` for the scored scans of ``output`` (after ``score``).

    Returns:
        ``(csv_path, html_path, rows)``; each row also has ``flagged`` (degree >= threshold).
    """
    from .io import read_image

    output = Path(output)
    rows = rank_scans(output)
    body = []
    line_drawn = False
    for row in rows:
        degree = row.get("ood_degree")
        row["flagged"] = degree is not None and float(degree) >= threshold
        segmentation = read_image(row["segmentation"])
        row["foreground_ml"] = round(_foreground_ml(segmentation), 3)
        row["size"] = "x".join(str(n) for n in segmentation.GetSize())
        row["spacing_mm"] = "x".join(f"{s:.3g}" for s in segmentation.GetSpacing())
        map_path = row.get("calibrated_map") or row["score_map"]
        png, index = thumbnail_png(read_image(row["input"]), read_image(map_path))
        row["atypical_slice"] = index
        if not row["flagged"] and not line_drawn and any(r["flagged"] for r in rows):
            body.append(
                f'<tr class="threshold"><td colspan="7">OOD degree {threshold:.3g}: review the scans above</td></tr>'
            )
            line_drawn = True
        picture = base64.b64encode(png).decode("ascii")
        body.append(
            f'<tr class="{"flagged" if row["flagged"] else "scan"}">'
            f"<td>{row['rank']}</td>"
            f'<td><img alt="slice {index} of {html.escape(Path(row["input"]).name)}" '
            f'src="data:image/png;base64,{picture}" width="160" height="160"></td>'
            f"<td>{_fmt(degree)}</td><td>{_fmt(row.get('image_score'))}</td>"
            f"<td>{row['foreground_ml']:.1f} mL</td>"
            f'<td class="path">{html.escape(row["input"])}</td>'
            f"<td>{row['size']} voxels<br>{row['spacing_mm']} mm</td></tr>"
        )
    ranked_by = rows[0]["ranked_by"] if rows else "ood_degree"
    meaning = (
        "OOD degree: the fraction of validation images that score lower (0.5 typical, 0.99 more atypical "
        "than 99% of them); not a probability of a segmentation error."
        if ranked_by == "ood_degree"
        else "This model has no OOD degree (calibrate it with enough validation images): ranked by image score."
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>monai-ood triage: {len(rows)} scans</title>
<style>{_STYLE}</style></head><body>
<h1>monai-ood triage</h1>
<p>{len(rows)} scans, worst first. {html.escape(meaning)} Thumbnails: the most atypical slice, A_xi over the
image (red = beyond validation).</p>
<table><thead><tr><th>rank</th><th>most atypical slice</th><th>OOD degree</th><th>image score</th>
<th>foreground</th><th>input</th><th>geometry</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table></body></html>
"""
    html_path = atomic_write_text(output / "triage.html", page, overwrite=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TRIAGE_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    csv_path = atomic_write_text(output / "triage.csv", buffer.getvalue(), overwrite=True)
    return csv_path, html_path, rows


def screenshot(html_path: Path, png_path: Path, window: tuple[int, int] = (1100, 1400)) -> Path | None:
    """A PNG picture of the report as a browser shows it (headless Chromium, offline), or ``None`` with
    one line on stderr when no ``chromium`` is installed (Debian's package; ``make setup`` installs it).

    Args:
        html_path: ``triage.html``.
        png_path: the PNG to write (replaced if it exists).
        window: browser window ``(width, height)`` in pixels; the page is cut at its height.
    """
    import shutil
    import subprocess
    import sys
    import tempfile

    from .files import atomic_write

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print(
            "triage screenshot skipped: no chromium (as root: apt-get install -y chromium)", file=sys.stderr
        )
        return None

    def render(temporary: Path) -> None:
        with tempfile.TemporaryDirectory() as profile:
            command = [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--screenshot={temporary}",
                f"--window-size={window[0]},{window[1]}",
                Path(html_path).resolve().as_uri(),
            ]
            done = subprocess.run(command, capture_output=True, text=True, timeout=180)
        if not Path(temporary).is_file() or Path(temporary).stat().st_size == 0:
            raise RuntimeError(f"chromium wrote no screenshot: {' '.join(done.stderr.split())[-300:]}")

    return atomic_write(Path(png_path), render, overwrite=True)
