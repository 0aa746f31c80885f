"""monai_ood.inference: the volume image score of a 3D model is its detector's (here the head's) score."""

import numpy as np
import SimpleITK as sitk
import torch

from monai_ood.engines.checkpoint import build_network, make_model_config
from monai_ood.inference import score_image
from monai_ood.preprocessing import VolumePreprocessing, normalize_intensity, to_grid, volume_grid


def _volume(seed=0):
    rng = np.random.default_rng(seed)
    array = rng.random((16, 24, 32)).astype(np.float32)
    array[5:15, 6:18, 8:20] += 2.0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin((3.0, -4.0, 10.0))
    return image


def _net(**wrapper_kwargs):
    torch.manual_seed(0)
    config = make_model_config(
        "unet",
        3,
        1,
        3,
        8,
        network_kwargs={"channels": [4, 8, 16], "strides": [2, 2]},
        wrapper_kwargs=wrapper_kwargs,
    )
    return build_network(config).eval()


def test_the_image_score_of_a_3d_volume_is_the_networks_image_score_not_the_map_mean():
    # the 0.9-quantile of the feature map, not its mean: the map mean is not the image score
    image, net = _volume(), _net(aggregation="quantile", quantile=0.9)
    grid = volume_grid(image, VolumePreprocessing(spacing=(2.0, 2.0, 2.0)))
    shape = sitk.GetArrayFromImage(grid).shape  # one window exactly covering the grid: no stitching
    preprocessing = VolumePreprocessing(spacing=(2.0, 2.0, 2.0), roi_size=shape)
    scored = score_image(net, image, preprocessing, None, batch_size=1)
    array = normalize_intensity(sitk.GetArrayFromImage(to_grid(image, grid)), per_slice=False)
    with torch.no_grad():
        _, ood = net.forward_with_ood(torch.from_numpy(array)[None, None])
    np.testing.assert_allclose(scored.image_score, float(ood.image_score[0]), rtol=1e-5)
    assert not np.isclose(scored.image_score, float(ood.score_map_upsampled.mean()), rtol=1e-3)


def test_the_image_score_of_a_tiled_volume_is_the_mean_of_its_windows_scores():
    image, net = _volume(1), _net()
    preprocessing = VolumePreprocessing(spacing=(2.0, 2.0, 2.0), roi_size=(8, 8, 8))
    grid = volume_grid(image, preprocessing)
    array = normalize_intensity(sitk.GetArrayFromImage(to_grid(image, grid)), per_slice=False)
    scored = score_image(net, image, preprocessing, None, batch_size=2)
    # the reference: MONAI's window positions (overlap 0.25), each window scored on its own
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    interval = _get_scan_interval(array.shape, (8, 8, 8), 3, (0.25,) * 3)
    windows = dense_patch_slices(array.shape, (8, 8, 8), interval)
    with torch.no_grad():
        scores = [
            float(
                net.forward_with_ood(torch.from_numpy(np.ascontiguousarray(array[w]))[None, None])[
                    1
                ].image_score[0]
            )
            for w in windows
        ]
    assert len(scores) > 4
    np.testing.assert_allclose(scored.image_score, np.mean(scores), rtol=1e-5)
