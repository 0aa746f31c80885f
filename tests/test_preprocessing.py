"""monai_ood.preprocessing: slices depend on the physical image only, not on how its voxels are stored."""

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from monai_ood.preprocessing import SlicePreprocessing, slicing_grid, to_grid, volume_to_slices


def _image(array_xyz, affine):
    """The SimpleITK image of a RAS affine and (x, y, z) array (LPS: x and y negated)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.T))
    flip = np.diag([-1.0, -1.0, 1.0])
    linear = flip @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple((linear / spacing).flatten()))
    image.SetOrigin(tuple(flip @ affine[:3, 3]))
    return image


def test_a_sample_on_the_field_of_views_edge_is_treated_alike_in_every_storage_order():
    affine = np.diag([-3.0, -1.0, -1.0, 1.0])
    ramp = np.add.outer(np.add.outer(np.arange(12) * 7.0, np.arange(13) * 11.0), np.arange(13) * 5.0)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(ramp.astype(np.float32), affine))
    stored, flipped = _image(ramp, affine), _image(np.asanyarray(canonical.dataobj), canonical.affine)
    preprocessing = SlicePreprocessing(spacing=(4.0, 4.0), size=(16, 16))
    grid = slicing_grid(stored, preprocessing)
    # the premise: grid samples lie exactly on the x edge of the field of view (x = -1.5 mm, 34.5 mm)
    edges = {-1.5, 34.5}
    xs = {round(grid.TransformIndexToPhysicalPoint((i, 0, 0))[0], 9) for i in range(grid.GetSize()[0])}
    assert edges <= xs
    a, b = (sitk.GetArrayFromImage(to_grid(image, grid)) for image in (stored, flipped))
    np.testing.assert_array_equal(a, b)
    # the edge column holds the edge voxels' values (inside, as ITK counts the low end of an axis)
    column = list(sorted(xs)).index(-1.5)
    assert (a[:, :, column] != 0).any()
    np.testing.assert_array_equal(
        volume_to_slices(stored, preprocessing)[0], volume_to_slices(flipped, preprocessing)[0]
    )
