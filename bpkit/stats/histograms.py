"""Fixed-range log10-magnitude histograms of many tensors in a fixed number of kernels."""

from __future__ import annotations

from collections.abc import Sequence
import math
from dataclasses import dataclass

import numpy as np
import torch

from bpkit.stats.sharded import ShardReduce, locals_of


@dataclass(frozen=True)
class LogHistogramSpec:
    """Bins over ``log10 |x|`` from ``low`` to ``high`` with ``bins_per_decade`` bins per decade.

    Each histogram row holds ``num_bins + 4`` counts, in this order: below ``10**low`` (but not zero),
    the ``num_bins`` bins, at or above ``10**high``, exact zeros, and NaN/Inf. A row sums to the
    tensor's ``numel``.

    Example::

        >>> spec = LogHistogramSpec(-12, 4, 2)
        >>> spec.num_bins, spec.row_size, spec.edges()[:3].tolist()
        (32, 36, [-inf, -12.0, -11.5])
    """

    low: float = -12.0
    high: float = 4.0
    bins_per_decade: int = 2

    @property
    def num_bins(self) -> int:
        return int(round((self.high - self.low) * self.bins_per_decade))

    @property
    def row_size(self) -> int:
        return self.num_bins + 4

    def boundaries(self) -> np.ndarray:
        """The ``num_bins + 1`` finite bin edges in log10 units."""
        return self.low + np.arange(self.num_bins + 1, dtype=np.float64) / self.bins_per_decade

    def edges(self) -> np.ndarray:
        """Edges of the ``num_bins + 2`` magnitude bins (under- and overflow included): ``-inf, low, ..., high, inf``."""
        return np.concatenate([[-np.inf], self.boundaries(), [np.inf]])

    @staticmethod
    def split(row: np.ndarray) -> tuple[np.ndarray, int, int]:
        """``row`` -> (magnitude counts incl. under/overflow, zeros, non-finite)."""
        return row[:-2], int(row[-2]), int(row[-1])


def _wide_range(dtype: torch.dtype, spec: LogHistogramSpec) -> tuple[int, int]:
    """First and last ``floor((log10|x| - low) * bins_per_decade)`` over the dtype's normal range: the
    binning needs no clamp (subnormals and zeros are lifted to the smallest normal first, because
    ``log10`` of a zero or a subnormal takes a slow path on CPUs)."""
    first = math.floor((math.log10(torch.finfo(dtype).smallest_normal) - spec.low) * spec.bins_per_decade) - 1
    last = math.floor((math.log10(torch.finfo(dtype).max) - spec.low) * spec.bins_per_decade) + 1
    return first, last


def _fold(spec: LogHistogramSpec, first: int, last: int, device: torch.device) -> torch.Tensor:
    """Column of the ``row_size`` layout for each wide code: 0 zero, 1.. finite bins, last NaN/Inf."""
    finite = np.clip(np.arange(first, last + 1) + 1, 0, spec.num_bins + 1)
    cols = np.concatenate([[spec.num_bins + 2], finite, [spec.num_bins + 3]])
    return torch.as_tensor(cols, dtype=torch.int64, device=device)


