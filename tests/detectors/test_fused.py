"""The fused detector: default terms, fusion rules against numpy, fitting / standardisation against
recomputations from the terms, the automatic fusion choice against scikit-learn AUROCs, state round
trips, subsets, and the network's training flags."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from sklearn.metrics import roc_auc_score
from torch import nn

from monai_ood.calibration.weibull import NotFittedError
from monai_ood.detectors.fused import FUSIONS, FusedDetector, default_terms, fuse_scores
from monai_ood.detectors.terms import ClassPrototypeTerm, IntensityTerm, StageStatisticsTerm
from monai_ood.networks import PrototypeOODNet
from monai_ood.transforms.augmentation import warped_copies
from monai_ood.transforms.outlier_synthesis import OutlierSynthesis

K = 3
SIZE = 32
# the encoder stages of UNet(channels=(4, 8, 16), strides=(2, 2)), shallow to deep
STAGES = ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule"]
TERM_NAMES = [
    *(f"statistics:{s}" for s in STAGES),
    *(f"prototypes:{s}" for s in STAGES[:2]),
    "intensity",
]


def make_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(2, 1, K, channels=(4, 8, 16), strides=(2, 2)).eval()


def make_items(n: int, seed: int, labels: bool = True) -> list[dict]:
    """Smooth random images in [0, 1] with a zero border (background) and random labels in {0, 1, 2}."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.random((1, 1, 8, 8))
        image = F.interpolate(torch.from_numpy(coarse), size=(SIZE, SIZE), mode="bilinear").numpy()[0]
        image[:, :4] = image[:, -4:] = 0.0
        item = {"image": image.astype(np.float32)}
        if labels:
            item["label"] = rng.integers(0, K, (1, SIZE, SIZE)).astype(np.int64)
        out.append(item)
    return out


def stack(items: list[dict]) -> torch.Tensor:
    return torch.from_numpy(np.stack([i["image"] for i in items]))


@pytest.fixture(scope="module")
def data():
    return make_items(10, 0), make_items(6, 1)


@pytest.fixture(scope="module")
def auto_detector(data):
    train, val = data
    return FusedDetector(make_unet(), num_classes=K).fit(train, val)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return stack(make_items(3, 2))


def quick_detector(network=None, **kwargs) -> FusedDetector:
    kwargs = {"num_classes": K, "fusion": "sum", "warped_copies": 0, **kwargs}
    return FusedDetector(make_unet() if network is None else network, **kwargs)


# -- default_terms --------------------------------------------------------------------------------------
def test_default_terms_of_a_unet():
    terms = default_terms(make_unet(), K)
    assert [t.name for t in terms] == TERM_NAMES
    assert [type(t) for t in terms] == [StageStatisticsTerm] * 3 + [ClassPrototypeTerm] * 2 + [IntensityTerm]
    assert all(t.num_classes == K for t in terms if isinstance(t, ClassPrototypeTerm))
    assert all(t.statistics == ("mean", "std") for t in terms if isinstance(t, StageStatisticsTerm))


@pytest.mark.parametrize("prototype_stages, intensity", [(0, True), (1, False), (5, True)])
def test_default_terms_options(prototype_stages, intensity):
    terms = default_terms(make_unet(), K, prototype_stages=prototype_stages, intensity=intensity)
    expected = [f"statistics:{s}" for s in STAGES] + [f"prototypes:{s}" for s in STAGES[:prototype_stages]]
    assert [t.name for t in terms] == expected + (["intensity"] if intensity else [])


def test_default_terms_with_layers_and_errors():
    terms = default_terms(make_unet(), K, layers=["model.2"], intensity=False)
    assert [t.name for t in terms] == ["statistics:model.2", "prototypes:model.2"]
    with pytest.raises(ValueError, match="at least one layer"):
        default_terms(make_unet(), K, layers=[])
    with pytest.raises(ValueError, match="Sequential"):
        default_terms(nn.Sequential(nn.Conv2d(1, K, 1)), K)


# -- fuse_scores ----------------------------------------------------------------------------------------
@pytest.fixture
def fusion_inputs():
    rng = np.random.default_rng(5)
    raw = rng.gamma(2.0, 1.5, (7, 4))
    loc, scale = rng.normal(0, 1, 4), rng.uniform(0.5, 2.0, 4)
    weibull = np.stack([rng.uniform(0.7, 4.0, 4), rng.uniform(0.5, 3.0, 4)], axis=1)
    return raw, loc, scale, weibull


