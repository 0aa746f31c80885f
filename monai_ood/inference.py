"""Score any image with a trained prototype-head model: segmentation, A, A_xi on the input's own grid.

2D models run slice-wise along their anatomical axis (:class:`~monai_ood.preprocessing.SlicePreprocessing`,
the same slicing as in training); 3D models run MONAI sliding-window inference on an LPS-aligned grid at
the training spacing. Every output is resampled back onto the input's grid (nearest neighbour for the
segmentation, linear for the maps), so it overlays the input exactly in 3D Slicer.

Image-level numbers (the table of ``monai-ood score``):

* ``image_score``: the image score per slice: the fitted default detector's fused score when the
  checkpoint holds one (:class:`~monai_ood.detectors.FusedDetector`: multi-depth terms standardised on
  validation images, e.g. the sum of their z-scores), else the head's (the paper's: ``||A(x)||_1 /
  (feature pixels)``, eq. 6; a head with several terms: ``log sum_t H_t`` of its terms' Weibull hazards,
  see :class:`~monai_ood.networks.PrototypeOODNet`); for a volume scored by a 2D model, the mean over its
  slices that contain any signal (slices entirely outside the field of view are left out); for a 3D
  model, the mean of the upsampled (fused) map over the volume, since sliding windows see no whole image.
* ``calibrated_degree``: the mean of ``A_xi = WeibullCDF(A)`` (``A``: the detector's fused map, or the
  head's) over the same pixels: a number in
  [0, 1] on the scale fitted to validation data (about 0.5 for typical InD images by construction,
  rising towards 1 as more of the image lies beyond the validation distances).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference

from .calibration import WeibullCalibrator
from .networks import PrototypeOODNet
from .preprocessing import (
    SlicePreprocessing,
    VolumePreprocessing,
    array_on_grid,
    as_volume,
    normalize_intensity,
    resample_to_reference,
    slice_positions,
    to_grid,
    volume_grid,
    volume_to_slices,
)

__all__ = ["ScoredImage", "score_image", "score_slices"]


class ScoredImage:
    """Outputs for one input, all on the input's own grid.

    ``segmentation``, ``score_map`` and ``calibrated_map`` (``None`` without calibration) are full-size
    volumes on the input's grid: each is resampled from the model's grid when it is read and not kept,
    so a writer that takes them one at a time holds one of them at a time (for a 512 x 512 x 400 input
    each float map is 420 MB). Read each once; ``has_calibrated_map`` says whether there is an A_xi.
    """

    def __init__(
        self,
        segmentation,
        score_map,
        calibrated_map,
        image_score: float,
        calibrated_degree: float | None,
        slices: list[dict] | None = None,
    ) -> None:
        # each image: a sitk.Image, or a function of no argument that makes it
        self._images = {
            "segmentation": segmentation,
            "score_map": score_map,
            "calibrated_map": calibrated_map,
        }
        self.image_score = image_score
        self.calibrated_degree = calibrated_degree
        #: the OOD degree of ``image_score`` (:mod:`monai_ood.calibration.degree`), when calibrated
        self.ood_degree: float | None = None
        self.slices = list(slices or [])

    def _image(self, key: str) -> sitk.Image | None:
        value = self._images[key]
        return value() if callable(value) else value

    @property
    def segmentation(self) -> sitk.Image:
        return self._image("segmentation")

    @property
    def score_map(self) -> sitk.Image:
        return self._image("score_map")

    @property
    def calibrated_map(self) -> sitk.Image | None:
        return self._image("calibrated_map")

    @property
    def has_calibrated_map(self) -> bool:
        return self._images["calibrated_map"] is not None

    #: what each output is written as: (kind for write_image, description in the file's header)
    OUTPUTS = {
        "segmentation": ("label", None),
        "score_map": ("map", "monai-ood A(x)"),
        "calibrated_map": ("map", "monai-ood A_xi"),
    }

    def write(self, paths: Mapping[str, Path], reference: Path | None = None) -> None:
        """Write the outputs named in ``paths`` (keys of :attr:`OUTPUTS`) as one set: all of them appear,
        or after an error none (temporary files, renamed together). Existing files are replaced (the
        caller vets them before any work); one full-size image at a time is made, written, dropped.

        Args:
            paths: where each output goes (``calibrated_map`` only when :attr:`has_calibrated_map`).
            reference: the input file, whose NIfTI affine and header the maps copy bit for bit.
        """
        from .files import AtomicFileSet
        from .io import write_image

        if "calibrated_map" in paths and not self.has_calibrated_map:
            raise ValueError("there is no calibrated map to write: the model has no calibration")
        with AtomicFileSet(overwrite=True) as files:
            for key, target in paths.items():
                kind, description = self.OUTPUTS[key]

                def write(temporary: Path, key=key, kind=kind, description=description) -> None:
                    write_image(
                        getattr(self, key),
                        temporary,
                        reference,
                        kind=kind,
                        overwrite=True,
                        description=description,
                    )

                files.write(target, write)


def _device_of(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def _forward(net: PrototypeOODNet, detector, batch: torch.Tensor):
    """One pass: ``(logits, map on its own grid, map at the input size, image score)``, from the fitted
    default detector when there is one, else from the prototype head."""
    if detector is not None:
        logits, out, low = detector.segment_and_score(batch)
        if low is None:
            raise ValueError("the stored detector has no map term: it cannot write score maps")
        return logits, low, out.score_map, out.image_score
    logits, ood = net.forward_with_ood(batch)
    return logits, ood.score_map, ood.score_map_upsampled, ood.image_score


@torch.no_grad()
def score_slices(
    net: PrototypeOODNet,
    slices: np.ndarray,
    calibrator: WeibullCalibrator | None = None,
    batch_size: int = 16,
    detector=None,
) -> dict[str, np.ndarray]:
    """Run a 2D model on preprocessed slices ``(S, 1, H, W)`` (with its fitted default ``detector``, a
    :class:`~monai_ood.detectors.FusedDetector`, when given: its score and map replace the head's).

    Returns:
        ``segmentation`` (S, H, W) uint8, ``score_map`` (S, H, W) float32 (A upsampled to the slice),
        ``calibrated_map`` (S, H, W) or ``None``, ``image_score`` (S,), ``calibrated_degree`` (S,) or ``None``.
    """
    if slices.ndim != 4 or slices.shape[1] != 1:
        raise ValueError(f"slices must be (S, 1, H, W), got shape {slices.shape}")
    net.eval()
    device = _device_of(net)
    segmentation, maps, scores, degrees = [], [], [], []
    for start in range(0, len(slices), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(slices[start : start + batch_size])).to(device)
        logits, low, upsampled, image_score = _forward(net, detector, batch)
        segmentation.append(logits.argmax(1).to(torch.uint8).cpu())
        maps.append(upsampled[:, 0].float().cpu())
        scores.append(image_score.float().cpu())
        if calibrator is not None:
            degrees.append(calibrator.transform(low.float()).flatten(1).mean(1).cpu())
    score_map = torch.cat(maps).numpy()
    return {
        "segmentation": torch.cat(segmentation).numpy(),
        "score_map": score_map,
        "calibrated_map": None if calibrator is None else calibrator.transform(score_map).astype(np.float32),
        "image_score": torch.cat(scores).numpy(),
        "calibrated_degree": None if calibrator is None else torch.cat(degrees).numpy(),
    }


def _check_finite_outputs(image_scores: np.ndarray, maps: dict[str, np.ndarray | None]) -> None:
    """Refuse NaN or Inf outputs: a table row or a map must never say ``nan``."""
    problems = []
    bad = int(np.size(image_scores) - np.isfinite(image_scores).sum())
    if bad:
        problems.append(f"{bad} of {np.size(image_scores)} image score(s)")
    for name, array in maps.items():
        if array is not None and not np.isfinite(array).all():
            problems.append(f"{int(array.size - np.isfinite(array).sum())} values of the {name}")
    if problems:
        raise ValueError(
            f"the model's outputs for this image are NaN or Inf ({', '.join(problems)}): the image is "
            "unlike anything the model can score (e.g. extreme intensities), or the checkpoint is "
            "damaged; nothing was written for it"
        )


def _millimetres(values) -> str:
    return "x".join(f"{float(v):g}" for v in values)


def _no_contrast_reason(image: sitk.Image, grid: sitk.Image, preprocessing: SlicePreprocessing) -> str:
    """Why an image with contrast has none left on the model's slicing grid, in one sentence."""
    volume = as_volume(image)
    ones = sitk.Image(volume.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(volume)
    covered = sitk.GetArrayFromImage(to_grid(ones, grid)) > 0  # (S, rows, cols): pixels inside the image
    rows, cols = preprocessing.size
    most = int(covered.reshape(len(covered), -1).sum(1).max()) if covered.size else 0
    low, high = preprocessing.percentiles
    grid_text = (
        f"the model's grid ({rows}x{cols} pixels of {_millimetres(preprocessing.spacing)} mm per "
        f"{preprocessing.axis} slice)"
    )
    size = f"{_millimetres(volume.GetSize())} voxels of {_millimetres(volume.GetSpacing())} mm"
    if most <= max(1.0, rows * cols * min(low, 100.0 - high) / 100.0):
        return (
            f"the image has contrast, but none is left after resampling onto {grid_text}: it is {size} "
            f"and covers at most {most} of the {rows * cols} pixels of a slice, too few to stand out of "
            f"the slice's intensity window (its percentiles {low:g} to {high:g}); nothing to score: give "
            "an image that fills more of the model's field of view"
        )
    return (
        f"the image has contrast, but none is left after resampling onto {grid_text}: in every slice at "
        f"least {high - low:g}% of the pixels have one same value (the image, {size}, has its contrast in "
        "too few voxels, or finer than the model's pixels); nothing to score"
    )


def _check_scalar(image: sitk.Image) -> None:
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise ValueError(
            f"the image has {components} channels (components per voxel) but the model takes 1: give "
            "one channel per file (e.g. split the channels, or convert a colour image to grey)"
        )


def _check_contrast(image: sitk.Image) -> None:
    array = sitk.GetArrayViewFromImage(image)
    if array.size and float(np.min(array)) == float(np.max(array)):
        raise ValueError(
            f"the image has no contrast anywhere (constant intensities: every voxel is {float(array.flat[0]):g})"
            ": nothing to score"
        )


def _on_input(array: np.ndarray, grid: sitk.Image, image: sitk.Image, interpolator=sitk.sitkLinear):
    """A function making ``array`` (on the model's ``grid``) into an image on the input's own grid: the
    full-size outputs of :class:`ScoredImage` are made when read."""
    return lambda: resample_to_reference(array_on_grid(array, grid), image, interpolator)


def _score_2d(net, image, preprocessing: SlicePreprocessing, calibrator, batch_size, detector) -> ScoredImage:
    slices, _, grid = volume_to_slices(image, preprocessing)
    has_signal = slices.reshape(len(slices), -1).max(1) > 0
    if not has_signal.any():  # before the network: a refused image costs no forward pass
        raise ValueError(_no_contrast_reason(image, grid, preprocessing))
    out = score_slices(net, slices, calibrator, batch_size, detector)
    _check_finite_outputs(
        out["image_score"],
        {"score map": out["score_map"], "calibrated map": out["calibrated_map"]},
    )
    positions = slice_positions(grid)
    rows = []
    for k in range(len(slices)):
        rows.append(
            {
                "slice": k,
                "position_mm": round(float(positions[k]), 3),
                "has_signal": bool(has_signal[k]),
                "foreground_fraction": float((out["segmentation"][k] > 0).mean()),
                "image_score": float(out["image_score"][k]),
                "calibrated_degree": None if calibrator is None else float(out["calibrated_degree"][k]),
            }
        )

    seg = _on_input(out["segmentation"], grid, image, sitk.sitkNearestNeighbor)
    score_map = _on_input(out["score_map"], grid, image)
    calibrated = None if calibrator is None else _on_input(out["calibrated_map"], grid, image)
    return ScoredImage(
        segmentation=seg,
        score_map=score_map,
        calibrated_map=calibrated,
        image_score=float(out["image_score"][has_signal].mean()),
        calibrated_degree=None if calibrator is None else float(out["calibrated_degree"][has_signal].mean()),
        slices=rows,
    )


@torch.no_grad()
def _score_3d(
    net, image, preprocessing: VolumePreprocessing, calibrator, batch_size, detector
) -> ScoredImage:
    grid = volume_grid(image, preprocessing)
    array = normalize_intensity(
        sitk.GetArrayFromImage(to_grid(image, grid)), preprocessing.percentiles, per_slice=False
    )
    num_classes = net.num_classes
    window_scores: list[torch.Tensor] = []

    def predictor(x: torch.Tensor) -> torch.Tensor:
        # one tensor out, so MONAI's window stitching keeps working: [logits, upsampled A]; the windows'
        # image scores (the detector's or the head's, on the scale of the 2D scores) are kept aside
        logits, _, upsampled, image_score = _forward(net, detector, x)
        window_scores.append(image_score.detach().float().reshape(-1).cpu())
        return torch.cat([logits.float(), upsampled.float()], dim=1)

    net.eval()
    inputs = torch.from_numpy(array)[None, None].to(_device_of(net))
    stitched = sliding_window_inference(
        inputs, preprocessing.roi_size, batch_size, predictor, overlap=0.25, mode="gaussian"
    )[0]
    segmentation = stitched[:num_classes].argmax(0).to(torch.uint8).cpu().numpy()
    score_map = stitched[num_classes].cpu().numpy().astype(np.float32)
    calibrated = None if calibrator is None else calibrator.transform(score_map).astype(np.float32)
    # the volume's image score: the mean of its windows' image scores (as a 2D volume's is the mean of
    # its slices'), so a 3D score reads on the same scale as the detector's score of one input
    image_score = float(torch.cat(window_scores).double().mean())
    _check_finite_outputs(np.asarray([image_score]), {"score map": score_map, "calibrated map": calibrated})
    positions = slice_positions(grid)
    rows = [
        {
            "slice": k,
            "position_mm": round(float(positions[k]), 3),
            "has_signal": bool(array[k].max() > 0),
            "foreground_fraction": float((segmentation[k] > 0).mean()),
            "image_score": float(score_map[k].mean()),
            "calibrated_degree": None if calibrated is None else float(calibrated[k].mean()),
        }
        for k in range(score_map.shape[0])
    ]

    return ScoredImage(
        segmentation=_on_input(segmentation, grid, image, sitk.sitkNearestNeighbor),
        score_map=_on_input(score_map, grid, image),
        calibrated_map=None if calibrated is None else _on_input(calibrated, grid, image),
        image_score=image_score,
        calibrated_degree=None if calibrated is None else float(calibrated.mean()),
        slices=rows,
    )


def score_image(
    net: PrototypeOODNet,
    image: sitk.Image,
    preprocessing: SlicePreprocessing | VolumePreprocessing,
    calibrator: WeibullCalibrator | None = None,
    batch_size: int = 16,
    detector=None,
    degree=None,
) -> ScoredImage:
    """Segment and score one image (2D or 3D, any orientation and spacing) with a trained model.

    Args:
        net: the trained :class:`PrototypeOODNet` (on the device to run on).
        image: the input as read by :func:`monai_ood.io.read_image`.
        preprocessing: the checkpoint's preprocessing; a :class:`SlicePreprocessing` whose ``axis``
            may be overridden by the caller to slice along another anatomical axis.
        calibrator: the checkpoint's Weibull calibration, or ``None`` (then no A_xi is produced).
        batch_size: slices per forward pass (2D) or sliding-window batch size (3D).
        detector: the checkpoint's fitted default detector (:attr:`LoadedModel.detector`), or ``None``
            (then the prototype head's score and map).
        degree: the checkpoint's :class:`~monai_ood.calibration.DegreeCalibrator` (its calibration's
            ``degree``), or ``None``: then ``ood_degree`` is ``None``. A 2D model's slices each get the
            degree of their score; the volume gets the degree of its image score (the mean of its
            slices' scores, read against validation slices).

    Raises:
        ValueError: on NaN/Inf voxels, an image of several channels (components per voxel), an image
            without any contrast (constant), or one whose contrast is lost on the model's grid (too
            small), all before the network runs; and when the model's scores or maps come out NaN/Inf.
    """
    _check_scalar(image)
    _check_contrast(image)
    if net.spatial_dims == 2 and not isinstance(preprocessing, SlicePreprocessing):
        raise ValueError(f"a 2D model needs SlicePreprocessing, got {type(preprocessing).__name__}")
    if net.spatial_dims == 3 and not isinstance(preprocessing, VolumePreprocessing):
        raise ValueError(f"a 3D model needs VolumePreprocessing, got {type(preprocessing).__name__}")
    scorer = _score_2d if net.spatial_dims == 2 else _score_3d
    scored = scorer(net, image, preprocessing, calibrator, batch_size, detector)
    if degree is not None:
        scored.ood_degree = float(degree(scored.image_score))
        for row in scored.slices:  # a 3D model's slice rows hold map means, not image scores
            row["ood_degree"] = float(degree(row["image_score"])) if net.spatial_dims == 2 else None
    return scored
