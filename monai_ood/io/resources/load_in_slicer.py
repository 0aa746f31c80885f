"""Show monai-ood outputs in 3D Slicer: the image, the OOD heat map A_xi over it, the segmentation.

From a terminal (Slicer stays open afterwards):

    Slicer --python-script load_in_slicer.py -- --image scan.nii.gz --map scan_a_xi.nii.gz --seg scan_seg.nii.gz

From Slicer's Python console:

    exec(open("/path/to/load_in_slicer.py").read())
    load(image="scan.nii.gz", a_xi="scan_a_xi.nii.gz", segmentation="scan_seg.nii.gz")

The image becomes the background layer, A_xi the foreground layer (heat-map colours from
``ood_heatmap.ctbl``, window 0..1, opacity 0.5: blue = in-distribution, red = out-of-distribution) and
the segmentation a label map coloured by ``labels.ctbl``. The colour tables are looked up next to this
script unless given. Any of the three volumes may be left out. A DICOM series is given as its folder.

This file is written by monai-ood next to its outputs; it needs nothing but Slicer (Python 3.9+).
"""

from __future__ import annotations

import argparse
import os
import sys

USAGE = """usage: Slicer --python-script load_in_slicer.py -- [--image IMAGE] [--map A_XI] [--seg SEGMENTATION]
                                                 [--heatmap-ctbl CTBL] [--labels-ctbl CTBL] [--opacity 0.5]
  --image         the input image (NIfTI/NRRD file or DICOM series folder): background layer
  --map           the A_xi score map written by monai-ood: foreground layer, heat-map colours
  --seg           the segmentation written by monai-ood: label layer
  --heatmap-ctbl  heat-map colour table (default: ood_heatmap.ctbl next to this script)
  --labels-ctbl   label colour table (default: labels.ctbl next to this script)
  --opacity       foreground (heat map) opacity, 0..1 (default 0.5)
Give at least one of --image, --map, --seg. In Slicer's Python console, call load(...) instead."""


def _script_dir():
    # Run with --python-script, __file__ is this script; exec()-ed in the console it may be missing.
    script = globals().get("__file__")
    return os.path.dirname(os.path.abspath(script)) if script else os.getcwd()


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


def load(image=None, a_xi=None, segmentation=None, heatmap_ctbl=None, labels_ctbl=None, opacity=0.5):
    """Load the volumes into the current Slicer scene and lay them out in the slice views.

    Args:
        image: the input image file or DICOM series folder (background layer).
        a_xi: the A_xi map (foreground layer, heat-map colours, window 0..1).
        segmentation: the label map (label layer, label colours).
        heatmap_ctbl: heat-map colour table (default: ``ood_heatmap.ctbl`` next to this script).
        labels_ctbl: label colour table (default: ``labels.ctbl`` next to this script).
        opacity: foreground opacity in [0, 1].

    Returns:
        ``{"image": node, "a_xi": node, "segmentation": node}`` for the volumes given.

    Raises:
        ValueError: no volume given, or ``opacity`` outside [0, 1].
        FileNotFoundError: a given volume does not exist.
    """
    import slicer

    if not (image or a_xi or segmentation):
        raise ValueError("give at least one of image, a_xi, segmentation")
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must lie in [0, 1], got {opacity!r}")
    missing = [p for p in (image, a_xi, segmentation) if p and not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"not found: {', '.join(missing)}")
    here = _script_dir()
    heatmap_ctbl = heatmap_ctbl or os.path.join(here, "ood_heatmap.ctbl")
    labels_ctbl = labels_ctbl or os.path.join(here, "labels.ctbl")

    nodes, layers = {}, {}
    if image:
        if os.path.isdir(image):
            # A DICOM series folder: load one file and let Slicer read the rest of its series.
            files = sorted(f for f in os.listdir(image) if not f.startswith("."))
            if not files:
                raise FileNotFoundError(f"no files in the folder {image}")
            path, properties = os.path.join(image, files[0]), {"name": _name(image), "singleFile": False}
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
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"load_in_slicer: {error}\n{USAGE}")
        return 2
    return 0


if __name__ == "__main__":
    # No sys.exit: inside Slicer it would close the application.
    main()
