"""Scoring terms of the fused detector (stage statistics, class prototypes, intensity histogram) and
their helpers, against independent float64 numpy / scikit-learn references and brute-force loops."""

from __future__ import annotations

import io
import itertools
import json
import math
import re

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from monai_ood.calibration.weibull import NotFittedError
from monai_ood.detectors.terms import (
    TERMS,
    ClassPrototypeTerm,
    Features,
    IntensityTerm,
    StageStatisticsTerm,
    TermOutput,
    area_fractions,
    channel_statistics,
    foreground_histograms,
    term_from_state,
)

K = 3
LAYER = "stage"


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stage_features(n: int, seed: int, channels: int = 3, size: int = 4, labels=None, logits=None) -> Features:
    """Features with random input images ``(n, 1, 2 size, 2 size)`` and one random stage
    ``(n, channels, size, size)`` (channel-dependent scales, so the covariance is not isotropic)."""
    g = generator(seed)
    images = torch.rand(n, 1, 2 * size, 2 * size, generator=g)
    scales = torch.arange(1, channels + 1, dtype=torch.float32)[None, :, None, None]
    stage = torch.randn(n, channels, size, size, generator=g) * scales + scales
    return Features(images, {LAYER: stage}, logits, labels)


def random_labels(n: int, seed: int, size: int = 8, classes=range(K)) -> torch.Tensor:
    classes = torch.tensor(list(classes))
    index = torch.randint(0, len(classes), (n, 1, size, size), generator=generator(seed))
    return classes[index]