@torch.no_grad()
def log_histograms(tensors: Sequence[torch.Tensor], spec: LogHistogramSpec = LogHistogramSpec(),
                   segment_ids: torch.Tensor | None = None, num_segments: int | None = None) -> torch.Tensor:
    """Histogram of ``log10 |x|`` of every tensor (or every group of tensors), on the device.

    All tensors of one dtype are concatenated and binned with element-wise arithmetic (no search)
    into a wide code per element that covers the dtype's whole finite range, plus one code for
    NaN/Inf; one ``bincount`` counts every tensor at once and a small fold maps the wide codes to
    :class:`LogHistogramSpec`'s layout. Zeros are counted with one ``_foreach_norm(..., 0)``. The
    kernel count does not depend on the number of tensors. FSDP2 (DTensor) tensors are counted on
    their local shards and the counts summed across ranks (one ``all_reduce``); a sparse tensor's
    unstored elements count as zeros.

    Args:
        tensors: tensors on one device.
        spec: the bins.
        segment_ids: ``(N,)`` int64 row of each tensor (e.g. its module); default: one row per tensor.
        num_segments: number of rows (default ``N``).

    Returns:
        ``(num_segments, spec.row_size)`` int64 counts (see :class:`LogHistogramSpec` for the layout).

    Example::

        >>> import torch
        >>> h = log_histograms([torch.tensor([0.0, 1e-3, float("nan")])])
        >>> int(h.sum()), LogHistogramSpec.split(h[0].numpy())[1:]
        (3, (1, 1))
    """
    n = len(tensors)
    num_segments = n if num_segments is None else num_segments
    if n == 0:
        return torch.zeros(num_segments, spec.row_size, dtype=torch.int64)
    reduce = ShardReduce.of(tensors)
    # FSDP2 shards are counted where they live (replicas once) and summed below; a sparse tensor
    # contributes its values, its other elements are zeros
    numels = [t.numel() if t.layout == torch.sparse_coo else None for t in tensors]
    tensors = reduce.counted(tensors) if reduce is not None else locals_of(tensors)
    numels = [t.numel() if m is None else m for t, m in zip(tensors, numels)]
    device = tensors[0].device
    if segment_ids is None:
        segment_ids = torch.arange(n, device=device)
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if numels[i] == 0:
            continue
        groups.setdefault(torch.float64 if t.dtype == torch.float64 else torch.float32, []).append(i)
    out = torch.zeros(num_segments, spec.row_size, dtype=torch.int64, device=device)
    for dtype, idx in groups.items():
        members = [tensors[i] for i in idx]
        first, last = _wide_range(dtype, spec)
        width = last - first + 3  # zero code, finite codes, NaN/Inf code
        seg = segment_ids if len(idx) == n else segment_ids[torch.as_tensor(idx, device=device)]
        # exact zeros per tensor (NaN counts as non-zero): numel minus the L0 "norm", one fused launch
        stored = torch.as_tensor([t.numel() for t in members], device=device)
        implicit = torch.as_tensor([numels[i] - t.numel() for i, t in zip(idx, members)], device=device)
        nonzero = torch._foreach_norm(members, 0)
        explicit = stored - torch.stack(nonzero).to(torch.int64)
        flat = torch.cat([t.detach().reshape(-1) for t in members]).to(dtype)  # our own buffer: in place below
        flat = flat.abs_().clamp_min_(torch.finfo(dtype).smallest_normal)  # NaN stays NaN
        code = torch.log10(flat).sub_(spec.low).mul_(spec.bins_per_decade).floor_().sub_(first - 1)
        code.nan_to_num_(nan=width - 1, posinf=width - 1)
        # add segment * width to every element: a step at each tensor's start, then a running sum
        # (float arithmetic is exact: all values stay integers far below 2**24 x the element count)
        steps = torch.zeros_like(code)
        starts = torch.as_tensor(np.cumsum([0] + [t.numel() for t in members[:-1]]), device=device)
        jumps = (torch.diff(seg, prepend=seg.new_zeros(1)) * width).to(code.dtype)
        steps.index_add_(0, starts, jumps)
        code += steps.cumsum_(0)
        wide = torch.bincount(code.to(torch.int64), minlength=num_segments * width).view(num_segments, width)
        out.index_add_(1, _fold(spec, first, last, device), wide)
        # the zeros were counted as underflow (lifted to the smallest normal): move them to their column
        moved = torch.zeros(num_segments, dtype=torch.int64, device=device).index_add_(0, seg, explicit)
        out[:, 0] -= moved
        out[:, spec.num_bins + 2] += moved + torch.zeros_like(moved).index_add_(0, seg, implicit)
    return out if reduce is None else reduce.sum_rows(out)
