"""A configurable multi-layer perceptron: the model on which depth pathologies show."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bpkit.errors import check_float, check_int
from bpkit.models._common import init_weight, make_activation, make_norm1d


class MLPBlock(nn.Module):
    """``dropout(activation(norm(linear(x))))``, plus ``x`` when ``residual`` (equal widths only)."""

    def __init__(self, in_features: int, out_features: int, activation: str, norm: str, dropout: float,
                 residual: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.norm = make_norm1d(norm, out_features)
        self.act = make_activation(activation)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.residual = residual and in_features == out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.act(self.norm(self.linear(x))))
        return x + y if self.residual else y


class MLP(nn.Module):
    """Multi-layer perceptron with ``depth`` Linear layers (``depth - 1`` hidden blocks and a head).

    Args:
        in_features: input size (flat vectors; extra dimensions are flattened).
        out_features: output size.
        depth: number of Linear layers, head included (>= 1).
        width: hidden width (>= 1).
        activation: relu, leaky_relu, gelu, tanh or sigmoid.
        norm: none, batch or layer.
        residual: identity skips around every hidden block whose input and output widths match.
        init: default (PyTorch's), xavier, he or orthogonal; biases are zeroed by the non-default schemes.
        dropout: dropout probability after each activation.
        checkpointing: recompute hidden blocks in backward (``torch.utils.checkpoint``) to save memory.

    Example::

        >>> import torch
        >>> MLP(64, 10, depth=4, width=32)(torch.randn(5, 64)).shape
        torch.Size([5, 10])
    """

    input_kind = "flat"

    def __init__(self, in_features: int, out_features: int, depth: int = 3, width: int = 128,
                 activation: str = "relu", norm: str = "none", residual: bool = False, init: str = "default",
                 dropout: float = 0.0, checkpointing: bool = False) -> None:
        super().__init__()
        check_int("in_features", in_features)
        check_int("out_features", out_features)
        check_int("depth", depth)
        check_int("width", width)
        check_float("dropout", dropout, 0.0, 1.0, high_inclusive=False)
        self.checkpointing = checkpointing
        sizes = [in_features] + [width] * (depth - 1)
        self.blocks = nn.ModuleList(
            MLPBlock(sizes[i], sizes[i + 1], activation, norm, dropout, residual) for i in range(depth - 1)
        )
        self.head = nn.Linear(sizes[-1], out_features)
        for block in self.blocks:
            init_weight(block.linear.weight, init, activation)
            if init != "default":
                nn.init.zeros_(block.linear.bias)
        init_weight(self.head.weight, "xavier" if init == "he" else init, "linear" if init != "default" else activation)
        if init != "default":
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(x)
