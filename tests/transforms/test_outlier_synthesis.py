"""Tests for :mod:`monai_ood.transforms.outlier_synthesis` (the paper's outlier generator T)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_ood.transforms import OutlierSynthesis, OutlierSynthesisd

# Every folding warning from TorchIO's elastic deformation is a failure: in particular, 2D images must
# get zero displacement along their singleton axis.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

OPS = ("rotate180", "vflip", "patch_permute", "swap", "gamma", "elastic")
# 5 control points and 3 voxels keep the tiny test images below TorchIO's folding limit.
SMALL = {"elastic_num_control_points": 5, "elastic_max_displacement": 3.0}
SHAPES = {2: (1, 32, 32), 3: (1, 16, 16, 16)}


def make_image(spatial_ndim: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Asymmetric test image in [0, 1]: a gradient with a different slope per axis plus an off-centre blob.

    No flip or rotation maps it onto itself, and every value lies strictly between 0 and 1 except near
    the origin, so gamma changes it too.
    """
    shape = shape or SHAPES[spatial_ndim]
    axes = torch.meshgrid(*(torch.linspace(0, 1, s) for s in shape[1:]), indexing="ij")
    slopes = (0.5, 0.2, 0.1)
    centre = (0.25, 0.7, 0.4)
    ramp = sum(s * a for s, a in zip(slopes, axes, strict=False))
    blob = torch.exp(-sum((a - c) ** 2 for a, c in zip(axes, centre, strict=False)) / 0.02)
    image = (ramp + 0.2 * blob) / (sum(slopes[: len(axes)]) + 0.2)
    return image.expand(shape).clone().to(torch.float32)


def as_backend(x: torch.Tensor, backend: str):
    return x.numpy() if backend == "numpy" else x


def to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("spatial_ndim", [2, 3])
@pytest.mark.parametrize("op", OPS)
def test_each_op_makes_a_changed_finite_image_of_the_same_kind(op, spatial_ndim, backend):
    image = as_backend(make_image(spatial_ndim), backend)
    before = to_numpy(image).copy()
    transform = OutlierSynthesis(ops=[op], **SMALL).set_random_state(seed=0)

    out = transform(image)

    assert transform.last_op == op
    assert type(out) is type(image)
    assert out.shape == image.shape
    assert out.dtype == image.dtype
    assert np.isfinite(to_numpy(out)).all()
    assert not np.allclose(to_numpy(out), before, atol=1e-3)
    np.testing.assert_array_equal(to_numpy(image), before)  # the input is not modified in place


@pytest.mark.parametrize("op", OPS)
def test_default_parameters_fit_a_2d_slice(op):
    # Defaults (TorchIO's swap/elastic defaults) on a slice big enough for them: no warning, visible change.
    image = make_image(2, (1, 64, 64))
    out = OutlierSynthesis(ops=[op]).set_random_state(seed=1)(image)
    assert out.shape == image.shape
    assert (out - image).abs().max() > 1e-2


@pytest.mark.parametrize("spatial_ndim", [2, 3])
def test_rotate180_twice_is_identity(spatial_ndim):
    image = make_image(spatial_ndim)
    rotate = OutlierSynthesis(ops=["rotate180"])
    once = rotate(image)
    assert not torch.equal(once, image)
    torch.testing.assert_close(rotate(once), image, rtol=0, atol=0)
    torch.testing.assert_close(once, torch.rot90(image, 2, dims=(1, 2)), rtol=0, atol=0)


def test_rotate180_in_another_plane_and_non_square():
    image = make_image(3, (2, 12, 16, 10))
    out = OutlierSynthesis(ops=["rotate180"], rotation_axes=(1, 2))(image.numpy())
    np.testing.assert_array_equal(out, np.rot90(image.numpy(), 2, axes=(2, 3)))


@pytest.mark.parametrize("flip_axis", [0, 1])
@pytest.mark.parametrize("spatial_ndim", [2, 3])
def test_vflip_equals_np_flip_on_the_spatial_axis(spatial_ndim, flip_axis):
    image = make_image(spatial_ndim).numpy()
    out = OutlierSynthesis(ops=["vflip"], flip_axis=flip_axis)(image)
    np.testing.assert_array_equal(out, np.flip(image, axis=1 + flip_axis))


@pytest.mark.parametrize("spatial_ndim", [2, 3])
def test_patch_permute_is_a_jigsaw_of_the_input_patches(spatial_ndim):
    image = make_image(spatial_ndim)
    out = OutlierSynthesis(ops=["patch_permute"], permute_grid=4).set_random_state(seed=3)(image)

    np.testing.assert_array_equal(np.sort(out.numpy(), axis=None), np.sort(image.numpy(), axis=None))
    # Each output patch is one of the input patches, each used once.
    size = image.shape[1] // 4
    grid = [range(0, s, size) for s in image.shape[1:]]

    def patches(x):
        idx = np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, spatial_ndim)
        return sorted(
            x[(slice(None), *(slice(i, i + size) for i in start))].numpy().tobytes() for start in idx
        )

    assert patches(out) == patches(image)


