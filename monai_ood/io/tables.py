"""The score table of an output folder, the same for every front-end that scores images: ``scores.json``
(read back by ``--resume``) and ``scores.csv``, one volume row per input (with its ``status`` and
``error``) and the slice rows of 2D models.

Columns (``scores.csv``): ``input``, ``status`` (``ok`` / ``failed`` / ``skipped``), ``error``, ``level``
(``volume`` or ``slice``), ``slice``, ``position_mm``, ``has_signal``, ``foreground_fraction``,
``image_score`` (the detector's image score: higher = more atypical) and ``calibrated_degree``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from ..files import atomic_write_text

__all__ = ["SCORE_FIELDS", "ScoreTable", "volume_row"]

SCORE_FIELDS = [
    "input",
    "status",
    "error",
    "level",
    "slice",
    "position_mm",
    "has_signal",
    "foreground_fraction",
    "image_score",
    "calibrated_degree",
]


class ScoreTable:
    """The score table of an output folder: ``scores.json`` (read back by ``--resume``) and ``scores.csv``.

    One volume row per input with its ``status``: ``ok`` (its maps are all in place, with the scores),
    ``failed`` (with the ``error``), ``skipped`` (not scored yet); the slice rows of ``ok`` inputs. Rows
    are keyed by the input's output stem, which names its maps in the folder, and keep their place when
    re-scored. An input's maps are written before its row says ``ok``, and both files are replaced
    atomically, so the table never claims more than the folder holds.
    """

    def __init__(self, output: Path) -> None:
        self.json_path = output / "scores.json"
        self.csv_path = output / "scores.csv"
        self.rows: dict[str, dict] = {}
        self.slices: dict[str, list[dict]] = {}

    def read(self, strict: bool) -> None:
        """Load ``scores.json`` if there is one; an unreadable table is an error if ``strict``, else ignored."""
        from .images import output_stem

        if not self.json_path.exists():
            return
        try:
            data = json.loads(self.json_path.read_text(encoding="utf-8"))
            slices: dict[str, list[dict]] = {}
            for row in data.get("slices", []):
                slices.setdefault(row["input"], []).append(row)
            for row in data["volumes"]:
                # tables without a status were written only once every input had succeeded
                rest = {key: value for key, value in row.items() if key not in ("input", "status", "error")}
                full = {"input": row["input"], "status": row.get("status", "ok"), "error": row.get("error")}
                stem = output_stem(row["input"])
                self.rows[stem] = {**full, **rest}
                self.slices[stem] = slices.get(row["input"], [])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            if strict:
                raise ValueError(
                    f"{str(self.json_path)!r} is not a score table monai-ood can read ({error}); move it "
                    "away, or pass --overwrite instead of --resume to replace the outputs"
                ) from error
            self.rows, self.slices = {}, {}

    def set(self, stem: str, row: dict, slices: Sequence[dict] = ()) -> None:
        self.rows[stem] = row
        self.slices[stem] = list(slices)

    def write(self) -> None:
        """Rewrite both files atomically (a file whose content would not change is left alone)."""
        volumes = list(self.rows.values())
        slices = [row for stem in self.rows for row in self.slices[stem]]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=SCORE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in volumes:
            writer.writerow({**row, "level": "volume"})
        for row in slices:
            writer.writerow({**row, "status": "ok", "level": "slice"})
        # the CSV first: scores.json, which --resume trusts, never gets ahead of the folder
        for path, text in (
            (self.csv_path, buffer.getvalue()),
            (self.json_path, json.dumps({"volumes": volumes, "slices": slices}, indent=2)),
        ):
            if not (path.is_file() and path.read_bytes() == text.encode("utf-8")):
                atomic_write_text(path, text, overwrite=True)


def volume_row(
    path: Path, status: str, paths: dict[str, Path], error: str | None = None, scored=None
) -> dict:
    return {
        "input": str(path),
        "status": status,
        "error": error,
        "image_score": None if scored is None else scored.image_score,
        "calibrated_degree": None if scored is None else scored.calibrated_degree,
        **{key: str(value) if status == "ok" else None for key, value in paths.items()},
    }
