"""Update-to-weight ratios from an exact before/after difference of the weights.

On a step that logs, :func:`snapshot` copies all parameters into one flat buffer (one ``cat``)
just before ``optimizer.step()``; after the step, :func:`update_norms` takes the difference with
the live parameters (in place in the snapshot) and its per-tensor norms. The ratio
``||w_after - w_before|| / ||w_before||`` is exact for any optimizer (momentum, weight decay, a
skipped step, a scheduler), and costs a copy and a subtraction over the weights on logging steps only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bpkit.stats.norms import _stack
from bpkit.stats.sharded import ShardReduce, local


@torch.no_grad()
def snapshot(params: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """All parameters flattened into one float32 buffer (one kernel); for FSDP2 parameters, this rank's shards.

    ``out``: a buffer to reuse when it has the right size and device (on a CPU a fresh buffer of the
    model's size costs its page faults, several times the copy itself).

    Example::

        >>> import torch
        >>> snapshot([torch.ones(2, 2), torch.zeros(1)]).tolist()
        [1.0, 1.0, 1.0, 1.0, 0.0]
    """
    pieces = [local(p).detach().reshape(-1).float() for p in params]
    numel = sum(p.numel() for p in pieces)
    if out is not None and out.numel() == numel and out.dtype == torch.float32 and out.device == pieces[0].device:
        return torch.cat(pieces, out=out)
    return torch.cat(pieces)


@torch.no_grad()
def update_norms(params: Sequence[torch.Tensor], before: torch.Tensor) -> torch.Tensor:
    """``(N,)`` L2 norm of ``p - p_before`` for every parameter, ``before`` from :func:`snapshot`.

    The difference is taken in place in ``before`` (one fused subtraction, one fused norm): the
    snapshot is used up.

    Example::

        >>> import torch
        >>> w = [torch.zeros(2), torch.zeros(1)]
        >>> s = snapshot(w); w[0] += 3.0
        >>> update_norms(w, s)
        tensor([4.2426, 0.0000])
    """
    locals_ = [local(p).detach().reshape(-1) for p in params]
    pieces = list(before.split([t.numel() for t in locals_]))
    torch._foreach_sub_(pieces, locals_)
    norms = _stack(torch._foreach_norm(pieces, 2.0), before.device)
    reduce = ShardReduce.of(params)
    return norms if reduce is None else reduce.norms(norms)


def update_ratios(update: torch.Tensor, weight_norms: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``||update|| / ||w_before||`` (a zero weight gives ``update / eps``)."""
    return update / weight_norms.clamp_min(eps)
