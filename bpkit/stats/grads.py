"""Every gradient statistic GradientMonitor needs on a step, in a handful of fused kernels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bpkit.stats.norms import _stack, foreach_max_abs, group_max, group_norms, total_norm
from bpkit.stats.sharded import ShardReduce, locals_of


@dataclass
class GradStats:
    """Statistics of a list of gradients (and their parameters), all on the device.

    Attributes:
        norms: ``(N,)`` L2 norm of each gradient (float32, accumulated in float32 whatever the grad dtype).
        total: ``()`` L2 norm of all gradients together (``clip_grad_norm_``'s total).
        weight_norms: ``(N,)`` L2 norm of each parameter, or ``None`` when not asked for.
        max_abs: ``(N,)`` ``max |g|`` of each gradient, or ``None`` when not asked for.
    """

    norms: torch.Tensor
    total: torch.Tensor
    weight_norms: torch.Tensor | None = None
    max_abs: torch.Tensor | None = None

    @property
    def nonfinite(self) -> torch.Tensor:
        """``(N,)`` bool: the gradient's L2 norm is NaN or Inf.

        That is the gradient holds a NaN or an Inf, or its float32 sum of squares overflows
        (``|g|`` around 1e19): the criterion of ``clip_grad_norm_(error_if_nonfinite=True)``.
        """
        return torch.isnan(self.norms * 0)  # x * 0 is NaN exactly for NaN and +-Inf: two kernels

    def grouped(self, group_index: torch.Tensor, num_groups: int) -> "GradStats":
        """The same statistics per group of tensors (e.g. per module); ``total`` is unchanged."""
        w = None if self.weight_norms is None else group_norms(self.weight_norms, group_index, num_groups)
        m = None if self.max_abs is None else group_max(self.max_abs, group_index, num_groups)
        return GradStats(group_norms(self.norms, group_index, num_groups), self.total, w, m)


@torch.no_grad()
def grad_stats(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor] | None = None,
               max_abs: bool = False, out: tuple[torch.Tensor, torch.Tensor] | None = None,
               scratch: torch.Tensor | None = None) -> GradStats:
    """Per-tensor L2 norms of ``grads`` and their total; optionally the weight norms of ``params``
    and the per-tensor ``max |g|``.

    One ``torch._foreach_norm`` launch (plus one for the weights, two for max-abs) and one stack,
    whatever the number of tensors. Nothing is read back to the host. FSDP2 (DTensor) gradients and
    parameters give the statistics of the full tensors (local shards plus one ``all_reduce``); sparse
    gradients those of their values.

    Args:
        grads: gradients (any shapes and floating dtypes).
        params: the parameters of those gradients, same order; ``None`` skips the weight norms.
        max_abs: also compute ``max |g|`` per tensor.
        out: float32 ``(N,)`` and ``()`` tensors (e.g. views into a :class:`bpkit.stats.step_rows.StepRows`
            buffer) that receive the norms and the total, which are then these tensors.
        scratch: a flat float32 buffer of the gradients' total size for ``max_abs`` (see
            :func:`bpkit.stats.norms.foreach_max_abs`).

    Example::

        >>> import torch
        >>> s = grad_stats([torch.tensor([3.0, -4.0]), torch.tensor([1.0])], [torch.ones(2), torch.ones(1)], True)
        >>> s.norms, s.max_abs, s.total
        (tensor([5., 1.]), tensor([4., 1.]), tensor(5.0990))
    """
    grads = list(grads)
    n = len(grads)
    if n == 0:
        z = torch.zeros(0)
        return GradStats(z, z.new_zeros(()), None if params is None else z, z if max_abs else None)
    reduce = ShardReduce.of(grads)
    pieces = locals_of(grads)  # FSDP2 shards and sparse values: statistics of the local pieces, reduced
    device = pieces[0].device
    values = list(torch._foreach_norm(pieces, 2.0, dtype=torch.float32))
    if out is not None and reduce is None and all(v.device == out[0].device for v in values):
        # written straight into the caller's buffer: no intermediate tensors
        norms = torch.stack(values, out=out[0])
        total = torch.linalg.vector_norm(norms, 2.0, out=out[1])
        weight_norms = None if params is None else _stack(
            torch._foreach_norm(locals_of(params), 2.0, dtype=torch.float32), device)
        return GradStats(norms, total, weight_norms, foreach_max_abs(grads, scratch) if max_abs else None)
    if params is not None:
        values += list(torch._foreach_norm(locals_of(params), 2.0, dtype=torch.float32))
    packed = _stack(values, device)
    if reduce is not None:  # one all_reduce of every sum of squares (gradients and weights together)
        twice = reduce if params is None else ShardReduce(reduce.mesh, reduce.counts * 2)
        packed = twice.sum(packed.square()).sqrt()
    norms = packed[:n]
    weight_norms = packed[n:] if params is not None else None
    total = total_norm(norms, 2.0)
    if out is not None:
        norms, total = out[0].copy_(norms), out[1].copy_(total)
    return GradStats(norms, total, weight_norms, foreach_max_abs(grads, scratch) if max_abs else None)