def test_patch_permute_with_sizes_not_divisible_by_the_grid():
    image = make_image(2, (2, 30, 33))
    out = OutlierSynthesis(ops=["patch_permute"], permute_grid=4).set_random_state(seed=0)(image)
    assert out.shape == image.shape
    np.testing.assert_array_equal(np.sort(out.numpy(), axis=None), np.sort(image.numpy(), axis=None))
    # Centred core 28 x 32 (starting at row 1, column 0) is shuffled; the border outside it is kept.
    torch.testing.assert_close(out[:, [0, 29]], image[:, [0, 29]], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, 32], image[:, :, 32], rtol=0, atol=0)
    assert not torch.equal(out, image)


def test_patch_permute_per_axis_grid_keeps_slices():
    # (4, 4, 1): shuffle in-plane only, the same way in every slice along D.
    image = make_image(3)
    out = OutlierSynthesis(ops=["patch_permute"], permute_grid=(4, 4, 1))(image).numpy()
    for k in range(image.shape[-1]):
        np.testing.assert_array_equal(
            np.sort(out[..., k], axis=None), np.sort(image[..., k].numpy(), axis=None)
        )


@pytest.mark.timeout(20)
def test_swap_patch_larger_than_half_the_image_is_clipped():
    # TorchIO's RandomSwap never returns for patch 15 on a 16^3 volume; the transform clips the patch.
    image = make_image(3)
    out = OutlierSynthesis(ops=["swap"], swap_patch_size=15, swap_num_iterations=5)(image)
    assert out.shape == image.shape
    assert not torch.equal(out, image)
    # No multiset check here: TorchIO swaps overlapping patch pairs too, which duplicates some values.


def test_gamma_matches_reference_and_is_never_near_one():
    image = make_image(2)
    transform = OutlierSynthesis(ops=["gamma"], gamma_log_range=(0.3, 0.8)).set_random_state(seed=0)
    signs = set()
    for _ in range(20):
        out = transform(image)
        assert 0.3 <= abs(transform.log_gamma) <= 0.8
        signs.add(math.copysign(1, transform.log_gamma))
        torch.testing.assert_close(out, image ** math.exp(transform.log_gamma))
    assert signs == {-1.0, 1.0}


def test_gamma_on_negative_intensities_shifts_instead_of_nan():
    image = make_image(2) - 0.5
    transform = OutlierSynthesis(ops=["gamma"])
    out = transform(image)
    assert torch.isfinite(out).all()
    low = image.min()
    torch.testing.assert_close(out, (image - low) ** math.exp(transform.log_gamma) + low)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int16])
@pytest.mark.parametrize("op", OPS)
def test_dtype_is_kept(op, dtype):
    image = (make_image(2) * (1 if dtype.is_floating_point else 100)).to(dtype)
    out = OutlierSynthesis(ops=[op], **SMALL).set_random_state(seed=0)(image)
    assert out.dtype == dtype
    assert out.shape == image.shape


def test_seeded_replay_and_global_rng_untouched():
    image = make_image(2)
    first = OutlierSynthesis(**SMALL).set_random_state(seed=42)
    second = OutlierSynthesis(**SMALL).set_random_state(seed=42)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    seen = set()
    for _ in range(5):
        a, b = first(image), second(image)
        assert first.last_op == second.last_op
        seen.add(first.last_op)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert len(seen) > 1  # the seed picks several different ops


def test_torchio_ops_replay_with_the_same_seed():
    image = make_image(3)
    for op in ("swap", "elastic"):
        a = OutlierSynthesis(ops=[op], **SMALL).set_random_state(seed=7)(image)
        b = OutlierSynthesis(ops=[op], **SMALL).set_random_state(seed=7)(image)
        c = OutlierSynthesis(ops=[op], **SMALL).set_random_state(seed=8)(image)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, c)


def test_op_weights_select_ops():
    transform = OutlierSynthesis(ops=("rotate180", "vflip"), op_weights=(0.0, 2.0))
    image = make_image(2)
    for _ in range(10):
        transform(image)
        assert transform.last_op == "vflip"


def test_prob_zero_returns_the_input():
    image = make_image(2)
    transform = OutlierSynthesis(prob=0.0)
    assert transform(image) is image
    assert transform.last_op is None


@pytest.mark.parametrize("op", OPS)
def test_dict_version_shares_one_sample_across_keys(op):
    image = make_image(3)
    transform = OutlierSynthesisd(keys=("image", "copy"), ops=[op], **SMALL).set_random_state(seed=5)
    out = transform({"image": image, "copy": image.clone(), "label": image})
    assert transform.last_op == op
    torch.testing.assert_close(out["image"], out["copy"], rtol=0, atol=0)
    assert not torch.equal(out["image"], image)
    assert out["label"] is image  # keys not listed are left alone


