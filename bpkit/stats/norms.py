"""Per-tensor and total norms of many tensors in a fixed number of kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bpkit.stats.sharded import ShardReduce, locals_of


def _stack(values: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One float32 ``(N,)`` tensor: a single ``stack`` when the values share a dtype and a device."""
    first = values[0].dtype
    if all(v.dtype == first for v in values):
        try:
            return torch.stack(list(values)).to(torch.float32)
        except RuntimeError:  # values on several devices (model parallel)
            pass
    return torch.stack([v.to(device=device, dtype=torch.float32) for v in values])


def foreach_norms(tensors: Sequence[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Norms of every tensor, stacked into one 1-D float32 tensor on the tensors' device.

    Uses ``torch._foreach_norm`` (one fused launch per device and dtype). Never reads to the host.
    Sharded tensors (FSDP2 DTensors) give the norms of the full tensors (local shards plus one
    ``all_reduce``); sparse tensors the norms of their values.

    Example::

        >>> import torch
        >>> foreach_norms([torch.ones(4), torch.zeros(2)])
        tensor([2., 0.])
    """
    if len(tensors) == 0:
        return torch.zeros(0)
    reduce = ShardReduce.of(tensors)
    pieces = locals_of(tensors)
    if norm_type == float("inf"):  # an empty piece (a rank's empty shard) has no inf-norm: its max is 0
        pieces = [t if t.numel() else t.new_zeros(1) for t in pieces]
    norms = _stack(torch._foreach_norm(pieces, float(norm_type)), pieces[0].device)
    return norms if reduce is None else reduce.norms(norms, float(norm_type))


_PER_TENSOR_MIN = 1 << 16  # on a CPU, more elements than this are reduced tensor by tensor (one read each)


def foreach_max_abs(tensors: Sequence[torch.Tensor], scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``max |x|`` of every tensor as one 1-D float32 tensor; NaN when a tensor holds a NaN.

    ``_foreach_max(_foreach_abs(...))``: two launches. (``_foreach_norm(tensors, inf)`` gives the same
    numbers but is about 10x slower than an L2 norm on CPU.) On a CPU, above 64k elements in all, one
    ``aminmax`` per tensor instead: one read of each tensor (half the time of the copy, ``abs`` and ``max``).
    ``scratch``: a flat float32 buffer of the tensors' total size to take the absolute values in (three
    launches, no allocation: on a CPU a fresh model-sized buffer costs its page faults, twice the work
    itself); ignored when it does not fit.

    Example::

        >>> import torch
        >>> foreach_max_abs([torch.tensor([1.0, -3.0]), torch.tensor([float("nan")])])
        tensor([3., nan])
    """
    if len(tensors) == 0:
        return torch.zeros(0)
    reduce = ShardReduce.of(tensors)
    pieces = locals_of(tensors)
    # an empty piece (a rank's empty shard, a sparse tensor without values) has no max: use a zero
    pieces = [t if t.numel() else t.new_zeros(1) for t in pieces]
    if (pieces[0].device.type == "cpu" and sum(t.numel() for t in pieces) > _PER_TENSOR_MIN
            and all(t.device.type == "cpu" and t.layout == torch.strided for t in pieces)):
        # one read per tensor: on a CPU a kernel launch costs microseconds, a pass over a big tensor milliseconds
        low, high = zip(*(torch.aminmax(t) for t in pieces))
        out = torch.maximum(_stack(high, pieces[0].device), _stack(low, pieces[0].device).neg_())
        return out if reduce is None else reduce.max(out)
    sizes = [t.numel() for t in pieces]
    if (scratch is not None and scratch.numel() == sum(sizes) and scratch.dtype == torch.float32
            and all(t.dtype == torch.float32 and t.device == scratch.device and t.layout == torch.strided
                    for t in pieces)):
        views = list(scratch.split(sizes))
        torch._foreach_copy_(views, [t.reshape(-1) for t in pieces])
        torch._foreach_abs_(views)
        absolute = views
    else:
        absolute = torch._foreach_abs(pieces)
    out = _stack(torch._foreach_max(absolute), pieces[0].device)
    return out if reduce is None else reduce.max(out)


def total_norm(per_tensor: torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all tensors together, from their per-tensor norms (as ``clip_grad_norm_`` does)."""
    if per_tensor.numel() == 0:
        return per_tensor.new_zeros(())
    if norm_type == float("inf"):
        return per_tensor.max()
    return torch.linalg.vector_norm(per_tensor, float(norm_type))


def group_norms(per_tensor: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """L2 norms of groups of tensors (e.g. per module) from the tensors' L2 norms, in two kernels.

    Args:
        per_tensor: ``(N,)`` L2 norms.
        group_index: ``(N,)`` int64, the group of each tensor, in ``[0, num_groups)``.
        num_groups: number of groups.

    Example::

        >>> import torch
        >>> group_norms(torch.tensor([3.0, 4.0, 1.0]), torch.tensor([0, 0, 1]), 2)
        tensor([5., 1.])
    """
    sq = per_tensor.new_zeros(num_groups).index_add_(0, group_index, per_tensor * per_tensor)
    return sq.sqrt()


def group_max(per_tensor: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Largest value per group; a NaN or Inf in a member makes its group's value non-finite."""
    out = per_tensor.new_zeros(num_groups).scatter_reduce_(0, group_index, per_tensor, "amax", include_self=False)
    nan = per_tensor.new_zeros(num_groups).index_add_(0, group_index, per_tensor - per_tensor)
    return out + nan  # x - x is 0 for finite x and NaN for NaN/Inf: amax alone may drop a NaN
