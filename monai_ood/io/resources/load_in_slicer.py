"""Show monai-ood outputs in 3D Slicer: the image, the OOD heat map A_xi over it, the segmentation.

From a terminal (Slicer stays open afterwards):

    Slicer --python-script load_in_slicer.py -- --image scan.nii.gz --map scan_a_xi.nii.gz --seg scan_seg.nii.gz

From Slicer's Python console:

    exec(open("/path/to/load_in_slicer.py").read())
    load(image="scan.nii.gz", map="scan_a_xi.nii.gz", seg="scan_seg.nii.gz")

(``map=`` / ``seg=`` as on the command line; ``a_xi=`` / ``segmentation=`` work too.) The image becomes
the background layer, A_xi the foreground layer (heat-map colours from ``ood_heatmap.ctbl``, window
0..1, opacity 0.5, values below the threshold 0.8 transparent, so typical regions show the image
alone; a colour legend beside it: blue = in-distribution, red = out-of-distribution) and the
segmentation a label map coloured by ``labels.ctbl``. The colour tables are looked up next to this
script, or (under ``exec()``, where a script has no ``__file__``) in the ``slicer/`` folder beside the
map or segmentation monai-ood wrote, unless given. Any of the three volumes may be left out. A DICOM
series is given as its folder; of a folder holding several series, the one with the most files is
loaded, as monai-ood scores it.

This file is written by monai-ood next to its outputs; it needs nothing but Slicer (Python 3.9+).
"""

from __future__ import annotations

import argparse
import os
import sys

USAGE = """usage: Slicer --python-script load_in_slicer.py -- [--image IMAGE] [--map A_XI] [--seg SEGMENTATION]
                                                 [--heatmap-ctbl CTBL] [--labels-ctbl CTBL] [--opacity 0.5]
                                                 [--threshold 0.8]
  --image         the input image (NIfTI/NRRD file or DICOM series folder): background layer
  --map           the A_xi score map written by monai-ood: foreground layer, heat-map colours
  --seg           the segmentation written by monai-ood: label layer
  --heatmap-ctbl  heat-map colour table (default: ood_heatmap.ctbl next to this script)
  --labels-ctbl   label colour table (default: labels.ctbl next to this script)
  --opacity       foreground (heat map) opacity, 0..1 (default 0.5)
  --threshold     A_xi below this is transparent, 0..1 (default 0.8; 0 shows every voxel)
Give at least one of --image, --map, --seg. In Slicer's Python console, call load(...) instead."""


def _script_dir():
    # Run with --python-script, __file__ is this script; exec()-ed in the console it may be missing.
    script = globals().get("__file__")
    return os.path.dirname(os.path.abspath(script)) if script else None


def _find_table(name, given, volumes):
    """The colour table ``name``: as given, else next to this script, else in the ``slicer/`` folder
    monai-ood writes beside its maps (found from the volumes' folders), else the working folder."""
    if given:
        return given
    folders = [_script_dir()]
    for volume in volumes:
        if volume:
            folder = os.path.dirname(os.path.abspath(volume))
            folders += [os.path.join(folder, "slicer"), folder]
    folders.append(os.getcwd())
    for folder in folders:
        if folder and os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return os.path.join(folders[0] or os.getcwd(), name)


def _series_file(folder):
    """A file of the DICOM series monai-ood reads from ``folder``: the series with the most files (by
    SimpleITK's GDCM series ids, which Slicer bundles), else the first file by name."""
    files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    if not files:
        raise FileNotFoundError(f"no files in the folder {folder}")
    try:
        import SimpleITK as sitk

        series = [
            sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
        ]
    except Exception:  # no SimpleITK, or files GDCM cannot parse: Slicer reads the folder itself
        series = []
    if series:
        largest = max(series, key=len)
        return sorted(largest)[0]
    return os.path.join(folder, files[0])


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    # argparse exits the process on bad arguments, which would close Slicer: raise instead.
    def error(self, message):
        raise _UsageError(message)


