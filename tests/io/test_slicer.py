"""Slicer colour tables (parsed as Slicer parses them) and the loader script, run against a fake Slicer."""

from __future__ import annotations

import py_compile
import runpy
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from monai_ood.io.slicer import (
    heatmap_colors,
    heatmap_ctbl,
    label_colors,
    labels_ctbl,
    loader_script,
    write_slicer_files,
)


def _parse_ctbl(text: str) -> list[tuple[int, str, tuple[int, ...]]]:
    """Parse a discrete colour table the way vtkMRMLColorTableStorageNode reads it."""
    entries = []
    for line in text.splitlines():
        assert len(line) < 1024  # Slicer reads lines into a 1024-character buffer
        if line.startswith("#"):
            assert not line.startswith("# Color procedural file")  # would make Slicer reject the file
            continue
        if not line:
            continue
        index, name, *rgba = line.split()
        assert len(rgba) == 4, line
        entries.append((int(index), name, tuple(int(c) for c in rgba)))
    return entries


def test_heatmap_colors_run_blue_to_red():
    colors = heatmap_colors()
    assert colors.shape == (256, 3) and colors.dtype == np.uint8
    assert tuple(colors[0]) == (59, 76, 192) and tuple(colors[-1]) == (180, 4, 38)
    assert colors[0, 2] > colors[0, 0] and colors[-1, 0] > colors[-1, 2]
    assert np.all(np.diff(colors[:, 0].astype(int)[:160]) >= 0)  # red rises over the blue half
    matplotlib = pytest.importorskip("matplotlib")
    reference = np.round(matplotlib.colormaps["coolwarm"](np.linspace(0, 1, 256))[:, :3] * 255)
    assert np.abs(reference - colors).max() <= 8  # a close copy of coolwarm


def test_label_colors():
    colors = label_colors(4)
    assert colors.shape == (4, 4) and colors[0, 3] == 0 and np.all(colors[1:, 3] == 255)
    many = label_colors(20)
    assert len({tuple(c) for c in many[1:, :3]}) == 19  # all classes distinguishable
    with pytest.raises(ValueError, match="num_classes"):
        label_colors(1)


