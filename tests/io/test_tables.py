"""The score table of an output folder (monai_ood.io.tables): scores.csv read back with the csv module and
scores.json read back by ScoreTable (what --resume trusts), an unchanged file left alone, old and
unreadable tables, and the merge of a split run's part tables."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from monai_ood.io.tables import SCORE_FIELDS, ScoreTable, merge_parts, part_name, volume_row


def _table(output: Path, name: str = "scores") -> ScoreTable:
    """Input b (2 slices) scored, input a failed, set in that order."""
    table = ScoreTable(output, name)
    paths = {"segmentation": output / "b_seg.nii.gz", "score_map": output / "b_score.nii.gz"}
    scored = SimpleNamespace(image_score=1.25, ood_degree=0.75, calibrated_degree=0.5)
    slices = [
        {"input": "/data/b.nii.gz", "slice": k, "position_mm": 2.0 * k, "image_score": 1.0 + k}
        for k in (0, 1)
    ]
    table.set("b", volume_row(Path("/data/b.nii.gz"), "ok", paths, scored=scored), slices)
    table.set(
        "a", volume_row(Path("/data/a.nrrd"), "failed", {"segmentation": output / "a_seg.nii.gz"}, "bad")
    )
    return table


def test_score_table_writes_csv_and_json_that_read_back(tmp_path):
    table = _table(tmp_path)
    table.write()
    with open(tmp_path / "scores.csv", newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        assert reader.fieldnames == SCORE_FIELDS
        rows = list(reader)
    # volume rows in the order they were set (with their status and error), then the ok inputs' slices
    assert [(r["input"], r["status"], r["error"], r["level"], r["slice"]) for r in rows] == [
        ("/data/b.nii.gz", "ok", "", "volume", ""),
        ("/data/a.nrrd", "failed", "bad", "volume", ""),
        ("/data/b.nii.gz", "ok", "", "slice", "0"),
        ("/data/b.nii.gz", "ok", "", "slice", "1"),
    ]
    assert [r["image_score"] for r in rows] == ["1.25", "", "1.0", "2.0"]
    assert (rows[0]["ood_degree"], rows[0]["calibrated_degree"], rows[1]["ood_degree"]) == ("0.75", "0.5", "")
    assert rows[3]["position_mm"] == "2.0"

    data = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    assert data["volumes"][0]["segmentation"] == str(tmp_path / "b_seg.nii.gz")  # the maps, in the JSON
    assert data["volumes"][1]["segmentation"] is None  # a failed input has none
    again = ScoreTable(tmp_path)
    again.read(strict=True)
    assert again.rows == table.rows
    assert list(again.rows) == ["b", "a"] and again.slices == {"b": table.slices["b"], "a": []}

    inode = (tmp_path / "scores.json").stat().st_ino
    again.write()  # the same content: the files are left alone
    assert (tmp_path / "scores.json").stat().st_ino == inode


def test_old_and_unreadable_tables(tmp_path):
    # a table written before rows had a status: every input in it had succeeded
    old = {"volumes": [{"input": "/data/c.nii.gz", "image_score": 3.0}], "slices": []}
    (tmp_path / "scores.json").write_text(json.dumps(old), encoding="utf-8")
    table = ScoreTable(tmp_path)
    table.read(strict=True)
    assert table.rows == {"c": {"input": "/data/c.nii.gz", "status": "ok", "error": None, "image_score": 3.0}}

    (tmp_path / "scores.json").write_text('{"volumes": [{"no input": 1}]}', encoding="utf-8")
    with pytest.raises(ValueError, match="is not a score table monai-ood can read"):
        ScoreTable(tmp_path).read(strict=True)
    lenient = ScoreTable(tmp_path)
    lenient.read(strict=False)
    assert lenient.rows == {} and lenient.slices == {}
    missing = ScoreTable(tmp_path / "nowhere")
    missing.read(strict=True)
    assert missing.rows == {}


def test_merge_parts_orders_volumes_by_input_and_refuses_an_input_of_two_parts(tmp_path):
    assert part_name(1, 3) == "scores.part-1-of-3"
    first = _table(tmp_path, part_name(0, 2))  # b and a
    first.write()
    second = ScoreTable(tmp_path, part_name(1, 2))
    second.set("aa", volume_row(Path("/data/aa.nii.gz"), "skipped", {"segmentation": tmp_path / "x"}))
    second.write()
    merged = merge_parts(tmp_path, 2)
    data = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    assert [row["input"] for row in data["volumes"]] == ["/data/a.nrrd", "/data/aa.nii.gz", "/data/b.nii.gz"]
    assert [(row["input"], row["slice"]) for row in data["slices"]] == [
        ("/data/b.nii.gz", 0),
        ("/data/b.nii.gz", 1),
    ]
    assert merged.json_path == tmp_path / "scores.json" and (tmp_path / "scores.csv").is_file()
    merge_parts(tmp_path, 3)  # a run split in 3: none of its parts has written a table yet
    assert json.loads((tmp_path / "scores.json").read_text(encoding="utf-8")) == {"volumes": [], "slices": []}

    second.set("b", first.rows["b"])
    second.write()
    with pytest.raises(ValueError, match=r"'/data/b.nii.gz' is listed by parts 0 and 1 of 2"):
        merge_parts(tmp_path, 2)