@pytest.mark.parametrize("rule", FUSIONS)
def test_fuse_scores_match_numpy(fusion_inputs, rule):
    raw, loc, scale, weibull = fusion_inputs
    z = (raw - loc) / scale
    expected = {
        "sum": z.sum(axis=1),
        "max": z.max(axis=1),
        "hazard": np.log(((raw / weibull[:, 1]) ** weibull[:, 0]).sum(axis=1)),
    }[rule]
    tensors = [torch.from_numpy(a) for a in (raw, loc, scale, weibull)]
    out = fuse_scores(tensors[0].float(), rule, *tensors[1:])  # float32 scores are promoted
    assert out.dtype == torch.float64 and out.shape == (7,)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)
    out64 = fuse_scores(tensors[0], rule, *tensors[1:])
    np.testing.assert_allclose(out64.numpy(), expected, rtol=1e-12)


def test_fuse_scores_unknown_rule(fusion_inputs):
    tensors = [torch.from_numpy(a) for a in fusion_inputs]
    with pytest.raises(ValueError, match="'median'"):
        fuse_scores(tensors[0], "median", *tensors[1:])


# -- construction ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fusion": "median"}, "median"),
        ({"warped_copies": -1}, "got -1"),
        ({"warped_copies": True}, "got True"),
        ({"warped_copies": 1.5}, r"got 1\.5"),
        ({"batch_size": 0}, "got 0"),
        ({"batch_size": False}, "got False"),
        ({"fusion": "auto", "selection_ops": ()}, "selection op"),
        ({"terms": []}, "terms must not be empty"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedDetector(make_unet(), num_classes=K, **kwargs)


def test_not_fitted(images):
    detector = quick_detector()
    assert not detector.is_fitted
    for call in (
        lambda: detector.predict(images),
        lambda: detector.term_scores(images),
        lambda: detector.segment_and_score(images),
        lambda: detector.fuse(torch.zeros(1, 6)),
        lambda: detector.to_state(),
        lambda: detector.subset(["intensity"]),
    ):
        with pytest.raises(NotFittedError):
            call()


@pytest.mark.parametrize("val_count", [None, 0, 1])
def test_fit_needs_validation_items(data, val_count):
    train, val = data
    val_items = None if val_count is None else val[:val_count]
    with pytest.raises(ValueError, match="at least 2 validation images"):
        quick_detector().fit(train, val_items)


def test_fit_needs_training_items(data):
    train, val = data
    with pytest.raises(ValueError, match="at least 2 training images, got 1"):
        quick_detector().fit(train[:1], val)


# -- prediction -----------------------------------------------------------------------------------------
def test_predict_shapes_and_terms(auto_detector, images):
    assert auto_detector.is_fitted and auto_detector.term_names == TERM_NAMES
    assert auto_detector.layers == STAGES
    out = auto_detector.predict(images)
    assert out.image_score.shape == (3,) and out.image_score.dtype == torch.float32
    assert out.score_map.shape == (3, 1, SIZE, SIZE) and out.score_map.dtype == torch.float32
    assert torch.isfinite(out.image_score).all() and (out.score_map > 0).all()
    torch.testing.assert_close(auto_detector(images).image_score, out.image_score, rtol=0, atol=0)


def test_segment_and_score_logits_equal_network(auto_detector, images):
    logits, out, low = auto_detector.segment_and_score(images)
    with torch.no_grad():
        expected = auto_detector.network.eval()(images)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(out.image_score, auto_detector.predict(images).image_score, rtol=0, atol=0)
    assert low.shape == (3, 1, SIZE // 2, SIZE // 2)  # the finest map grid, that of model.0


def test_fuse_of_term_scores_equals_predict(auto_detector, images):
    raw = auto_detector.term_scores(images)
    assert raw.shape == (3, len(TERM_NAMES)) and raw.dtype == torch.float64
    fused = auto_detector.fuse(raw)
    torch.testing.assert_close(fused.float(), auto_detector.predict(images).image_score, rtol=1e-5, atol=1e-5)
    for rule in FUSIONS:
        reference = fuse_scores(raw, rule, auto_detector.loc_, auto_detector.scale_, auto_detector.weibull_)
        torch.testing.assert_close(auto_detector.fuse(raw, rule), reference, rtol=0, atol=0)


def test_term_scores_equal_the_terms_on_one_pass(auto_detector, images):
    features = auto_detector.features(images)
    expected = torch.stack([t.predict_features(features).image_score for t in auto_detector.terms], dim=1)
    torch.testing.assert_close(auto_detector.term_scores(images), expected, rtol=0, atol=0)


def test_atypical_image_scores_higher(auto_detector, data):
    _, val = data
    inliers = auto_detector.predict(stack(val)).image_score
    constant = torch.ones(1, 1, SIZE, SIZE)  # a saturated image: nothing like the training images
    assert auto_detector.predict(constant).image_score[0] > inliers.max()


# -- standardisation ------------------------------------------------------------------------------------
def validation_images(detector: FusedDetector, val: list[dict]) -> torch.Tensor:
    """The validation items and their warped copies, as the fit standardises on them."""
    return stack(list(val) + warped_copies(val, detector.seed + 1, detector.warped_copies))


def test_standardisation_matches_recomputation(auto_detector, data):
    _, val = data
    x = validation_images(auto_detector, val)
    assert len(x) == 2 * len(val)
    raw = auto_detector.term_scores(x).numpy()
    np.testing.assert_allclose(auto_detector.loc_.numpy(), raw.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(auto_detector.scale_.numpy(), raw.std(axis=0, ddof=1), rtol=1e-8)
    assert auto_detector.weibull_.shape == (len(TERM_NAMES), 2) and (auto_detector.weibull_ > 0).all()
    features = auto_detector.features(x)
    maps = [t.predict_features(features).score_map for t in auto_detector.terms if t.has_map]
    medians = [np.median(m.numpy()) for m in maps]
    np.testing.assert_allclose(auto_detector.map_scale_.numpy(), medians, rtol=1e-10)


def test_fused_map_is_mean_of_scaled_maps(auto_detector, images):
    features = auto_detector.features(images)
    maps = [t.predict_features(features).score_map for t in auto_detector.terms if t.has_map]
    scaled = [m / s for m, s in zip(maps, auto_detector.map_scale_.tolist(), strict=True)]
    finest = scaled[0].shape[2:]
    resized = [F.interpolate(m, size=finest, mode="bilinear", align_corners=False) for m in scaled]
    expected_low = torch.stack(resized).mean(dim=0)
    _, out, low = auto_detector.segment_and_score(images)
    torch.testing.assert_close(low, expected_low.float(), rtol=1e-5, atol=1e-6)
    expected = F.interpolate(expected_low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.score_map, expected.float(), rtol=1e-5, atol=1e-6)


def test_single_map_term_is_one_at_the_validation_median(data):
    train, val = data
    detector = quick_detector(terms=[ClassPrototypeTerm(STAGES[1], K)]).fit(train, val)
    _, _, low = detector.segment_and_score(stack(val))
    assert np.median(low.double().numpy()) == pytest.approx(1.0, rel=1e-6)


# -- fitting --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("copies", [0, 1, 2])
def test_warped_copies_count(data, copies):
    train, val = data
    detector = quick_detector(terms=[StageStatisticsTerm(STAGES[2])], warped_copies=copies).fit(train, val)
    assert detector.num_train_ == (1 + copies) * len(train)


def test_prototypes_are_fitted_on_the_labels(data):
    train, val = data
    detector = quick_detector(batch_size=4).fit(train, val)  # three fitting batches
    features = detector.features(stack(train), torch.from_numpy(np.stack([i["label"] for i in train])))
    for term in detector.terms:
        if isinstance(term, ClassPrototypeTerm):
            reference = ClassPrototypeTerm(term.layer, K).fit_features(features)
            torch.testing.assert_close(term.means_, reference.means_, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(term.variances_, reference.variances_, rtol=1e-8, atol=1e-12)
    # the statistics terms: one Gaussian over the training images' vectors
    stats = detector.terms[0]
    reference = StageStatisticsTerm(stats.layer).fit_features(features)
    torch.testing.assert_close(stats.mean_, reference.mean_, rtol=1e-10, atol=1e-12)


def test_unlabelled_items_use_the_prediction(data):
    train, val = data
    unlabelled = [{"image": i["image"]} for i in train]
    detector = quick_detector(terms=[ClassPrototypeTerm(STAGES[0], K)]).fit(unlabelled, val)
    features = detector.features(stack(train))  # no labels: logits.argmax
    reference = ClassPrototypeTerm(STAGES[0], K).fit_features(features)
    torch.testing.assert_close(detector.terms[0].means_, reference.means_, rtol=1e-10, atol=1e-12)


def test_num_classes_read_from_the_network(data):
    train, val = data
    detector = FusedDetector(make_unet(), fusion="sum", warped_copies=0)
    assert detector.terms is None
    detector.fit(train, val)
    assert detector.num_classes == K and detector.term_names == TERM_NAMES


def test_training_flags_restored(data, images):
    train, val = data
    network = make_unet().train()
    seen = []
    network.register_forward_hook(lambda m, i, o: seen.append(any(s.training for s in m.modules())))
    detector = quick_detector(network, fusion="auto", selection_ops=("vflip",)).fit(train, val)
    assert all(m.training for m in network.modules())
    detector.predict(images)
    detector.segment_and_score(images)
    assert all(m.training for m in network.modules())
    assert seen and not any(seen)  # every pass of the detector ran in eval mode


def test_prototype_network_is_unwrapped(data, images):
    train, val = data
    unet = make_unet()
    wrapped = PrototypeOODNet(unet, num_classes=K, head_channels=8)
    detector = quick_detector(wrapped).fit(train, val)
    assert detector.network is unet
    assert detector.layers == STAGES
    plain = quick_detector(make_unet()).fit(train, val)  # the same weights, not wrapped
    torch.testing.assert_close(detector.predict(images).image_score, plain.predict(images).image_score)


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, K, 1)).eval()


def test_unknown_network_needs_layers(data, images):
    with pytest.raises(ValueError, match="Sequential"):
        FusedDetector(conv_net())
    with pytest.raises(ValueError, match="Sequential"):
        FusedDetector(conv_net(), num_classes=K)
    train, val = data
    detector = FusedDetector(conv_net(), layers=["0", "2"], fusion="max", warped_copies=0).fit(train, val)
    assert detector.num_classes == K
    assert detector.term_names == [
        "statistics:0",
        "statistics:2",
        "prototypes:0",
        "prototypes:2",
        "intensity",
    ]
    out = detector.predict(images)
    assert out.image_score.shape == (3,) and out.score_map.shape == (3, 1, SIZE, SIZE)


# -- fusion choice --------------------------------------------------------------------------------------
def test_auto_fusion_chooses_the_best_mean(auto_detector):
    """Candidates: every non-empty combination of term families x every rule; the best mean wins, ties
    to more families, then FUSIONS order; the leave-one-op-out estimate is recomputed from the table."""
    selection = auto_detector.selection_
    means, table = selection["mean_auroc"], selection["auroc_per_op"]
    kinds = list(dict.fromkeys(t.kind for t in auto_detector.terms))
    combos = [c for n in range(len(kinds), 0, -1) for c in itertools.combinations(kinds, n)]
    names = [f"{'+'.join(c)} / {r}" for c in combos for r in FUSIONS]
    assert list(means) == names and set(table) == set(names)
    for name in names:
        assert list(table[name]) == list(auto_detector.selection_ops)
        assert means[name] == pytest.approx(np.mean(list(table[name].values())), abs=1e-12)
    best = max(means.values())
    chosen = next(n for n in names if means[n] >= best - 1e-6)
    assert selection["chosen"] == chosen
    families, rule = chosen.split(" / ")
    assert auto_detector.fusion_ == selection["rule"] == rule
    expected_mask = [t.kind in families.split("+") for t in auto_detector.terms]
    assert auto_detector.score_mask_.tolist() == expected_mask
    held = []
    for op in auto_detector.selection_ops:
        others = [o for o in auto_detector.selection_ops if o != op]
        scores = [np.mean([table[n][o] for o in others]) for n in names]
        pick = names[next(i for i, v in enumerate(scores) if v >= max(scores) - 1e-6)]
        held.append(table[pick][op])
    assert selection["leave_one_op_out_auroc"] == pytest.approx(np.mean(held), abs=1e-9)


def test_fused_score_uses_only_the_chosen_terms(auto_detector, images):
    raw = auto_detector.term_scores(images)
    mask = auto_detector.score_mask_
    z = (raw[:, mask] - auto_detector.loc_[mask]) / auto_detector.scale_[mask]
    rule = auto_detector.fusion_
    if rule == "sum":
        expected = z.sum(dim=1)
    elif rule == "max":
        expected = z.max(dim=1).values
    else:
        k, lam = auto_detector.weibull_[mask, 0], auto_detector.weibull_[mask, 1]
        expected = torch.log(((raw[:, mask] / lam) ** k).sum(dim=1))
    torch.testing.assert_close(
        auto_detector.predict(images).image_score, expected.float(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("op", ["rotate180", "gamma", "local_noise"])
def test_auto_fusion_table_matches_sklearn(auto_detector, data, op):
    _, val = data
    k = auto_detector.selection_ops.index(op)
    synth = OutlierSynthesis(ops=(op,), prob=1.0)
    synth.set_random_state(auto_detector.seed + 1000 + k)
    # outliers are made from the validation items and their warped copies, as the InD side
    images = validation_images(auto_detector, val).numpy()
    outliers = torch.stack([torch.as_tensor(np.asarray(synth(i), dtype=np.float32)) for i in images])
    raw_in = auto_detector.term_scores(torch.from_numpy(images))
    raw_out = auto_detector.term_scores(outliers)
    y = np.r_[np.zeros(len(raw_in)), np.ones(len(raw_out))]
    for name, row in auto_detector.selection_["auroc_per_op"].items():
        families, rule = name.split(" / ")
        keep = [n for n in auto_detector.term_names if n.split(":")[0] in families.split("+")]
        sub = auto_detector.subset(keep, rule)
        scores = np.r_[
            sub.fuse(raw_in[:, [auto_detector.term_names.index(n) for n in keep]]).numpy(),
            sub.fuse(raw_out[:, [auto_detector.term_names.index(n) for n in keep]]).numpy(),
        ]
        assert row[op] == pytest.approx(roc_auc_score(y, scores))


def test_given_fusion(data):
    train, val = data
    detector = quick_detector(fusion="max").fit(train, val)
    assert detector.fusion_ == "max"
    assert detector.selection_ == {"rule": "max", "chosen_by": "given"}
    raw = detector.term_scores(stack(val))
    expected = ((raw - detector.loc_) / detector.scale_).max(dim=1).values
    torch.testing.assert_close(detector.predict(stack(val)).image_score, expected.float())


# -- subsets --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", range(len(TERM_NAMES)))
def test_subset_of_one_term(auto_detector, images, index):
    name = TERM_NAMES[index]
    sub = auto_detector.subset([name], rule="sum")
    assert sub.term_names == [name] and sub.fusion_ == "sum" and sub.is_fitted
    raw = auto_detector.term_scores(images)
    expected = (raw[:, index] - auto_detector.loc_[index]) / auto_detector.scale_[index]
    out = sub.predict(images)
    torch.testing.assert_close(out.image_score, expected.float(), rtol=1e-5, atol=1e-5)
    if name.startswith("prototypes"):
        feature_map = auto_detector.terms[index].predict_features(auto_detector.features(images)).score_map
        scale = auto_detector.map_scale_[index - 3]
        expected_map = F.interpolate(
            feature_map / scale, size=(SIZE, SIZE), mode="bilinear", align_corners=False
        )
        torch.testing.assert_close(out.score_map, expected_map.float(), rtol=1e-5, atol=1e-6)
    else:
        assert out.score_map is None


def test_subset_keeps_the_rule_and_errors(auto_detector, images):
    sub = auto_detector.subset(TERM_NAMES[:3])
    assert sub.fusion_ == auto_detector.fusion_
    raw = auto_detector.term_scores(images)[:, :3]
    expected = fuse_scores(
        raw,
        auto_detector.fusion_,
        auto_detector.loc_[:3],
        auto_detector.scale_[:3],
        auto_detector.weibull_[:3],
    )
    torch.testing.assert_close(sub.predict(images).image_score, expected.float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'nonsense'"):
        auto_detector.subset(["intensity", "nonsense"])
    with pytest.raises(ValueError, match=r"\[\]"):
        auto_detector.subset([])


# -- storage --------------------------------------------------------------------------------------------
def saved_and_loaded(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_round_trip(auto_detector, images):
    state = saved_and_loaded(auto_detector.to_state())
    network = make_unet()  # the same weights, another instance
    loaded = FusedDetector.from_state(network, state)
    assert loaded.network is network and loaded.is_fitted
    assert loaded.term_names == auto_detector.term_names and loaded.fusion_ == auto_detector.fusion_
    assert loaded.selection_ == auto_detector.selection_ and loaded.num_train_ == auto_detector.num_train_
    expected, out = auto_detector.predict(images), loaded.predict(images)
    torch.testing.assert_close(out.image_score, expected.image_score, rtol=0, atol=0)
    torch.testing.assert_close(out.score_map, expected.score_map, rtol=0, atol=0)
    torch.testing.assert_close(loaded.term_scores(images), auto_detector.term_scores(images), rtol=0, atol=0)


def test_from_state_errors(auto_detector):
    state = auto_detector.to_state()
    shallow = UNet(2, 1, K, channels=(4, 8), strides=(2,))  # no model.1.submodule.0
    with pytest.raises(ValueError, match="model.1.submodule.0"):
        FusedDetector.from_state(shallow, state)
    with pytest.raises(ValueError, match="'other'"):
        FusedDetector.from_state(make_unet(), {**state, "format": "other"})
    with pytest.raises(ValueError, match="version 99"):
        FusedDetector.from_state(make_unet(), {**state, "version": 99})
