"""A small residual CNN (and its plain twin) for small images."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bpkit.errors import check_choice, check_int
from bpkit.models._common import INITS, init_weight

NORMS = ("batch", "none")


def _norm2d(norm: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; with ``residual`` the input (projected by a 1x1 conv when the shape
    changes) is added before the last ReLU. Without it, the block has no skip path at all."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, residual: bool) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=bias)
        self.norm1 = _norm2d(norm, out_channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=bias)
        self.norm2 = _norm2d(norm, out_channels)
        self.act2 = nn.ReLU()
        self.residual = residual
        self.shortcut: nn.Module | None = None
        if residual and (stride != 1 or in_channels != out_channels):
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias),
                                          _norm2d(norm, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.residual:
            y = y + (self.shortcut(x) if self.shortcut is not None else x)
        return self.act2(y)


class ResNet(nn.Module):
    """Residual CNN for small images: a 3x3 stem, ``depth`` basic blocks in ``stages`` stages
    (width doubling and stride 2 at each new stage), global average pooling and a linear head.

    Args:
        in_channels: image channels.
        out_features: number of classes.
        depth: number of basic blocks (>= 1), spread evenly over the stages.
        width: channels of the first stage.
        stages: number of stages (>= 1).
        norm: batch or none.
        residual: ``False`` gives the plain network of the same depth (no skip paths).
        init: default or he (others accepted: xavier, orthogonal).
        checkpointing: recompute blocks in backward to save memory.

    Example::

        >>> import torch
        >>> ResNet(1, 10, depth=4, width=8)(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    input_kind = "image"

    def __init__(self, in_channels: int = 1, out_features: int = 10, depth: int = 4, width: int = 16,
                 stages: int = 2, norm: str = "batch", residual: bool = True, init: str = "he",
                 checkpointing: bool = False) -> None:
        super().__init__()
        for key, value in (("in_channels", in_channels), ("out_features", out_features), ("depth", depth),
                           ("width", width), ("stages", stages)):
            check_int(key, value)
        check_choice("norm", norm, NORMS)
        check_choice("init", init, INITS)
        self.checkpointing = checkpointing
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=norm == "none"),
                                  _norm2d(norm, width), nn.ReLU())
        per_stage = [depth // stages + (1 if i < depth % stages else 0) for i in range(stages)]
        blocks, channels = [], width
        for s, n in enumerate(per_stage):
            out = width * 2**s
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(channels, out, stride, norm, residual))
                channels = out
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, out_features)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_weight(m.weight, init, "relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.pool(x).flatten(1))
