"""A deep linear network: the model on which saddle points show (Saxe et al. 2014)."""

from __future__ import annotations

import torch
from torch import nn

from bpkit.errors import check_float, check_int


class DeepLinear(nn.Module):
    """``depth`` bias-free Linear layers with no activation: a linear map, but a non-convex loss. From a small
    initialization the origin is a saddle point (zero gradient, negative curvature along the directions that align
    the layers), so gradient descent sits on a plateau before it learns (Saxe et al. 2014).

    Args:
        in_features: input size (extra dimensions are flattened).
        out_features: output size.
        depth: number of Linear layers (>= 1; >= 2 for a saddle at the origin).
        width: hidden width.
        init_scale: every weight is orthogonal times this scale (the product of the layers starts at about
            ``init_scale ** depth``).

    Example::

        >>> import torch
        >>> net = DeepLinear(8, 1, depth=3, width=16, init_scale=0.1)
        >>> net(torch.randn(5, 8)).shape, len(list(net.parameters()))
        (torch.Size([5, 1]), 3)
    """

    input_kind = "flat"

    def __init__(self, in_features: int, out_features: int, depth: int = 3, width: int = 16,
                 init_scale: float = 0.1) -> None:
        super().__init__()
        check_int("in_features", in_features)
        check_int("out_features", out_features)
        check_int("depth", depth)
        check_int("width", width)
        check_float("init_scale", init_scale, 0.0)
        sizes = [in_features] + [width] * (depth - 1) + [out_features]
        self.layers = nn.ModuleList(nn.Linear(sizes[i], sizes[i + 1], bias=False) for i in range(depth))
        for layer in self.layers:
            nn.init.orthogonal_(layer.weight, gain=init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = layer(x)
        return x