def test_ctbl_texts_parse_like_slicer():
    heat = _parse_ctbl(heatmap_ctbl())
    assert [index for index, _, _ in heat] == list(range(256))
    assert heatmap_ctbl().startswith("# Color table file")
    rgb = np.array([rgba[:3] for _, _, rgba in heat])
    np.testing.assert_array_equal(rgb, heatmap_colors())
    assert max(rgb.max(axis=0)) > 1  # Slicer warns about tables with all values <= 1
    assert all(rgba[3] == 255 for _, _, rgba in heat)

    labels = _parse_ctbl(labels_ctbl())
    assert [(index, name) for index, name, _ in labels] == [
        (0, "background"),
        (1, "CSF"),
        (2, "grey_matter"),
        (3, "white_matter"),
    ]
    assert labels[0][2][3] == 0  # transparent background
    named = _parse_ctbl(labels_ctbl(3, ["background", "grey matter", "white\tmatter"]))
    assert [name for _, name, _ in named] == ["background", "grey_matter", "white_matter"]
    assert [name for _, name, _ in _parse_ctbl(labels_ctbl(3))] == ["background", "class_1", "class_2"]
    with pytest.raises(ValueError, match="expected 4 class names"):
        labels_ctbl(4, ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        labels_ctbl(2, ["background", " "])


def test_write_slicer_files(tmp_path: Path):
    out = tmp_path / "outputs"
    paths = write_slicer_files(out)
    assert {key: p.name for key, p in paths.items()} == {
        "heatmap": "ood_heatmap.ctbl",
        "labels": "labels.ctbl",
        "loader": "load_in_slicer.py",
    }
    assert paths["loader"].read_text() == loader_script()
    assert len(_parse_ctbl(paths["labels"].read_text())) == 4
    assert sorted(p.name for p in out.iterdir()) == ["labels.ctbl", "load_in_slicer.py", "ood_heatmap.ctbl"]

    assert write_slicer_files(out) == paths  # same content: a second run needs no --overwrite
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_slicer_files(out, num_classes=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # all or nothing
    write_slicer_files(out, num_classes=3, overwrite=True)
    assert len(_parse_ctbl((out / "labels.ctbl").read_text())) == 3
    assert sorted(p.name for p in out.iterdir()) == ["labels.ctbl", "load_in_slicer.py", "ood_heatmap.ctbl"]


# ----------------------------------------------------------------------------------------------------
# the loader script, with a fake `slicer` module recording what Slicer would be asked to do
# ----------------------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self, log: list, owner: str):
        self._log, self._owner = log, owner

    def __getattr__(self, method: str):
        return lambda *args: self._log.append((self._owner, method, args))


class _Node:
    def __init__(self, log: list, kind: str, path: str):
        self.path, self.kind = path, kind
        self._display = _Recorder(log, f"display:{Path(path).name}")

    def GetDisplayNode(self):  # noqa: N802 - Slicer's API
        return self._display

    def GetID(self):  # noqa: N802
        return f"vtkMRML{self.kind}:{Path(self.path).name}"


def _fake_slicer() -> tuple[types.ModuleType, list]:
    log: list = []

    def load(kind):
        def loader(path, properties=None):
            log.append(("util", kind, (path, dict(properties or {}))))
            return _Node(log, kind, path)

        return loader

    util = types.SimpleNamespace(
        loadVolume=load("Volume"),
        loadLabelVolume=load("LabelVolume"),
        loadColorTable=lambda path: (
            log.append(("util", "ColorTable", (path,))),
            _Node(log, "ColorTable", path),
        )[1],
        setSliceViewerLayers=lambda **kwargs: log.append(("util", "setSliceViewerLayers", kwargs)),
    )
    module = types.ModuleType("slicer")
    module.util = util
    return module, log


@pytest.fixture
def slicer_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write the Slicer files and fake outputs; return a function running the loader with arguments."""
    paths = write_slicer_files(tmp_path)
    module, log = _fake_slicer()
    monkeypatch.setitem(sys.modules, "slicer", module)

    def run(*args: str) -> list:
        monkeypatch.setattr(sys, "argv", [str(paths["loader"]), *args])
        runpy.run_path(str(paths["loader"]), run_name="__main__")
        return log

    return run


def test_loader_compiles(tmp_path: Path):
    paths = write_slicer_files(tmp_path)
    py_compile.compile(str(paths["loader"]), cfile=str(tmp_path / "loader.pyc"), doraise=True)


def test_loader_loads_image_map_and_segmentation(slicer_run, tmp_path: Path):
    image, a_xi, seg = (tmp_path / n for n in ("scan.nii.gz", "scan_a_xi.nii.gz", "scan_seg.nii.gz"))
    for path in (image, a_xi, seg):
        path.write_bytes(b"")
    log = slicer_run("--", "--image", str(image), "--map", str(a_xi), "--seg", str(seg))

    loads = [
        (method, args[0])
        for owner, method, args in log
        if owner == "util" and method != "setSliceViewerLayers"
    ]
    assert loads == [
        ("Volume", str(image)),
        ("Volume", str(a_xi)),
        ("ColorTable", str(tmp_path / "ood_heatmap.ctbl")),
        ("LabelVolume", str(seg)),
        ("ColorTable", str(tmp_path / "labels.ctbl")),
    ]
    names = [args[1]["name"] for owner, method, args in log if method in ("Volume", "LabelVolume")]
    assert names == ["scan", "scan_a_xi", "scan_seg"]

    heat_display = [(m, a) for owner, m, a in log if owner == "display:scan_a_xi.nii.gz"]
    assert ("SetAndObserveColorNodeID", ("vtkMRMLColorTable:ood_heatmap.ctbl",)) in heat_display
    assert ("AutoWindowLevelOff", ()) in heat_display
    assert ("SetWindowLevelMinMax", (0.0, 1.0)) in heat_display
    label_display = [(m, a) for owner, m, a in log if owner == "display:scan_seg.nii.gz"]
    assert label_display == [("SetAndObserveColorNodeID", ("vtkMRMLColorTable:labels.ctbl",))]

    (layers,) = [args for _, method, args in log if method == "setSliceViewerLayers"]
    assert layers["background"].path == str(image)
    assert layers["foreground"].path == str(a_xi)
    assert layers["label"].path == str(seg)
    assert layers["foregroundOpacity"] == 0.5


def test_loader_map_only_and_dicom_folder(slicer_run, tmp_path: Path):
    series = tmp_path / "series7"
    series.mkdir()
    for name in ("IM0002.dcm", "IM0001.dcm", ".DS_Store"):
        (series / name).write_bytes(b"")
    a_xi = tmp_path / "series7_a_xi.nii.gz"
    a_xi.write_bytes(b"")
    log = slicer_run("--", "--image", str(series), "--map", str(a_xi), "--opacity", "0.3")
    first = [args for owner, method, args in log if method == "Volume"][0]
    assert first == (str(series / "IM0001.dcm"), {"name": "series7", "singleFile": False})
    (layers,) = [args for _, method, args in log if method == "setSliceViewerLayers"]
    assert layers["foregroundOpacity"] == 0.3 and "label" not in layers


def test_loader_usage_without_exiting(slicer_run, tmp_path: Path, capsys: pytest.CaptureFixture):
    # Inside Slicer, sys.exit would close the application: every problem prints the usage instead.
    for args in ((), ("--",), ("--", "--bogus"), ("--", "--map", str(tmp_path / "missing.nii.gz")), ("-h",)):
        log = slicer_run(*args)
        assert "usage: Slicer --python-script load_in_slicer.py" in capsys.readouterr().out
        assert not [entry for entry in log if entry[0] == "util"]


def _exec_loader(paths) -> dict:
    """The loader as Slicer's console runs it: exec() of its text, without a __file__."""
    namespace: dict = {"__name__": "slicer_console"}
    exec(compile(paths["loader"].read_text(), "<console>", "exec"), namespace)
    return namespace


def test_console_call_with_the_command_lines_names_finds_the_tables_beside_the_maps(tmp_path, monkeypatch):
    out = tmp_path / "scores"
    paths = write_slicer_files(out / "slicer")
    a_xi, seg = out / "scan_score_calibrated.nii.gz", out / "scan_seg.nii.gz"
    for path in (a_xi, seg):
        path.write_bytes(b"")
    module, log = _fake_slicer()
    legends = []
    module.modules = types.SimpleNamespace(
        colors=types.SimpleNamespace(
            logic=lambda: types.SimpleNamespace(
                AddDefaultColorLegendDisplayNode=lambda node: (
                    legends.append(node.path) or _Recorder(log, "legend")
                )
            )
        )
    )
    monkeypatch.setitem(sys.modules, "slicer", module)
    monkeypatch.chdir(tmp_path)  # not the slicer folder: the tables must be found from the maps
    namespace = _exec_loader(paths)
    assert "__file__" not in namespace
    namespace["load"](map=str(a_xi), seg=str(seg))  # the README's call (was a TypeError)
    tables = [args[0] for owner, method, args in log if method == "ColorTable"]
    assert tables == [str(out / "slicer" / "ood_heatmap.ctbl"), str(out / "slicer" / "labels.ctbl")]
    heat = [(m, a) for owner, m, a in log if owner == f"display:{a_xi.name}"]
    assert ("SetApplyThreshold", (1,)) in heat and ("SetLowerThreshold", (0.8,)) in heat
    assert legends == [str(a_xi)] and ("legend", "SetVisibility", (True,)) in log
    with pytest.raises(ValueError, match="not both"):
        namespace["load"](map=str(a_xi), a_xi=str(a_xi))


def test_a_folder_of_two_dicom_series_loads_the_one_monai_ood_scores(slicer_run, tmp_path):
    import numpy as np
    import SimpleITK as sitk

    from monai_ood.io import read_image

    folder = tmp_path / "two"
    folder.mkdir()
    for uid, count, prefix in (
        ("1.2.826.0.1.3680043.2.1125.1", 3, "A"),
        ("1.2.826.0.1.3680043.2.1125.2", 5, "B"),
    ):
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k in range(count):
            plane = sitk.GetImageFromArray(np.full((4, 5), k + 1, np.int16))
            for tag, value in {
                "0008|0060": "MR",
                "0020|000d": f"{uid}.0",
                "0020|000e": uid,
                "0008|0018": f"{uid}.{k + 1}",
                "0020|0037": "1\\0\\0\\0\\1\\0",
                "0020|0032": f"0\\0\\{k}",
                "0020|0013": str(k + 1),
            }.items():
                plane.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"{prefix}{k}.dcm"))
            writer.Execute(plane)
    with pytest.warns(UserWarning, match="2 DICOM series"):
        assert read_image(folder).GetSize()[2] == 5  # monai-ood scores the larger series
    log = slicer_run("--", "--image", str(folder))
    (first,) = [args for owner, method, args in log if method == "Volume"]
    assert Path(first[0]).name.startswith("B")  # the first file by name (A0.dcm) is the other series
