"""Statistics of sharded (FSDP2 / DTensor) and sparse tensors: local pieces plus one reduction.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter and gradient is a ``DTensor``
whose local shard holds a slice of the rows. bpkit never gathers them: each rank computes its
statistics on its local shards (sums of squares, histogram counts, maxima) and one ``all_reduce``
per mesh dimension combines them, exactly as ``clip_grad_norm_`` does for DTensors. A replicated
placement is counted once (by the rank at coordinate 0 of that mesh dimension). A sparse COO
gradient (``nn.Embedding(sparse=True)``) is seen through its coalesced values.

Pure torch: never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # pragma: no cover - older torch or a build without distributed
    DTensor = Partial = Replicate = None  # type: ignore[assignment,misc]


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose elements this rank holds: a DTensor's local shard (a view), a sparse tensor's
    values (of its coalesced form), or the tensor itself."""
    if is_dtensor(t):
        t = t.to_local()
    if t.layout == torch.sparse_coo:
        t = (t if t.is_coalesced() else t.coalesce())._values()
    return t


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _is_dtensor_fast(t: torch.Tensor) -> bool:
    return type(t) not in _PLAIN and DTensor is not None and isinstance(t, DTensor)


def _plain(tensors: Sequence[torch.Tensor]) -> bool:
    # checked on every step for every tensor: an exact type test first (isinstance on a tensor subclass is slow)
    for t in tensors:
        if t.is_sparse or _is_dtensor_fast(t):
            return False
    return True


def locals_of(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if _plain(tensors):
        return list(tensors)
    return [local(t) for t in tensors]


def coalesce_grads_(params: Sequence[torch.Tensor]) -> None:
    """Coalesce sparse ``.grad`` in place, so that ``local(p.grad)`` is a view that in-place clipping changes."""
    for p in params:
        g = p.grad
        if g is not None and g.layout == torch.sparse_coo and not g.is_coalesced():
            p.grad = g.coalesce()


class ShardReduce:
    """Combine per-tensor statistics of local shards into the statistics of the full tensors.

    Args:
        mesh (DeviceMesh): the device mesh of the DTensors.
        counts: per tensor, whether this rank's local piece is counted (False for the copies of a
            replicated placement held by ranks other than coordinate 0).

    Example (one process: nothing to combine)::

        >>> import torch
        >>> ShardReduce.of([torch.ones(2)]) is None
        True
    """

    def __init__(self, mesh, counts: list[bool]) -> None:
        self.mesh = mesh
        self.counts = counts
        self._groups = [mesh.get_group(d) for d in range(mesh.ndim)]
        self._weights: torch.Tensor | None = None

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> "ShardReduce | None":
        """``None`` when no tensor is a DTensor (nothing to reduce)."""
        if DTensor is None:
            return None
        sharded = [t for t in tensors if _is_dtensor_fast(t)]
        if not sharded:
            return None
        mesh = sharded[0].device_mesh
        coord = mesh.get_coordinate() or [0] * mesh.ndim
        counts = []
        for t in tensors:
            if not is_dtensor(t):  # a plain tensor is the same on every rank
                counts.append(all(c == 0 for c in coord))
                continue
            if t.device_mesh != mesh:
                raise ValueError("bpkit: tensors on several device meshes cannot be reduced together")
            if any(isinstance(pl, Partial) for pl in t.placements):
                raise ValueError("bpkit: a DTensor with a Partial placement (pending reduction) cannot be measured")
            counts.append(all(c == 0 for c, pl in zip(coord, t.placements) if isinstance(pl, Replicate)))
        return cls(mesh, counts)

    def weights(self, device: torch.device) -> torch.Tensor:
        if self._weights is None or self._weights.device != device:
            self._weights = torch.as_tensor(self.counts, dtype=torch.float32, device=device)
        return self._weights

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        import torch.distributed as dist

        for group in self._groups:
            dist.all_reduce(t, op=op, group=group)
        return t

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``(N, ...)`` per-tensor partial sums -> their sum over all shards (one collective per mesh dim)."""
        import torch.distributed as dist

        w = self.weights(values.device).reshape(-1, *([1] * (values.dim() - 1)))
        out = (values * w.to(values.dtype)).contiguous()
        return self._all_reduce(out, dist.ReduceOp.SUM)

    def sum_rows(self, counts: torch.Tensor) -> torch.Tensor:
        """Counts already restricted to the counted pieces (see :meth:`counted`) -> summed over ranks."""
        import torch.distributed as dist

        return self._all_reduce(counts.contiguous(), dist.ReduceOp.SUM)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """``(N,)`` non-negative per-tensor maxima -> the maxima over all shards."""
        import torch.distributed as dist

        out = torch.where(self.weights(values.device) > 0, values, torch.zeros_like(values)).contiguous()
        return self._all_reduce(out, dist.ReduceOp.MAX)

    def any(self, flag: torch.Tensor) -> torch.Tensor:
        """A 0-d bool that is true on every rank when it is true on any."""
        import torch.distributed as dist

        return self._all_reduce(flag.to(torch.float32).reshape(1).contiguous(), dist.ReduceOp.MAX)[0] > 0

    def norms(self, local_norms: torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
        """Per-tensor norms of the full tensors from the norms of the local pieces."""
        if norm_type == float("inf"):
            return self.max(local_norms)
        if norm_type == 2.0:
            return self.sum(local_norms.square()).sqrt()
        return self.sum(local_norms.pow(norm_type)).pow(1.0 / norm_type)

    def counted(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The local pieces, with the uncounted ones (replicas) replaced by empty tensors."""
        return [local(t) if c else local(t).reshape(-1)[:0] for t, c in zip(tensors, self.counts)]
