import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from scipy import stats
from sklearn.metrics import roc_auc_score

from monai_ood.losses import OutlierExposureLoss, SegOODLoss, labels_to_feature_grid
from monai_ood.networks import MahalanobisPrototypes, ProjectionHead, create_prototype_network


def _eq8_float64(distances, grid_labels, outlier_distances, dof):
    """Equation (8) written out naively in float64 with scipy's chi-square survival function."""
    d, d_out = distances.double().numpy(), outlier_distances.double().numpy()
    own = np.take_along_axis(d, grid_labels.numpy()[:, None], axis=1)[:, 0]
    inlier = -np.mean([np.log(stats.chi2.sf(own[b], dof).mean()) for b in range(len(own))])
    score = d_out.min(axis=1)
    outlier = -np.mean([np.log(1 - stats.chi2.sf(score[b], dof).mean()) for b in range(len(score))])
    return inlier + outlier


def test_equation_8_against_float64_reference():
    torch.manual_seed(0)
    dof = 16
    distances = torch.rand(3, 4, 5, 6) * 40
    outliers = torch.rand(2, 4, 5, 6) * 40
    labels = torch.randint(0, 4, (3, 1, 5, 6))
    got = OutlierExposureLoss(dof)(distances, labels, outliers)
    expected = _eq8_float64(distances, labels[:, 0], outliers, dof)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_labels_brought_to_feature_grid_by_majority():
    labels = torch.zeros(1, 1, 4, 6, dtype=torch.long)
    labels[0, 0, :2, :3] = 2  # a whole top-left cell
    labels[0, 0, 2:, 3:] = 1
    labels[0, 0, 3, 5] = 3  # a minority pixel in the bottom-right cell
    grid = labels_to_feature_grid(labels.float(), num_classes=4, size=(2, 2))
    assert grid.tolist() == [[[2, 0], [0, 1]]]
    assert labels_to_feature_grid(labels, 4, (4, 6)).shape == (1, 4, 6)


@pytest.mark.parametrize(
    "labels,match",
    [
        (torch.full((1, 1, 4, 4), 4), r"\[0, 3\]"),
        (torch.full((1, 1, 4, 4), -1), r"\[0, 3\]"),
        (torch.full((1, 1, 4, 4), 0.5), "integer"),
        (torch.full((1, 1, 4, 4), float("nan")), "integer"),
        (torch.zeros(1, 2, 4, 4), "class indices"),
        (torch.zeros(4, 4), "spatial dims"),
    ],
)
def test_label_validation(labels, match):
    with pytest.raises(ValueError, match=match):
        OutlierExposureLoss(8)(torch.rand(1, 4, 2, 2), labels)


def test_extreme_distances_give_finite_loss_and_gradients():
    for scale in (0.0, 1e-30, 1.0, 1e4, 1e6, 1e9):
        d = torch.full((2, 3, 4, 4), scale, requires_grad=True)
        d_out = torch.full((2, 3, 4, 4), scale, requires_grad=True)
        loss = OutlierExposureLoss(256)(d, torch.zeros(2, 1, 16, 16), d_out)
        loss.backward()
        assert torch.isfinite(loss), scale
        assert torch.isfinite(d.grad).all() and torch.isfinite(d_out.grad).all(), scale


def test_loss_signs_reward_the_right_geometry():
    loss = OutlierExposureLoss(16)
    near, far = torch.full((2, 2, 3, 3), 10.0), torch.full((2, 2, 3, 3), 500.0)
    labels = torch.zeros(2, 1, 3, 3)
    assert float(loss(near, labels, far)) < 0.5 < float(loss(far, labels, near))
    assert float(loss(near, labels)) == pytest.approx(-np.log(stats.chi2.sf(10.0, 16)), rel=1e-5)


def test_seg_ood_loss_is_dice_ce_plus_lambda_l_out():
    torch.manual_seed(0)
    net = create_prototype_network(
        "unet", 2, 1, 3, head_channels=8, network_kwargs={"channels": (4, 8, 16), "strides": (2, 2)}
    )
    images, outliers = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    labels = torch.randint(0, 3, (2, 1, 32, 32))
    out = net.forward_train(images, outliers)
    loss_fn = SegOODLoss(net.num_dims, lambda_out=0.25)
    total, parts = loss_fn(out.logits, labels, out.distances, out.outlier_distances, return_components=True)
    seg = DiceCELoss(to_onehot_y=True, softmax=True)(out.logits, labels)
    ood = OutlierExposureLoss(8)(out.distances, labels, out.outlier_distances)
    assert total.item() == pytest.approx((seg + 0.25 * ood).item(), rel=1e-6)
    assert float(parts["seg"]) == pytest.approx(float(seg)) and float(parts["ood"]) == pytest.approx(
        float(ood)
    )
    total.backward()
    with pytest.raises(ValueError, match="lambda_out"):
        SegOODLoss(8, lambda_out=-1.0)


