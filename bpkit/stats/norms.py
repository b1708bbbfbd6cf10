"""Per-tensor and total norms of many tensors in a fixed number of kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def foreach_norms(tensors: Sequence[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Norms of every tensor, stacked into one 1-D float32 tensor on the tensors' device.

    Uses ``torch._foreach_norm`` (one fused launch per device and dtype). Never reads to the host.

    Example::

        >>> import torch
        >>> foreach_norms([torch.ones(4), torch.zeros(2)])
        tensor([2., 0.])
    """
    if len(tensors) == 0:
        return torch.zeros(0)
    norms = torch._foreach_norm(list(tensors), float(norm_type))
    device = tensors[0].device
    return torch.stack([n.to(device=device, dtype=torch.float32) for n in norms])


def total_norm(per_tensor: torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all tensors together, from their per-tensor norms (as ``clip_grad_norm_`` does)."""
    if per_tensor.numel() == 0:
        return per_tensor.new_zeros(())
    if norm_type == float("inf"):
        return per_tensor.max()
    return torch.linalg.vector_norm(per_tensor, float(norm_type))