def _parser():
    parser = _Parser(prog="load_in_slicer.py", add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--image")
    parser.add_argument("--map", dest="a_xi")
    parser.add_argument("--seg", dest="segmentation")
    parser.add_argument("--heatmap-ctbl")
    parser.add_argument("--labels-ctbl")
    parser.add_argument("--opacity", type=float, default=0.5)
    parser.add_argument("--threshold", type=float, default=0.8)
    return parser


def _node(result):
    # Slicer < 4.11 returned (success, node) with returnNode=True; newer versions return the node.
    return result[1] if isinstance(result, tuple) else result


def _name(path):
    name = os.path.basename(os.path.normpath(path))
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _color_node(slicer, path):
    if not path or not os.path.isfile(path):
        print(f"load_in_slicer: colour table {path!r} not found; using Slicer's default colours")
        return None
    return _node(slicer.util.loadColorTable(path))


def _color_legend(slicer, node):
    """A colour legend of the heat map in the slice views (Slicer 5+; older versions go without)."""
    try:
        legend = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(node)
        legend.SetTitleText("A_xi (OOD)")
        legend.SetVisibility(True)
    except AttributeError:
        print("load_in_slicer: this Slicer has no colour legends; blue = in-distribution, red = OOD")


def load(
    image=None,
    a_xi=None,
    segmentation=None,
    heatmap_ctbl=None,
    labels_ctbl=None,
    opacity=0.5,
    threshold=0.8,
    map=None,  # noqa: A002 - the command line's name
    seg=None,
):
    """Load the volumes into the current Slicer scene and lay them out in the slice views.

    Args:
        image: the input image file or DICOM series folder (background layer).
        a_xi: the A_xi map (foreground layer, heat-map colours, window 0..1); ``map=`` also works.
        segmentation: the label map (label layer, label colours); ``seg=`` also works.
        heatmap_ctbl: heat-map colour table (default: ``ood_heatmap.ctbl`` next to this script).
        labels_ctbl: label colour table (default: ``labels.ctbl`` next to this script).
        opacity: foreground opacity in [0, 1].
        threshold: A_xi values below it are transparent (0 shows every voxel).
        map, seg: the command line's names of ``a_xi`` and ``segmentation``.

    Returns:
        ``{"image": node, "a_xi": node, "segmentation": node}`` for the volumes given.

    Raises:
        ValueError: no volume given, or ``opacity`` outside [0, 1].
        FileNotFoundError: a given volume does not exist.
    """
    import slicer

    if map is not None and a_xi is not None or seg is not None and segmentation is not None:
        raise ValueError("give the map as map= or a_xi=, the segmentation as seg= or segmentation=, not both")
    a_xi = a_xi if map is None else map
    segmentation = segmentation if seg is None else seg
    if not (image or a_xi or segmentation):
        raise ValueError("give at least one of image, a_xi, segmentation")
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must lie in [0, 1], got {opacity!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
    missing = [p for p in (image, a_xi, segmentation) if p and not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"not found: {', '.join(missing)}")
    heatmap_ctbl = _find_table("ood_heatmap.ctbl", heatmap_ctbl, (a_xi, segmentation))
    labels_ctbl = _find_table("labels.ctbl", labels_ctbl, (segmentation, a_xi))

    nodes, layers = {}, {}
    if image:
        if os.path.isdir(image):
            # A DICOM series folder: load one file of the series monai-ood read; Slicer reads the rest.
            path, properties = _series_file(image), {"name": _name(image), "singleFile": False}
        else:
            path, properties = image, {"name": _name(image), "singleFile": True}
        nodes["image"] = layers["background"] = _node(slicer.util.loadVolume(path, properties))
    if a_xi:
        node = _node(slicer.util.loadVolume(a_xi, {"name": _name(a_xi), "singleFile": True}))
        display = node.GetDisplayNode()
        color = _color_node(slicer, heatmap_ctbl)
        if color is not None:
            display.SetAndObserveColorNodeID(color.GetID())
        # A_xi is a probability-like score: a fixed 0..1 window makes colours comparable across scans.
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        if threshold > 0:  # typical (in-distribution) regions stay transparent: the image shows there
            display.SetApplyThreshold(1)
            display.SetLowerThreshold(float(threshold))
            display.SetUpperThreshold(1.0)
        _color_legend(slicer, node)
        nodes["a_xi"] = layers["foreground"] = node
        if "background" not in layers:
            layers["background"] = node
    if segmentation:
        node = _node(slicer.util.loadLabelVolume(segmentation, {"name": _name(segmentation)}))
        color = _color_node(slicer, labels_ctbl)
        if color is not None:
            node.GetDisplayNode().SetAndObserveColorNodeID(color.GetID())
        nodes["segmentation"] = layers["label"] = node
    if "foreground" in layers:
        layers["foregroundOpacity"] = float(opacity)
    slicer.util.setSliceViewerLayers(fit=True, **layers)
    return nodes


def main(argv=None):
    """Parse the arguments after ``--`` (or all of them) and :func:`load`; returns an exit status."""
    argv = list(sys.argv if argv is None else argv)
    args = argv[argv.index("--") + 1 :] if "--" in argv else argv[1:]
    try:
        options = _parser().parse_args(args)
    except _UsageError as error:
        print(f"load_in_slicer: {error}\n{USAGE}")
        return 2
    if options.help:
        print(USAGE)
        return 0
    if not (options.image or options.a_xi or options.segmentation):
        print(f"load_in_slicer: nothing to load\n{USAGE}")
        return 2
    try:
        load(
            image=options.image,
            a_xi=options.a_xi,
            segmentation=options.segmentation,
            heatmap_ctbl=options.heatmap_ctbl,
            labels_ctbl=options.labels_ctbl,
            opacity=options.opacity,
            threshold=options.threshold,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"load_in_slicer: {error}\n{USAGE}")
        return 2
    return 0


if __name__ == "__main__":
    # No sys.exit: inside Slicer it would close the application.
    main()
