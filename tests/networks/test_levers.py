"""The head's options beyond the paper: multi-scale heads, global term, Gaussian term, aggregation,
term combination and prototype refit, each against an independent reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from monai_ood.losses import SegOODLoss
from monai_ood.networks import PrototypeOODNet, create_prototype_network
from monai_ood.networks.presets import multiscale_layers
from monai_ood.networks.prototype_net import aggregate_score_map

NET = {"channels": (4, 8, 16, 32), "strides": (2, 2, 2)}


def _net(**kwargs):
    torch.manual_seed(0)
    return create_prototype_network("unet", 2, 1, 3, head_channels=6, network_kwargs=NET, **kwargs)


def test_aggregations_match_numpy():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 1, 4, 5))
    mask = rng.random((3, 1, 4, 5)) > 0.6
    mask[2] = False  # no foreground: the maximum is used
    t = torch.from_numpy(maps)
    np.testing.assert_allclose(aggregate_score_map(t, "mean"), maps.reshape(3, -1).mean(1))
    np.testing.assert_allclose(
        aggregate_score_map(t, "quantile", 0.8), np.quantile(maps.reshape(3, -1), 0.8, axis=1), rtol=1e-6
    )
    got = aggregate_score_map(t, "foreground", foreground=torch.from_numpy(mask)).numpy()
    for b in range(2):
        np.testing.assert_allclose(got[b], maps[b][mask[b]].mean())
    np.testing.assert_allclose(got[2], maps[2].max())
    with pytest.raises(ValueError, match="foreground mask"):
        aggregate_score_map(t, "foreground")


def test_multiscale_layers_are_the_finer_encoder_stages_of_distinct_resolution():
    unet = UNet(2, 1, 3, channels=(4, 8, 16, 32, 64), strides=(2, 2, 2, 2))
    layers = multiscale_layers(unet, 2)
    assert layers == ["model.1.submodule.0", "model.1.submodule.1.submodule.0"]  # 1/4 and 1/8
    assert multiscale_layers(unet, 9) == ["model.0", *layers]  # every finer resolution there is


def test_multiscale_outputs_and_loss_reach_every_head():
    net = _net(extra_layers=2)
    assert len(net.extra_layers) == 2 and net.term_names[0].startswith("local:")
    x = torch.rand(2, 1, 32, 32)
    logits, ood = net.forward_with_ood(x)
    assert ood.distances.shape == (2, 3, 4, 4) and ood.score_map.shape == (2, 1, 16, 16)
    assert ood.score_map_upsampled.shape == (2, 1, 32, 32) and ood.terms.shape == (2, 3)
    # terms are the per-scale means of A_s; the image score their log-sum of hazards (unfitted: x / c_g)
    scales = net.scale_distances(*_features(net, x))
    reference = torch.stack([d.min(1).values.flatten(1).mean(1) for d in scales], 1)
    torch.testing.assert_close(ood.terms, reference)
    torch.testing.assert_close(ood.image_score, torch.log((reference.double() / 6).sum(1)).float())
    out = net.forward_train(x, torch.rand(2, 1, 32, 32))
    assert [tuple(d.shape[2:]) for d in out.outlier_extra_distances] == [(16, 16), (8, 8)]
    loss = SegOODLoss(net.num_dims).from_train_output(out, torch.randint(0, 3, (2, 1, 32, 32)))
    loss.backward()
    for head in net.extra_heads:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def _features(net, x):
    _, features, extra = net._passes(x, run_to_end=False)
    return features, extra


def test_encoder_only_scores_equal_full_pass_scores():
    net = _net(extra_layers=1, global_head=True).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        full = net.forward_with_ood(x)[1]
        encoder_only = net.ood(x)
    torch.testing.assert_close(full.image_score, encoder_only.image_score)
    torch.testing.assert_close(full.score_map, encoder_only.score_map)


def test_extra_layer_must_be_shallower_than_the_main_layer():
    unet = UNet(2, 1, 3, channels=(4, 8, 16), strides=(2, 2))
    net = PrototypeOODNet(unet, 3, layer="model.1.submodule.0", head_channels=4, extra_layers=("model.2",))
    with pytest.raises(RuntimeError, match="shallower"):
        net.ood(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="no module"):
        PrototypeOODNet(unet, 3, head_channels=4, extra_layers=("nope",))


def test_combined_score_is_log_sum_of_weibull_hazards():
    net = _net(global_head=True)
    net.term_weibull.copy_(torch.tensor([[2.0, 3.0], [0.5, 7.0]], dtype=torch.float64))
    terms = torch.tensor([[1.0, 2.0], [6.0, 0.1]])
    expected = np.log((terms[:, 0].numpy() / 3.0) ** 2.0 + (terms[:, 1].numpy() / 7.0) ** 0.5)
    np.testing.assert_allclose(net.combine_terms(terms).numpy(), expected, rtol=1e-6)
    # huge shapes (a near-constant term) stay finite
    net.term_weibull[0, 0] = 500.0
    assert torch.isfinite(net.combine_terms(torch.tensor([[30.0, 1.0]]))).all()


def test_paper_head_has_one_term_and_no_extra_state():
    net = _net()
    assert net.term_names == [f"local:{net.layer}"] and net.term_weibull is None
    assert {k.split(".")[0] for k in net.state_dict()} == {"backbone", "head", "prototypes"}


def _labelled_batches(n=3, size=32):
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        labels = rng.integers(0, 3, (4, 1, size, size))
        labels[:, :, : size // 2] = 0
        out.append((torch.rand(4, 1, size, size), torch.from_numpy(labels)))
    return out


def test_refit_sets_class_conditional_means_and_variances():
    from monai_ood.losses import labels_to_feature_grid

    net = _net(extra_layers=1, global_head=True).eval()
    batches = _labelled_batches()
    net.refit(batches)
    # float64 reference: embeddings grouped by the majority-vote label of each feature cell
    with torch.no_grad():
        for head, protos, index in (
            (net.head, net.prototypes, None),
            (net.extra_heads[0], net.extra_prototypes[0], 0),
        ):
            vectors, classes = [], []
            for images, labels in batches:
                features, extra = _features(net, images)
                v = head(features if index is None else extra[index]).double()
                grid = labels_to_feature_grid(labels, 3, v.shape[2:])
                vectors.append(v.movedim(1, -1).reshape(-1, v.shape[1]).numpy())
                classes.append(grid.reshape(-1).numpy())
            vectors, classes = np.concatenate(vectors), np.concatenate(classes)
            for k in np.unique(classes):
                np.testing.assert_allclose(
                    protos.means[k].numpy(), vectors[classes == k].mean(0), rtol=1e-4, atol=1e-5
                )
                var = np.maximum(vectors[classes == k].var(0), 1e-4)
                np.testing.assert_allclose(protos.variances[k].numpy(), var, rtol=1e-3, atol=1e-6)


def test_gaussian_term_matches_a_numpy_mahalanobis_distance():
    from sklearn.covariance import LedoitWolf

    net = _net(gaussian_term=True).eval()
    with pytest.raises(RuntimeError, match="not fitted"):
        net.ood(torch.rand(1, 1, 32, 32))
    batches = _labelled_batches(n=4)
    net.refit(batches, prototypes=False)
    with torch.no_grad():
        pooled = np.concatenate([net.encode(x).mean(dim=(2, 3)).double().numpy() for x, _ in batches])
        estimator = LedoitWolf().fit(pooled)
        x = torch.rand(3, 1, 32, 32)
        z = net.encode(x).mean(dim=(2, 3)).double().numpy() - estimator.location_
        expected = np.sqrt(np.einsum("bi,ij,bj->b", z, np.linalg.inv(estimator.covariance_), z))
        got = net.ood(x).terms[:, -1].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_fit_score_combination_fits_a_weibull_per_term():
    from scipy.stats import weibull_min

    net = _net(global_head=True).eval()
    images = [torch.rand(8, 1, 32, 32) for _ in range(3)]
    terms = net.fit_score_combination(images).numpy()
    for t in range(terms.shape[1]):
        shape, _, scale = weibull_min.fit(terms[:, t], floc=0)
        np.testing.assert_allclose(net.term_weibull[t].numpy(), [shape, scale], rtol=2e-2)


def test_a_deep_copy_hooks_into_the_copy():
    import copy

    net = _net(extra_layers=2).eval()
    clone = copy.deepcopy(net)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone.ood(x).image_score, net.ood(x).image_score)
        clone.extra_prototypes[0].means.add_(1.0)  # the copy's own heads are the ones used
        assert not torch.allclose(clone.ood(x).terms[:, 1], net.ood(x).terms[:, 1])