def test_dict_version_replays_the_array_version():
    image = make_image(2)
    array = OutlierSynthesis(**SMALL).set_random_state(seed=11)
    mapping = OutlierSynthesisd(keys="image", **SMALL).set_random_state(seed=11)
    for _ in range(5):
        expected = array(image)
        got = mapping({"image": image})["image"]
        assert mapping.last_op == array.last_op
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_unknown_op_suggests_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'vflip'"):
        OutlierSynthesis(ops=["vflipp"])
    with pytest.raises(ValueError, match="did you mean"):
        OutlierSynthesisd(keys="image", ops=["rotate18O"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ops": []},
        {"ops": "vflip"},
        {"ops": ["vflip", "vflip"]},
        {"ops": ["vflip", "gamma"], "op_weights": [1.0]},
        {"ops": ["vflip", "gamma"], "op_weights": [1.0, -1.0]},
        {"ops": ["vflip", "gamma"], "op_weights": [0.0, 0.0]},
        {"flip_axis": 3},
        {"flip_axis": -1},
        {"flip_axis": 0.5},
        {"rotation_axes": (0, 0)},
        {"rotation_axes": (0,)},
        {"rotation_axes": (0, 3)},
        {"permute_grid": 1},
        {"permute_grid": 0},
        {"permute_grid": (4, 4, 4, 4)},
        {"swap_patch_size": 0},
        {"swap_num_iterations": 0},
        {"swap_num_iterations": 2.5},
        {"gamma_log_range": (0.0, 0.5)},
        {"gamma_log_range": (0.8, 0.3)},
        {"gamma_log_range": 0.5},
        {"elastic_num_control_points": 4},
        {"elastic_max_displacement": 0.0},
        {"elastic_max_displacement": -1.0},
        {"elastic_max_displacement": (0.0, 0.0)},
        {"prob": 1.5},
        {"prob": -0.1},
    ],
)
def test_invalid_parameters_raise_value_error(kwargs):
    with pytest.raises(ValueError, match="got"):
        OutlierSynthesis(**kwargs)
    with pytest.raises(ValueError, match="got"):
        OutlierSynthesisd(keys="image", **kwargs)


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({"ops": ["rotate180"], "rotation_axes": (0, 2)}, (1, 32, 32)),
        ({"ops": ["vflip"], "flip_axis": 2}, (1, 32, 32)),
        ({"ops": ["patch_permute"], "permute_grid": (4, 4, 1)}, (1, 32, 32)),
        ({"ops": ["swap"], "swap_patch_size": (4, 4)}, (1, 16, 16, 16)),
        ({"ops": ["elastic"], "elastic_max_displacement": (3.0, 3.0, 3.0)}, (1, 32, 32)),
        ({"ops": ["vflip"]}, (32, 32)),
        ({"ops": ["vflip"]}, (1, 1, 8, 8, 8)),
    ],
)
def test_parameters_that_do_not_fit_the_image_raise_value_error(kwargs, shape):
    with pytest.raises(ValueError, match="got"):
        OutlierSynthesis(**kwargs)(torch.zeros(shape))


@pytest.mark.parametrize("op", OPS)
def test_metatensor_keeps_its_affine_and_meta(op):
    affine = torch.diag(torch.tensor([0.6, 0.6, 2.0, 1.0], dtype=torch.float64))
    image = MetaTensor(make_image(2), affine=affine, meta={"filename_or_obj": "case_001.nii.gz"})
    out = OutlierSynthesis(ops=[op], **SMALL)(image)
    assert isinstance(out, MetaTensor)
    torch.testing.assert_close(out.affine, affine)
    assert out.meta["filename_or_obj"] == "case_001.nii.gz"
    out.affine[0, 0] = 9.0  # the output's metadata is its own
    torch.testing.assert_close(image.affine, affine)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op", OPS)
def test_cuda_tensor_stays_on_cuda(op):
    image = make_image(2).cuda()
    out = OutlierSynthesis(ops=[op], **SMALL)(image)
    assert out.device == image.device


@pytest.mark.parametrize("op", ["local_shuffle", "cutpaste", "local_noise", "local_blur", "blob"])
@pytest.mark.parametrize("shape", [(1, 48, 40), (1, 24, 20, 16)])
def test_local_ops_change_only_a_box_and_replay(op, shape):
    from monai_ood.transforms.outlier_synthesis import OutlierSynthesis

    x = torch.rand(*shape)
    t = OutlierSynthesis(ops=(op,))
    t.set_random_state(7)
    y = t(x)
    t.set_random_state(7)
    assert torch.equal(y, t(x))  # seeded: replayable
    changed = (y != x)[0]
    assert changed.any()
    if op != "blob":  # the blob is a smooth bump over the image; the others stay inside their box
        idx = changed.nonzero()
        box = [(int(idx[:, a].min()), int(idx[:, a].max()) + 1) for a in range(len(shape) - 1)]
        for (lo, hi), n in zip(box, shape[1:], strict=True):
            assert hi - lo <= 0.5 * n + 1
    if op == "local_shuffle":  # a permutation of the original values: nothing interpolated
        assert torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)
    if op == "cutpaste":  # the pasted values all come from the image
        assert set(y[0][changed].tolist()) <= set(x.flatten().tolist())
