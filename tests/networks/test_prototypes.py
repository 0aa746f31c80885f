import pytest
import torch

from monai_ood.networks import MahalanobisPrototypes, ProjectionHead


def _reference_distances(embeddings, means, variances):
    """Brute-force float64 D_M: materialises (B, K, C, S), which the module must avoid."""
    e = embeddings.double().flatten(2)[:, None]  # (B, 1, C, S)
    m = means.double()[None, :, :, None]  # (1, K, C, 1)
    v = variances.double()[None, :, :, None]
    return ((e - m) ** 2 / v).sum(2).reshape(embeddings.shape[0], means.shape[0], *embeddings.shape[2:])


@pytest.mark.parametrize("spatial", [(5, 7), (3, 4, 5)])
def test_distances_match_float64_reference(spatial):
    torch.manual_seed(0)
    protos = MahalanobisPrototypes(num_classes=4, num_dims=16)
    with torch.no_grad():
        protos.log_variances.uniform_(-1.0, 1.0)
    x = torch.randn(3, 16, *spatial) * 2
    got = protos(x)
    assert got.shape == (3, 4, *spatial)
    expected = _reference_distances(x, protos.means.detach(), protos.variances.detach())
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-3)
    assert (got >= 0).all()


def test_distance_zero_at_prototype_and_paper_initialisation():
    torch.manual_seed(0)
    protos = MahalanobisPrototypes(num_classes=3, num_dims=2048)
    # means ~ N(0, I) as the paper states; variances start at 1
    assert (
        abs(float(protos.means.detach().mean())) < 0.05 and abs(float(protos.means.detach().std()) - 1) < 0.05
    )
    torch.testing.assert_close(protos.variances, torch.ones(3, 2048))
    at_mean = protos.means.detach()[1].view(1, 2048, 1, 1)
    d = protos(at_mean)
    d = d.detach()
    assert float(d[0, 1]) == pytest.approx(0.0, abs=1e-2)
    assert float(d[0, 0]) > 1000  # two independent N(0, I) means are ~2 * 2048 apart


def test_variances_stay_positive_under_training():
    protos = MahalanobisPrototypes(num_classes=2, num_dims=8)
    # only the variances move, with a huge step that would drive an unclamped log-variance to -inf
    opt = torch.optim.SGD([protos.log_variances], lr=1e4)
    for _ in range(5):
        opt.zero_grad()
        (-protos(torch.randn(4, 8, 3, 3)).mean()).backward()  # pushes variances towards 0
        opt.step()
    assert (protos.variances > 0).all() and torch.isfinite(protos(torch.randn(4, 8, 3, 3))).all()


def test_distances_float32_under_autocast():
    protos = MahalanobisPrototypes(num_classes=2, num_dims=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = protos(torch.randn(1, 8, 4, 4).bfloat16())
    assert d.dtype == torch.float32


def test_head_shapes_and_errors():
    head = ProjectionHead(3, 12, 6)
    assert head(torch.randn(2, 12, 2, 3, 4)).shape == (2, 6, 2, 3, 4)
    with pytest.raises(ValueError, match="expects"):
        head(torch.randn(2, 11, 2, 3, 4))
    with pytest.raises(ValueError, match="spatial_dims"):
        ProjectionHead(1, 4, 4)
    with pytest.raises(ValueError, match="num_dims"):
        MahalanobisPrototypes(2, 0)
    with pytest.raises(ValueError, match="expects"):
        MahalanobisPrototypes(2, 8)(torch.randn(1, 7, 2, 2))
