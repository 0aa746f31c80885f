"""PNG montages: size, colours, refusals, no pyplot."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from monai_ood.visualize import DPI, PANEL_INCHES, TITLE_INCHES, save_montage  # noqa: E402


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def _row(name: str = "case", shape=(32, 40), seed: int = 0, **overrides) -> dict:
    rng = np.random.default_rng(seed)
    image = rng.random(shape) * 1000
    row = {
        "name": name,
        "image": image,
        "segmentation": (image // 250).astype(np.int64),
        "a_xi": rng.random(shape),
        "score": 0.42,
    }
    row.update(overrides)
    return row


def test_montage_size_and_optional_columns(tmp_path: Path):
    pyplot_before = "matplotlib.pyplot" in sys.modules
    rows = [_row("a"), _row("b", segmentation=None, score=None), _row("c", a_xi=None)]
    path = save_montage(rows, tmp_path / "montage.png")
    assert _png_size(path) == (int(3 * PANEL_INCHES * DPI), int(3 * PANEL_INCHES * DPI)) == (900, 900)
    titled = save_montage(rows[:1], tmp_path / "titled.png", title="OOD check")
    assert _png_size(titled) == (900, int((PANEL_INCHES + TITLE_INCHES) * DPI)) == (900, 340)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["montage.png", "titled.png"]  # no temporary files
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before  # the object API only


def test_heat_overlay_colours(tmp_path: Path):
    import matplotlib.image

    def centre_of_heat_panel(a_xi: float) -> np.ndarray:
        row = _row(shape=(32, 32), image=np.zeros((32, 32)), segmentation=None, a_xi=np.full((32, 32), a_xi))
        path = save_montage([row], tmp_path / f"heat{a_xi}.png")
        pixels = matplotlib.image.imread(str(path))
        height, width = pixels.shape[:2]
        # The third panel's centre: panels span 5%..88% of the width; the row lies between the margins.
        return pixels[int(height * 0.5), int(width * (0.05 + 0.83 * 5 / 6)), :3]

    red, blue = centre_of_heat_panel(1.0), centre_of_heat_panel(0.0)
    assert red[0] > 2 * red[2]  # A_xi = 1 is red
    assert blue[2] > 2 * blue[0]  # A_xi = 0 is blue


def test_montage_refusals(tmp_path: Path):
    out = tmp_path / "m.png"
    with pytest.raises(
        ValueError, match=r"'segmentation' shape \(16, 40\) does not match the image shape \(32, 40\)"
    ):
        save_montage([_row(segmentation=np.zeros((16, 40), int))], out)
    with pytest.raises(ValueError, match="'a_xi' shape"):
        save_montage([_row(a_xi=np.zeros((32, 41)))], out)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        save_montage([_row(a_xi=np.full((32, 40), 1.5))], out)
    with pytest.raises(ValueError, match="2D"):
        save_montage([_row(image=np.zeros((4, 32, 40)))], out)
    with pytest.raises(ValueError, match="integer labels"):
        save_montage([_row(segmentation=np.full((32, 40), 0.5))], out)
    with pytest.raises(ValueError, match=">= 0"):
        save_montage([_row(segmentation=np.full((32, 40), -1))], out)
    with pytest.raises(ValueError, match="non-empty"):
        save_montage([], out)
    with pytest.raises(ValueError, match=r"\.png"):
        save_montage([_row()], tmp_path / "m.jpg")
    with pytest.raises(ValueError, match="'score'"):
        save_montage([_row(score="high")], out)
    assert not out.exists()
    save_montage([_row()], out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_montage([_row()], out)
    save_montage([_row(), _row("second")], out, overwrite=True)
    assert _png_size(out) == (900, 600)
