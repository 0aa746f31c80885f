"""The auxiliary prototypical classifier of Cho, Park, Choo (2023), section 3.1.

A projection head ``g`` (1x1 convolution + activation) maps encoder features
``f_int(x)`` of shape ``(B, c, *spatial)`` to ``r(x) = g(f_int(x))`` of shape
``(B, c_g, *spatial)``; :class:`MahalanobisPrototypes` holds ``K`` class means
``mu_k`` and diagonal covariances ``Sigma_k`` and returns the distance maps

    D_M(r(x)[p], k) = (r(x)[p] - mu_k)^T Sigma_k^{-1} (r(x)[p] - mu_k)

for every class ``k`` and every feature pixel/voxel ``p``.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import nn

__all__ = ["ProjectionHead", "MahalanobisPrototypes"]


class ProjectionHead(nn.Module):
    """The projection head ``g``: a 1x1 (or 1x1x1) convolution followed by an activation.

    The paper specifies "a 1x1 convolutional filter and an activation function" without naming the
    activation; we default to PReLU (MONAI's default for :class:`~monai.networks.blocks.Convolution`),
    which starts leaky and can learn to become linear, so the head does not confine ``r(x)`` to the
    positive orthant while the prototypes are initialised from N(0, I).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels ``c`` of the hooked encoder layer.
        out_channels: embedding size ``c_g`` (the paper uses 256).
        act: MONAI activation spec (name or ``(name, kwargs)``).

    Shapes:
        ``(B, in_channels, *spatial) -> (B, out_channels, *spatial)``.

    Example:
        >>> head = ProjectionHead(spatial_dims=2, in_channels=64, out_channels=16)
        >>> head(torch.zeros(2, 64, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int = 256, act="PRELU") -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.projection = Convolution(
            spatial_dims, in_channels, out_channels, kernel_size=1, act=act, norm=None, bias=True
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != self.spatial_dims + 2 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"ProjectionHead expects (B, {self.in_channels}, *{self.spatial_dims} spatial dims), "
                f"got shape {tuple(features.shape)}"
            )
        return self.projection(features)


class MahalanobisPrototypes(nn.Module):
    """K learnable class prototypes with learnable diagonal covariances (paper eq. 5 and section 3.1).

    * Means ``mu_k`` are initialised from the standard normal N(0, I), as the paper states.
    * Variances ``sigma_{k,i}`` are kept positive by storing their logarithm:
      ``sigma = exp(clamp(log_variances, -10, 10))``, initialised at 0 (``sigma = 1``, so ``Sigma_k = I`` at
      the start). The log makes gradient steps multiplicative in ``sigma``; the clamp keeps ``sigma`` in
      ``[4.5e-5, 2.2e4]`` so that an aggressive step cannot underflow it to 0 and make distances NaN.
    * Distances are expanded as ``sum_i v_i^2 / s_ki - 2 v_i mu_ki / s_ki + mu_ki^2 / s_ki``: three
      ``(K, c_g) x (B, c_g, S)`` contractions, so no ``B x K x c_g x S`` tensor is ever materialised
      (3D feature maps stay affordable). The result is clamped at 0 against float round-off and
      computed in float32 even under autocast, because float16 cancellation would swamp small distances.

    Args:
        num_classes: K, the number of segmentation classes including background.
        num_dims: embedding size ``c_g`` (= the chi-square degrees of freedom ``N`` in the loss).

    Shapes:
        ``forward``: ``(B, num_dims, *spatial) -> (B, num_classes, *spatial)``.

    Example:
        >>> protos = MahalanobisPrototypes(num_classes=4, num_dims=16)
        >>> protos(torch.zeros(2, 16, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
    """

    LOG_VARIANCE_RANGE = (-10.0, 10.0)

    def __init__(self, num_classes: int, num_dims: int = 256) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(num_dims, int) or num_dims < 1:
            raise ValueError(f"num_dims must be a positive int, got {num_dims!r}")
        self.num_classes = num_classes
        self.num_dims = num_dims
        self.means = nn.Parameter(torch.randn(num_classes, num_dims))
        self.log_variances = nn.Parameter(torch.zeros(num_classes, num_dims))

    @property
    def variances(self) -> torch.Tensor:
        """The diagonal covariances ``(K, num_dims)``, always positive."""
        return self.log_variances.clamp(*self.LOG_VARIANCE_RANGE).exp()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.dim() < 3 or embeddings.shape[1] != self.num_dims:
            raise ValueError(
                f"MahalanobisPrototypes expects (B, {self.num_dims}, *spatial), got shape {tuple(embeddings.shape)}"
            )
        batch, _, *spatial = embeddings.shape
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            flat = embeddings.float().flatten(2)  # (B, C, S)
            inv_var = torch.exp(-self.log_variances.float().clamp(*self.LOG_VARIANCE_RANGE))  # (K, C)
            means = self.means.float()
            squared = torch.einsum("kc,bcs->bks", inv_var, flat * flat)
            cross = torch.einsum("kc,bcs->bks", means * inv_var, flat)
            offset = (means * means * inv_var).sum(dim=1)  # (K,)
            distances = (squared - 2.0 * cross + offset[None, :, None]).clamp_min(0.0)
        return distances.reshape(batch, self.num_classes, *spatial)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_dims={self.num_dims}"