def _blobs(generator, n, outlier):
    """Feature maps (n, 8, 4, 4): class 0/1 pixels around two centres; outliers sit between them, offset."""
    centres = torch.tensor([[2.0] * 4 + [0.0] * 4, [0.0] * 4 + [2.0] * 4])
    labels = torch.randint(0, 2, (n, 4, 4), generator=generator)
    if outlier:
        offset = torch.tensor([0.6, -0.6] * 4)
        mean = (centres.mean(0) + offset).view(1, 8, 1, 1)
        return mean + 0.5 * torch.randn(n, 8, 4, 4, generator=generator), labels
    return centres[labels].permute(0, 3, 1, 2) + 0.5 * torch.randn(n, 8, 4, 4, generator=generator), labels


def test_l_out_learns_to_separate_outliers():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    head, protos = ProjectionHead(2, 8, 16), MahalanobisPrototypes(2, 16)
    loss_fn = OutlierExposureLoss(16)
    test_in, test_labels = _blobs(generator, 200, False)
    test_out, _ = _blobs(generator, 200, True)

    def evaluate():
        with torch.no_grad():
            d_in, d_out = protos(head(test_in)), protos(head(test_out))
        scores = torch.cat([d_in.min(1).values.flatten(1).mean(1), d_out.min(1).values.flatten(1).mean(1)])
        auroc = roc_auc_score([0] * 200 + [1] * 200, scores.numpy())
        return auroc, float(d_in.gather(1, test_labels[:, None]).mean())

    auroc_before, own_before = evaluate()
    assert auroc_before < 0.9  # the untrained head does not already separate them
    optimiser = torch.optim.Adam([*head.parameters(), *protos.parameters()], lr=1e-2)
    for _ in range(250):
        x, y = _blobs(generator, 16, False)
        x_out, _ = _blobs(generator, 16, True)
        loss = loss_fn(protos(head(x)), y[:, None], protos(head(x_out)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    auroc_after, own_after = evaluate()
    assert auroc_after > 0.95
    assert own_after < 0.5 * own_before


def test_class_balanced_inlier_term_matches_float64_reference():
    from scipy.stats import chi2

    from monai_ood.losses import OutlierExposureLoss

    rng = np.random.default_rng(3)
    num_dims = 8
    distances = rng.random((2, 3, 4, 4)) * 40
    labels = rng.integers(0, 3, (2, 1, 4, 4))
    labels[1] = np.where(labels[1] == 2, 0, labels[1])  # class 2 absent from image 1
    loss = OutlierExposureLoss(num_dims, class_balanced=True)
    got = float(loss.inlier_term(torch.from_numpy(distances).float(), torch.from_numpy(labels)))
    per_image = []
    for b in range(2):
        own = np.take_along_axis(distances[b], labels[b], axis=0)[0]
        logs = [np.log(chi2.sf(own[labels[b, 0] == k], num_dims).mean()) for k in np.unique(labels[b])]
        per_image.append(np.mean(logs))
    assert got == pytest.approx(-np.mean(per_image), rel=1e-5)


def test_class_balanced_term_cannot_hide_an_abandoned_minority_class():
    from monai_ood.losses import OutlierExposureLoss

    labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    labels[0, 0, 0, 0] = 1  # one minority pixel, far from its prototype
    distances = torch.full((1, 2, 8, 8), 4.0)
    distances[0, 1, 0, 0] = 500.0
    plain = OutlierExposureLoss(4).inlier_term(distances, labels)
    balanced = OutlierExposureLoss(4, class_balanced=True).inlier_term(distances, labels)
    assert float(balanced) > 10 * float(plain)


def test_class_inclusion_fractions_against_scipy_bound():
    from scipy.stats import chi2

    from monai_ood.losses import class_inclusion_fractions

    rng = np.random.default_rng(4)
    distances = rng.random((2, 3, 4, 4)) * 2 * chi2.ppf(0.95, 6)
    labels = rng.integers(0, 2, (2, 1, 4, 4))  # class 2 absent
    got = class_inclusion_fractions(torch.from_numpy(distances), torch.from_numpy(labels), 6).numpy()
    own = np.take_along_axis(distances, labels, axis=1)[:, 0]
    for k in (0, 1):
        assert got[k] == pytest.approx(np.mean(own[labels[:, 0] == k] <= chi2.ppf(0.95, 6)))
    assert np.isnan(got[2])


def test_global_term_losses_match_scipy():
    from scipy.stats import chi2

    from monai_ood.losses.outlier_exposure import image_exclusion_term, image_inclusion_term

    d = torch.tensor([3.0, 10.0, 25.0]).reshape(3, 1, 1)
    assert float(image_inclusion_term(d, 8)) == pytest.approx(
        -np.mean(chi2.logsf(d.flatten().numpy(), 8)), rel=1e-5
    )
    assert float(image_exclusion_term(d, 8)) == pytest.approx(
        -np.mean(chi2.logcdf(d.flatten().numpy(), 8)), rel=1e-5
    )
