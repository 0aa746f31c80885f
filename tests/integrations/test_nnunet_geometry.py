"""Maps back on the input's grid (monai_ood.integrations.nnunet.geometry): nnU-Net's resampling, crop and
transpose undone, the input geometry for every reader, and an unsupported reader named."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunet_helpers import require_nnunet

require_nnunet()

from monai_ood.integrations.nnunet import map_to_input_image, map_to_original_array  # noqa: E402
from monai_ood.io import same_geometry  # noqa: E402


class _Plans:
    transpose_forward = [2, 0, 1]
    transpose_backward = [1, 2, 0]


class _Configuration:
    spacing = [2.0, 1.0, 1.0]

    @staticmethod
    def resampling_fn_probabilities(data, new_shape, current_spacing, new_spacing):
        from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

        return resample_data_or_seg_to_shape(
            data, new_shape, current_spacing, new_spacing, is_seg=False, order=1
        )


def test_map_back_to_the_original_grid_undoes_resampling_crop_and_transpose():
    properties = {
        "spacing": [1.0, 1.0, 1.0],  # of the original (transposed: the same)
        "shape_before_cropping": (12, 10, 8),  # in the transposed order (2, 0, 1) of a (10, 8, 12) input
        "bbox_used_for_cropping": [[2, 10], [0, 10], [1, 7]],
        "shape_after_cropping_and_before_resampling": (8, 10, 6),
    }
    preprocessed = torch.full((4, 10, 6), 3.0)  # resampled to spacing 2 along the first axis
    original = map_to_original_array(preprocessed, properties, _Plans(), _Configuration())
    assert original.shape == (10, 8, 12) and original.dtype == np.float32
    back = original.transpose(_Plans.transpose_forward)
    assert np.allclose(back[2:10, 0:10, 1:7], 3.0) and back.sum() == pytest.approx(3.0 * 8 * 10 * 6)


@pytest.mark.parametrize(
    "reader", ["SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO", "NibabelIOWithReorient"]
)
def test_maps_land_on_the_input_grid_for_every_reader(tmp_path, reader):
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    # an oblique, axis-permuted, anisotropic input, so that reorienting readers really reorient
    affine = np.array([[0.0, 0.0, -1.5, 30.0], [0.9, 0.3, 0.0, -12.0], [-0.3, 0.9, 0.0, 4.0], [0, 0, 0, 1]])
    data = np.random.default_rng(0).random((7, 9, 11)).astype(np.float32)
    path = tmp_path / "case_0000.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    reader_writer = recursive_find_reader_writer_by_name(reader)
    array, properties = reader_writer().read_images([str(path)])

    image = map_to_input_image(array[0], properties, reader_writer)  # a "map" equal to the image itself
    source = sitk.ReadImage(str(path))
    assert same_geometry(image, source, atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source), atol=1e-6)


def test_unsupported_reader_is_named():
    with pytest.raises(NotImplementedError, match="Tiff3DIO"):
        map_to_input_image(np.zeros((1, 4, 4)), {}, "Tiff3DIO")