def mahalanobis_numpy(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    lw = LedoitWolf().fit(train)
    diff, precision = x - train.mean(0), np.linalg.inv(lw.covariance_)
    return np.sqrt(np.einsum("nd,de,ne->n", diff, precision, diff))


def numpy_statistics(x: np.ndarray, statistics=("mean", "std")) -> np.ndarray:
    axes = tuple(range(2, x.ndim))
    parts = {"mean": x.mean(axis=axes), "std": x.std(axis=axes, ddof=0)}
    return np.concatenate([parts[s] for s in statistics], axis=1)


# -- channel_statistics ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("spatial", [(7,), (5, 6), (3, 4, 2)])
@pytest.mark.parametrize("statistics", [("mean", "std"), ("std", "mean"), ("mean",), ("std",)])
def test_channel_statistics_match_numpy(spatial, statistics, dtype, tolerance):
    """Computed in the features' precision (float32 for a float32 network), returned as float64."""
    x = (torch.randn(3, 4, *spatial, generator=generator(0)) * 2.0 + 1.0).to(dtype)
    out = channel_statistics(x, statistics)
    assert out.dtype == torch.float64 and out.shape == (3, 4 * len(statistics))
    expected = numpy_statistics(x.double().numpy(), statistics)
    np.testing.assert_allclose(out.numpy(), expected, rtol=tolerance, atol=tolerance)


def test_channel_statistics_order_is_mean_then_std_by_default():
    x = torch.tensor([[[1.0, 3.0], [10.0, 10.0]]])  # (1, 2 channels, 2)
    np.testing.assert_array_equal(channel_statistics(x).numpy(), [[2.0, 10.0, 1.0, 0.0]])


# -- area_fractions -------------------------------------------------------------------------------------
def adaptive_bounds(i: int, n_in: int, n_out: int) -> tuple[int, int]:
    """PyTorch's adaptive pooling cell: ``[floor(i n / out), ceil((i + 1) n / out))``."""
    return (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)


def brute_force_fractions(labels: np.ndarray, num_classes: int, size) -> np.ndarray:
    batch, spatial = labels.shape[0], labels.shape[2:]
    out = np.zeros((batch, num_classes, *size))
    for b in range(batch):
        for cell in itertools.product(*(range(s) for s in size)):
            bounds = [adaptive_bounds(i, n, s) for i, n, s in zip(cell, spatial, size, strict=True)]
            block = labels[(b, 0, *(slice(lo, hi) for lo, hi in bounds))]
            for k in range(num_classes):
                out[(b, k, *cell)] = np.count_nonzero(block == k) / block.size
    return out


@pytest.mark.parametrize(
    "shape, size",
    [
        ((8, 8), (2, 2)),
        ((8, 8), (4, 4)),
        ((8, 8), (8, 8)),
        ((7, 5), (3, 2)),
        ((9,), (4,)),
        ((4, 6, 4), (2, 3, 2)),
    ],
)
def test_area_fractions_match_brute_force(shape, size):
    labels = torch.randint(0, K, (2, 1, *shape), generator=generator(3))
    out = area_fractions(labels, K, size)
    assert out.dtype == torch.float64 and out.shape == (2, K, *size)
    np.testing.assert_allclose(out.numpy(), brute_force_fractions(labels.numpy(), K, size), atol=1e-12)
    np.testing.assert_allclose(out.sum(dim=1).numpy(), 1.0, atol=1e-12)


def test_area_fractions_known_answer():
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    labels[0, 0, 0, 0] = 2  # one pixel of the top-left 2x2 cell: a minority never holding a majority
    labels[0, 0, 2:, 2:] = 1  # the whole bottom-right cell
    out = area_fractions(labels, K, (2, 2))[0]
    np.testing.assert_array_equal(out[0].numpy(), [[0.75, 1.0], [1.0, 0.0]])
    np.testing.assert_array_equal(out[1].numpy(), [[0.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(out[2].numpy(), [[0.25, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize("bad", [-1, K])
def test_area_fractions_rejects_out_of_range_labels(bad):
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    labels[0, 0, 1, 2] = bad
    with pytest.raises(ValueError, match=rf"\[0, {K - 1}\].*{bad}"):
        area_fractions(labels, K, (2, 2))


@pytest.mark.parametrize("shape", [(4, 4), (2, 2, 4, 4), (1, 4)])
def test_area_fractions_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        area_fractions(torch.zeros(shape, dtype=torch.long), K, (2, 2))


# -- foreground_histograms ------------------------------------------------------------------------------
def numpy_histograms(images: np.ndarray, bins: int, threshold: float) -> np.ndarray:
    """Per image and channel ``numpy.histogram(density=True)`` of the clipped foreground intensities."""
    x = images.reshape(images.shape[0], images.shape[1], -1).astype(np.float64)
    out = np.zeros((x.shape[0], x.shape[1], bins))
    for b in range(x.shape[0]):
        mask = x[b].max(axis=0) > threshold
        if not mask.any():
            continue
        for c in range(x.shape[1]):
            out[b, c] = np.histogram(np.clip(x[b, c, mask], 0.0, 1.0), bins, range=(0.0, 1.0), density=True)[
                0
            ]
    return out.reshape(x.shape[0], -1)


@pytest.mark.parametrize("bins", [2, 5, 8, 32, 50])
@pytest.mark.parametrize("channels", [1, 2])
def test_foreground_histograms_match_numpy(bins, channels):
    g = generator(bins + channels)
    images = torch.rand(3, channels, 12, 12, generator=g)
    images[:, :, :4] = 0.0  # background rows
    images[0, 0, 5, :4] = torch.tensor([1.0, 0.5, 0.25, 0.0])  # on bin edges, 1.0 in the last bin
    images[1, 0, 6, :3] = torch.tensor([1.7, -0.4, 3.0])  # outside [0, 1]: clipped into the edge bins
    out = foreground_histograms(images, bins, threshold=1e-3)
    assert out.dtype == torch.float64 and out.shape == (3, channels * bins)
    np.testing.assert_allclose(
        out.numpy(), numpy_histograms(images.numpy(), bins, 1e-3), rtol=1e-12, atol=1e-12
    )


def test_foreground_histograms_known_answer():
    images = torch.zeros(1, 1, 2, 4)
    images[0, 0, 0] = torch.tensor([1.0, 0.75, 0.6, 1.4])  # the background row is not counted
    out = foreground_histograms(images, bins=4)
    # four foreground pixels: one in [0.5, 0.75), three in [0.75, 1] (1.0 and clipped 1.4 included);
    # density = count / (total * bin width)
    np.testing.assert_allclose(out.numpy(), [[0.0, 0.0, 1.0, 3.0]])


def test_foreground_histograms_threshold_and_empty_image():
    images = torch.zeros(2, 2, 4, 4)
    images[1, 1] = 0.25  # channel 1 makes every pixel foreground; channel 0 (zeros) is counted there too
    out = foreground_histograms(images, bins=5, threshold=0.2)
    np.testing.assert_array_equal(out[0].numpy(), np.zeros(10))  # no foreground: zeros, not NaN
    np.testing.assert_allclose(out[1].numpy(), [5.0, 0, 0, 0, 0, 0, 5.0, 0, 0, 0])
    above = foreground_histograms(images, bins=5, threshold=0.25)  # strictly above the threshold
    np.testing.assert_array_equal(above.numpy(), np.zeros((2, 10)))


# -- Features / TermOutput / registry ----------------------------------------------------------------------
def test_features_stage_lookup():
    features = stage_features(2, 0)
    assert features.stage(LAYER) is features.stages[LAYER]
    with pytest.raises(KeyError, match="nowhere"):
        features.stage("nowhere")


def test_registry_and_names():
    assert TERMS == {
        "statistics": StageStatisticsTerm,
        "prototypes": ClassPrototypeTerm,
        "intensity": IntensityTerm,
    }
    assert StageStatisticsTerm("a.b").name == "statistics:a.b"
    assert ClassPrototypeTerm("a.b", K).name == "prototypes:a.b"
    assert IntensityTerm().name == "intensity" and IntensityTerm().layers == []
    assert StageStatisticsTerm("a.b").layers == ["a.b"]
    assert ClassPrototypeTerm("x", K).has_map and not StageStatisticsTerm("x").has_map
    assert not IntensityTerm().has_map


# -- StageStatisticsTerm -------------------------------------------------------------------------------
@pytest.mark.parametrize("statistics", [("mean", "std"), ("std", "mean"), ("mean",)])
def test_stage_statistics_fit_matches_ledoit_wolf(statistics):
    train = stage_features(12, 0)
    term = StageStatisticsTerm(LAYER, statistics).fit_features(train)
    vectors = numpy_statistics(train.stages[LAYER].double().numpy(), statistics)
    lw = LedoitWolf().fit(vectors)
    assert term.mean_.shape == (3 * len(statistics),)
    # float32 features: statistics exact to float32 precision
    np.testing.assert_allclose(term.mean_.numpy(), vectors.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        (term.cholesky_ @ term.cholesky_.T).numpy(), lw.covariance_, rtol=1e-5, atol=1e-7
    )
    assert np.allclose(np.tril(term.cholesky_.numpy()), term.cholesky_.numpy())
    assert term.shrinkage_ == pytest.approx(lw.shrinkage_, rel=1e-5)

    test = stage_features(5, 1)
    out = term.predict_features(test)
    assert isinstance(out, TermOutput) and out.score_map is None
    assert out.image_score.dtype == torch.float64 and out.image_score.shape == (5,)
    expected = mahalanobis_numpy(numpy_statistics(test.stages[LAYER].double().numpy(), statistics), vectors)
    np.testing.assert_allclose(out.image_score.numpy(), expected, rtol=1e-5)


def test_stage_statistics_streamed_fit_equals_one_batch():
    batches = [stage_features(n, seed) for n, seed in ((4, 10), (1, 11), (6, 12))]
    streamed = StageStatisticsTerm(LAYER).fit_features(iter(batches))
    whole = Features(
        torch.cat([b.images for b in batches]), {LAYER: torch.cat([b.stages[LAYER] for b in batches])}
    )
    single = StageStatisticsTerm(LAYER).fit_features(whole)
    torch.testing.assert_close(streamed.mean_, single.mean_, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(streamed.cholesky_, single.cholesky_, rtol=1e-10, atol=1e-12)
    test = stage_features(3, 13)
    torch.testing.assert_close(
        streamed.predict_features(test).image_score, single.predict_features(test).image_score
    )


def test_stage_statistics_score_is_zero_at_the_mean_and_grows():
    train = stage_features(10, 0)
    term = StageStatisticsTerm(LAYER, ("mean",)).fit_features(train)
    at_mean = term.mean_.float()[None, :, None, None].expand(1, 3, 4, 4)
    far = at_mean + 10.0
    scores = term.predict_features(Features(torch.zeros(2, 1, 8, 8), {LAYER: torch.cat([at_mean, far])}))
    assert scores.image_score[0] == pytest.approx(0.0, abs=1e-5)
    assert scores.image_score[1] > 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layer": LAYER, "statistics": "mean"}, "'mean'"),
        ({"layer": LAYER, "statistics": ()}, r"\(\)"),
        ({"layer": LAYER, "statistics": ("mean", "mean")}, "repeat.*'mean', 'mean'"),
        ({"layer": LAYER, "statistics": ("median",)}, "median"),
        ({"layer": ""}, "layer must be a module name, got ''"),
        ({"layer": None}, "got None"),
    ],
)
def test_stage_statistics_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StageStatisticsTerm(**kwargs)


def test_stage_statistics_fit_errors():
    with pytest.raises(ValueError, match="at least 2 training images, got 1"):
        StageStatisticsTerm(LAYER).fit_features(stage_features(1, 0))
    bad = stage_features(4, 0)
    bad.stages[LAYER][1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        StageStatisticsTerm(LAYER).fit_features(bad)
    with pytest.raises(KeyError, match="other"):
        StageStatisticsTerm("other").fit_features(stage_features(4, 0))


# -- ClassPrototypeTerm --------------------------------------------------------------------------------
def brute_force_prototypes(features: np.ndarray, labels: np.ndarray, num_classes: int):
    """Area-fraction-weighted mean and population variance per class and channel, loop by loop, with
    ``labels`` at twice the features' resolution (each cell is a 2x2 block of pixels)."""
    batch, channels, height, width = features.shape
    weight_sum = np.zeros(num_classes)
    weighted = np.zeros((num_classes, channels))
    for b, i, j in itertools.product(range(batch), range(height), range(width)):
        block = labels[b, 0, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
        for k in range(num_classes):
            w = np.count_nonzero(block == k) / block.size
            weight_sum[k] += w
            weighted[k] += w * features[b, :, i, j]
    present = weight_sum > 0
    mean = np.zeros((num_classes, channels))
    mean[present] = weighted[present] / weight_sum[present, None]
    variance = np.zeros((num_classes, channels))
    for b, i, j in itertools.product(range(batch), range(height), range(width)):
        block = labels[b, 0, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
        for k in np.flatnonzero(present):
            w = np.count_nonzero(block == k) / block.size
            variance[k] += w * (features[b, :, i, j] - mean[k]) ** 2
    variance[present] /= weight_sum[present, None]
    return mean, variance, present


def brute_force_map(features: np.ndarray, mean: np.ndarray, variance: np.ndarray, present) -> np.ndarray:
    batch, channels, height, width = features.shape
    out = np.zeros((batch, 1, height, width))
    for b, i, j in itertools.product(range(batch), range(height), range(width)):
        distances = [
            math.sqrt(np.mean((features[b, :, i, j] - mean[k]) ** 2 / variance[k]))
            for k in range(len(mean))
            if present[k]
        ]
        out[b, 0, i, j] = min(distances)
    return out


def prototype_train(seed: int = 0, classes=range(K), n: int = 3) -> Features:
    return stage_features(n, seed, labels=random_labels(n, seed + 100, classes=classes))


def test_prototypes_fit_matches_brute_force():
    train = prototype_train()
    term = ClassPrototypeTerm(LAYER, K).fit_features(train)
    mean, variance, present = brute_force_prototypes(
        train.stages[LAYER].double().numpy(), train.labels.numpy(), K
    )
    assert present.all() and term.present_.tolist() == [True] * K
    assert term.means_.dtype == torch.float64 and term.means_.shape == (K, 3)
    np.testing.assert_allclose(term.means_.numpy(), mean, rtol=1e-10)
    floor = np.median(variance) * term.min_variance
    assert (variance > floor).all()  # random features: the floor is not reached
    np.testing.assert_allclose(term.variances_.numpy(), variance, rtol=1e-8)


def test_prototypes_map_matches_brute_force():
    train = prototype_train()
    term = ClassPrototypeTerm(LAYER, K).fit_features(train)
    mean, variance, present = brute_force_prototypes(
        train.stages[LAYER].double().numpy(), train.labels.numpy(), K
    )
    test = stage_features(2, 7)
    out = term.predict_features(test)
    expected = brute_force_map(test.stages[LAYER].double().numpy(), mean, variance, present)
    # the map is computed in the features' precision (float32 here), the image score returned as float64
    assert out.score_map.shape == (2, 1, 4, 4) and out.score_map.dtype == test.stages[LAYER].dtype
    assert out.image_score.dtype == torch.float64
    np.testing.assert_allclose(out.score_map.numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.image_score.numpy(), expected.mean(axis=(1, 2, 3)), rtol=1e-4, atol=1e-5)
    distances = term.class_distances(test)
    assert distances.shape == (2, K, 4, 4)
    torch.testing.assert_close(distances.min(dim=1, keepdim=True).values, out.score_map)


def test_prototypes_absent_class_is_left_out():
    train = prototype_train(classes=(0, 2))  # class 1 never appears
    term = ClassPrototypeTerm(LAYER, K).fit_features(train)
    assert term.present_.tolist() == [True, False, True]
    mean, variance, present = brute_force_prototypes(
        train.stages[LAYER].double().numpy(), train.labels.numpy(), K
    )
    np.testing.assert_allclose(term.means_[present].numpy(), mean[present], rtol=1e-10)
    test = stage_features(2, 8)
    distances = term.class_distances(test)
    assert torch.isinf(distances[:, 1]).all() and torch.isfinite(distances[:, [0, 2]]).all()
    expected = brute_force_map(test.stages[LAYER].double().numpy(), mean, variance, present)
    np.testing.assert_allclose(term.predict_features(test).score_map.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_prototypes_minority_class_gets_a_prototype():
    labels = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    labels[:, :, ::2, ::2] = 2  # one pixel in every 2x2 cell: never a majority
    train = stage_features(2, 0, labels=labels)
    term = ClassPrototypeTerm(LAYER, K).fit_features(train)
    assert term.present_.tolist() == [True, False, True]
    # every cell has fraction 1/4 of class 2 and 3/4 of class 0: both prototypes are the plain mean
    plain = train.stages[LAYER].double().numpy().mean(axis=(0, 2, 3))
    np.testing.assert_allclose(term.means_[2].numpy(), plain, rtol=1e-10)
    np.testing.assert_allclose(term.means_[0].numpy(), plain, rtol=1e-10)


def test_prototypes_variance_floor():
    train = prototype_train(n=3)
    train.stages[LAYER][:, 0] = 3.0  # a constant channel: zero variance for every class
    term = ClassPrototypeTerm(LAYER, K, min_variance=0.01).fit_features(train)
    _, variance, _ = brute_force_prototypes(train.stages[LAYER].double().numpy(), train.labels.numpy(), K)
    floor = np.median(variance) * 0.01  # K x C = 9 values: the median is unambiguous
    np.testing.assert_allclose(term.variances_.numpy(), np.maximum(variance, floor), rtol=1e-8)
    np.testing.assert_allclose(term.variances_[:, 0].numpy(), floor, rtol=1e-8)
    assert torch.isfinite(term.predict_features(stage_features(1, 9)).score_map).all()


def test_prototypes_fall_back_to_logits_argmax():
    labels = random_labels(3, 100)
    logits = torch.nn.functional.one_hot(labels[:, 0], K).movedim(-1, 1).float() * 5.0
    logits = logits + 0.1 * torch.rand(logits.shape, generator=generator(4))
    from_labels = ClassPrototypeTerm(LAYER, K).fit_features(stage_features(3, 0, labels=labels))
    from_logits = ClassPrototypeTerm(LAYER, K).fit_features(stage_features(3, 0, logits=logits))
    torch.testing.assert_close(from_logits.means_, from_labels.means_, rtol=0, atol=0)
    torch.testing.assert_close(from_logits.variances_, from_labels.variances_, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs labels or the network's logits"):
        ClassPrototypeTerm(LAYER, K).fit_features(stage_features(3, 0))


def test_prototypes_streamed_fit_equals_one_batch():
    batches = [prototype_train(seed, n=n) for seed, n in ((0, 2), (1, 1), (2, 3))]
    streamed = ClassPrototypeTerm(LAYER, K).fit_features(batches)
    whole = Features(
        torch.cat([b.images for b in batches]),
        {LAYER: torch.cat([b.stages[LAYER] for b in batches])},
        labels=torch.cat([b.labels for b in batches]),
    )
    single = ClassPrototypeTerm(LAYER, K).fit_features(whole)
    torch.testing.assert_close(streamed.means_, single.means_, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(streamed.variances_, single.variances_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "got 0"),
        ({"num_classes": True}, "got True"),
        ({"num_classes": 2.0}, r"got 2\.0"),
        ({"num_classes": K, "min_variance": 0.0}, r"got 0\.0"),
        ({"num_classes": K, "min_variance": 1.0}, r"got 1\.0"),
    ],
)
def test_prototypes_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassPrototypeTerm(LAYER, **kwargs)


def test_prototypes_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ClassPrototypeTerm(LAYER, 2).fit_features(prototype_train())  # labels up to 2


def test_prototypes_load_state_checks_shape():
    term = ClassPrototypeTerm(LAYER, K).fit_features(prototype_train())
    with pytest.raises(ValueError, match=r"shape \(3, 3\), expected \(4, C\)"):
        ClassPrototypeTerm(LAYER, 4).load_state(term.state())


# -- IntensityTerm -------------------------------------------------------------------------------------
def intensity_images(n: int, seed: int) -> torch.Tensor:
    g = generator(seed)
    images = torch.rand(n, 1, 12, 12, generator=g) ** (1.0 + torch.rand(n, 1, 1, 1, generator=g))
    images[:, :, :3] = 0.0  # background
    return images


@pytest.mark.parametrize("bins", [4, 8])
def test_intensity_matches_numpy_histogram_mahalanobis(bins):
    train, test = intensity_images(12, 0), intensity_images(4, 1)
    term = IntensityTerm(bins=bins).fit_features(Features(train, {}))
    train_hist = numpy_histograms(train.numpy(), bins, 1e-3)
    lw = LedoitWolf().fit(train_hist)
    np.testing.assert_allclose(term.mean_.numpy(), train_hist.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(
        (term.cholesky_ @ term.cholesky_.T).numpy(), lw.covariance_, rtol=1e-8, atol=1e-12
    )
    out = term.predict_features(Features(test, {}))
    assert out.score_map is None and out.image_score.shape == (4,)
    expected = mahalanobis_numpy(numpy_histograms(test.numpy(), bins, 1e-3), train_hist)
    np.testing.assert_allclose(out.image_score.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("bins", [51, 1, 0, True, 8.0])
def test_intensity_bad_bins(bins):
    with pytest.raises(ValueError, match=f"got {bins!r}"):
        IntensityTerm(bins=bins)


@pytest.mark.parametrize("threshold", [1.0, -0.1])
def test_intensity_bad_threshold(threshold):
    with pytest.raises(ValueError, match=f"got {threshold!r}"):
        IntensityTerm(threshold=threshold)


def test_intensity_needs_two_images():
    with pytest.raises(ValueError, match="at least 2 training images, got 1"):
        IntensityTerm().fit_features(Features(intensity_images(1, 0), {}))


# -- not fitted and state round trips ------------------------------------------------------------------
def fitted_terms() -> list:
    train = prototype_train(n=6)
    return [
        StageStatisticsTerm(LAYER).fit_features(train),
        StageStatisticsTerm(LAYER, ("mean",)).fit_features(train),
        ClassPrototypeTerm(LAYER, K, min_variance=0.01).fit_features(train),
        IntensityTerm(bins=6, threshold=0.05).fit_features(train),
    ]


@pytest.mark.parametrize(
    "term", [StageStatisticsTerm(LAYER), ClassPrototypeTerm(LAYER, K), IntensityTerm()], ids=lambda t: t.kind
)
def test_not_fitted(term):
    assert not term.is_fitted
    with pytest.raises(NotFittedError, match=term.name):
        term.predict_features(stage_features(2, 0))


def assert_same_output(a: TermOutput, b: TermOutput) -> None:
    torch.testing.assert_close(a.image_score, b.image_score, rtol=0, atol=0)
    if a.score_map is None:
        assert b.score_map is None
    else:
        torch.testing.assert_close(a.score_map, b.score_map, rtol=0, atol=0)


@pytest.mark.parametrize("through_file", [False, True])
def test_state_round_trip(through_file):
    test = stage_features(3, 21)
    for term in fitted_terms():
        entry = {"kind": term.kind, "config": term.config(), "state": term.state()}
        json.dumps(entry["config"])  # plain values only
        assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in entry["state"].values())
        if through_file:
            buffer = io.BytesIO()
            torch.save(entry, buffer)
            buffer.seek(0)
            entry = torch.load(buffer, weights_only=True)
        rebuilt = term_from_state(entry)
        assert type(rebuilt) is type(term) and rebuilt.is_fitted and rebuilt.config() == term.config()
        assert_same_output(rebuilt.predict_features(test), term.predict_features(test))


def test_term_from_state_errors():
    with pytest.raises(ValueError, match="'nonsense'"):
        term_from_state({"kind": "nonsense", "config": {}, "state": {}})
    with pytest.raises(ValueError, match="lacks 'cholesky'"):
        term_from_state({"kind": "statistics", "config": {"layer": LAYER}, "state": {"mean": torch.zeros(2)}})
    with pytest.raises(ValueError, match="lacks 'means'"):
        term_from_state({"kind": "prototypes", "config": {"layer": LAYER, "num_classes": K}, "state": {}})
