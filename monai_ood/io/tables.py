"""The score table of an output folder, the same for every front-end that scores images: ``scores.json``
(read back by ``--resume``) and ``scores.csv``, one volume row per input (with its ``status`` and
``error``) and the slice rows of 2D models.

Columns (``scores.csv``): ``input``, ``status`` (``ok`` / ``failed`` / ``skipped``), ``error``, ``level``
(``volume`` or ``slice``), ``slice``, ``position_mm``, ``has_signal``, ``foreground_fraction``,
``image_score`` (the detector's image score: higher = more atypical), ``ood_degree`` (the fraction of
validation images that score lower, :mod:`monai_ood.calibration.degree`) and ``calibrated_degree``
(the mean of A_xi).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from ..files import atomic_write_text

__all__ = ["SCORE_FIELDS", "TABLE_LOCK", "ScoreTable", "merge_parts", "part_name", "volume_row"]

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
    "ood_degree",
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

    def __init__(self, output: Path, name: str = "scores") -> None:
        self.json_path = output / f"{name}.json"
        self.csv_path = output / f"{name}.csv"
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
        self._write(list(self.rows.values()), [row for stem in self.rows for row in self.slices[stem]])

    def _write(self, volumes: list[dict], slices: list[dict]) -> None:
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


def part_name(part_id: int, num_parts: int) -> str:
    """The table name of one part of a split run: ``scores.part-<k>-of-<n>``."""
    return f"scores.part-{part_id}-of-{num_parts}"


def merge_parts(output: Path, num_parts: int) -> ScoreTable:
    """Write ``scores.csv`` / ``scores.json`` from the part tables of a run split in ``num_parts``
    (``scores.part-<k>-of-<n>.json``, those that exist so far): every part's rows, volumes ordered by
    input path. Call it holding :func:`~monai_ood.files.lock_folder` with the name ``TABLE_LOCK``, so
    two parts never write the merged table at once; each part calls it after every input, so the merged
    table is complete as soon as the last part's last input is done.

    Raises:
        ValueError: a part table that cannot be read, or an input listed by two parts.
    """
    volumes: list[dict] = []
    slices: list[dict] = []
    seen: dict[str, int] = {}
    for part in range(num_parts):
        table = ScoreTable(output, part_name(part, num_parts))
        table.read(strict=True)
        for stem, row in table.rows.items():
            if stem in seen:
                raise ValueError(
                    f"{row['input']!r} is listed by parts {seen[stem]} and {part} of {num_parts}: were the "
                    "parts given different inputs? Score all parts with the same inputs"
                )
            seen[stem] = part
            volumes.append(row)
            slices.extend(table.slices[stem])
    volumes.sort(key=lambda row: row["input"])
    order = {row["input"]: k for k, row in enumerate(volumes)}
    slices.sort(key=lambda row: (order.get(row["input"], len(order)), row.get("slice", 0)))
    merged = ScoreTable(output)
    merged._write(volumes, slices)
    return merged


#: the lock the parts of a split run hold while they merge their tables
TABLE_LOCK = ".monai-ood.table.lock"


def volume_row(
    path: Path, status: str, paths: dict[str, Path], error: str | None = None, scored=None
) -> dict:
    return {
        "input": str(path),
        "status": status,
        "error": error,
        "image_score": None if scored is None else scored.image_score,
        "ood_degree": None if scored is None else scored.ood_degree,
        "calibrated_degree": None if scored is None else scored.calibrated_degree,
        **{key: str(value) if status == "ok" else None for key, value in paths.items()},
    }
