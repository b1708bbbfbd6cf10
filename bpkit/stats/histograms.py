"""Fixed-range log10-magnitude histograms of many tensors in a fixed number of kernels."""

from __future__ import annotations

from collections.abc import Sequence
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from bpkit.stats.sampling import strided_sample
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
                   segment_ids: torch.Tensor | None = None, num_segments: int | None = None,
                   method: str = "auto", samples: int | None = None, phase: int = 0) -> torch.Tensor:
    """Histogram of ``log10 |x|`` of every tensor (or every group of tensors), on the device.

    Float32 (and float16/bfloat16, counted as float32) tensors are binned without a logarithm: the
    column of ``|x|`` is a table lookup on its top 16 bits (sign dropped: the exponent and 7 mantissa
    bits, 32768 cells) plus one comparison of the whole bit pattern against the one bin edge that may
    fall inside that cell. The tables are built once per spec from the reference binning itself (each
    edge found by bisection and checked 256 bit patterns either side), so both paths give identical
    counts, zeros, subnormals, NaN/Inf and values at the edges included. On a CPU each tensor is
    counted with one ``bincount`` of a 16-bit key (a few kernels per tensor, no model-sized code
    array); on other devices, and for small tensors, one buffer and one ``bincount`` for all.

    The reference path (float64 tensors, or ``method="reference"``): all tensors of one dtype are
    concatenated and binned with element-wise arithmetic (``log10``, no search) into a wide code per
    element that covers the dtype's whole finite range, plus one code for NaN/Inf; one ``bincount``
    counts every tensor at once and a small fold maps the wide codes to :class:`LogHistogramSpec`'s
    layout. Zeros are counted with one ``_foreach_norm(..., 0)``. Its kernel count does not depend on
    the number of tensors. FSDP2 (DTensor) tensors are counted on their local shards and the counts
    summed across ranks (one ``all_reduce``); a sparse tensor's unstored elements count as zeros.

    Args:
        tensors: tensors on one device.
        spec: the bins.
        segment_ids: ``(N,)`` int64 row of each tensor (e.g. its module); default: one row per tensor.
        num_segments: number of rows (default ``N``).
        method: ``"auto"`` (the float-bits path for float32/16/bf16 tensors, the reference for float64),
            ``"bits"`` (the same) or ``"reference"`` (the log10 path for all). Both give identical counts.
        samples: count at most about this many elements of each tensor (:func:`bpkit.stats.sampling.strided_sample`:
            every ``stride``-th element, a prime stride) and scale its counts to the tensor's size: estimated counts
            (rounded), a few kernels whatever the model's size. ``None``: every element, exact. Sharded and sparse
            tensors are always counted exactly.
        phase: the sample's offset (e.g. the number of histograms taken so far): over ``stride`` consecutive
            phases every element is counted once.

    Returns:
        ``(num_segments, spec.row_size)`` int64 counts (see :class:`LogHistogramSpec` for the layout).

    Example::

        >>> import torch
        >>> h = log_histograms([torch.tensor([0.0, 1e-3, float("nan")])])
        >>> int(h.sum()), LogHistogramSpec.split(h[0].numpy())[1:]
        (3, (1, 1))
    """
    if method not in ("auto", "bits", "reference"):
        from bpkit.errors import BpkitConfigError

        raise BpkitConfigError("method", method, "'auto', 'bits' or 'reference'")
    if samples is not None:
        from bpkit.errors import check_int

        check_int("samples", samples, 1)
        if ShardReduce.of(tensors) is None and all(t.layout == torch.strided for t in tensors):
            return _sampled_histograms(list(tensors), spec, segment_ids, num_segments, method != "reference",
                                       int(samples), int(phase))
    return _log_histograms(tensors, spec, segment_ids, num_segments, method != "reference")


def _sampled_histograms(tensors: list[torch.Tensor], spec: LogHistogramSpec, segment_ids: torch.Tensor | None,
                        num_segments: int | None, fast: bool, samples: int, phase: int) -> torch.Tensor:
    """:func:`log_histograms` over a strided sample of each tensor, each row scaled to its tensor's size."""
    n = len(tensors)
    num_segments = n if num_segments is None else num_segments
    if n == 0:
        return torch.zeros(num_segments, spec.row_size, dtype=torch.int64)
    device = tensors[0].device
    picked = [strided_sample(t, samples, phase) for t in tensors]
    scale = [t.numel() / max(1, p.numel()) for t, p in zip(tensors, picked)]
    counts = _log_histograms(picked, spec, None, None, fast, concat=True)  # one row per tensor
    if any(f != 1.0 for f in scale):
        factor = torch.as_tensor(scale, dtype=torch.float64, device=device)
        counts = counts.to(torch.float64).mul_(factor[:, None]).round_().to(torch.int64)
    if segment_ids is None and num_segments == n:
        return counts
    seg = torch.arange(n, device=device) if segment_ids is None else segment_ids
    return torch.zeros(num_segments, spec.row_size, dtype=torch.int64, device=device).index_add_(0, seg, counts)


def _log_histograms(tensors: Sequence[torch.Tensor], spec: LogHistogramSpec, segment_ids: torch.Tensor | None,
                    num_segments: int | None, fast: bool, concat: bool = False) -> torch.Tensor:
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
        tables = _bit_tables(spec, device) if fast and dtype == torch.float32 else None
        if tables is not None:
            seg = segment_ids if len(idx) == n else segment_ids[torch.as_tensor(idx, device=device)]
            _count_bits(members, [numels[i] for i in idx], seg, num_segments, spec, tables, out, concat)
            continue
        first, last = _wide_range(dtype, spec)
        width = last - first + 3  # zero code, finite codes, NaN/Inf code
        seg = segment_ids if len(idx) == n else segment_ids[torch.as_tensor(idx, device=device)]
        # exact zeros per tensor (NaN counts as non-zero): numel minus the L0 "norm", one fused launch
        stored = torch.as_tensor([t.numel() for t in members], device=device)
        implicit = torch.as_tensor([numels[i] - t.numel() for i, t in zip(idx, members)], device=device)
        nonzero = torch._foreach_norm(members, 0, dtype=torch.float64)  # exact counts (float16 overflows at 65504)
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


# ----------------------------------------------------------------- the float-bits path

_CELL_SHIFT = 16  # a cell: the top 16 bits of |x| as float32 (8 exponent bits, 7 mantissa bits)
_NUM_CELLS = 1 << (31 - _CELL_SHIFT)


def reference_columns(values: torch.Tensor, spec: LogHistogramSpec) -> torch.Tensor:
    """The column of :class:`LogHistogramSpec`'s row layout of each float32 value, by the reference (log10)
    binning of :func:`log_histograms`: ``0`` underflow, ``1..num_bins`` the bins, ``num_bins + 1`` overflow,
    ``num_bins + 2`` zero, ``num_bins + 3`` NaN/Inf (int64)."""
    dtype = torch.float32
    first, last = _wide_range(dtype, spec)
    width = last - first + 3
    flat = values.detach().reshape(-1).to(dtype).abs().clamp_min_(torch.finfo(dtype).smallest_normal)
    code = torch.log10(flat).sub_(spec.low).mul_(spec.bins_per_decade).floor_().sub_(first - 1)
    code.nan_to_num_(nan=width - 1, posinf=width - 1)
    cols = _fold(spec, first, last, values.device)[code.to(torch.int64)]
    return cols.masked_fill_(values.reshape(-1) == 0, spec.num_bins + 2)


_TABLES: dict[tuple[LogHistogramSpec, str], tuple[torch.Tensor, torch.Tensor] | None] = {}


def _bit_tables(spec: LogHistogramSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per cell: the column of its values below the edge it holds, and the bit pattern just below that edge
    (int32; 2**31 - 1 where the cell holds no edge). ``None`` when a cell holds two edges (``bins_per_decade``
    above ~290) or the reference is not a step around an edge: then the reference path counts."""
    key = (spec, str(device))
    if key not in _TABLES:
        if (spec, "cpu") not in _TABLES:
            _TABLES[(spec, "cpu")] = _build_tables(spec)
        host = _TABLES[(spec, "cpu")]
        _TABLES[key] = None if host is None else (host[0].to(device), host[1].to(device))
    return _TABLES[key]


def _ordered_columns(values: torch.Tensor, spec: LogHistogramSpec) -> torch.Tensor:
    """:func:`reference_columns` renumbered in the order of ``|x|``: zero 0, underflow 1, the bins, overflow, NaN/Inf
    (``_ORDER`` maps them back)."""
    cols = reference_columns(values, spec)
    return torch.where(cols == spec.num_bins + 2, 0, torch.where(cols == spec.num_bins + 3, cols, cols + 1))


def _order(spec: LogHistogramSpec) -> torch.Tensor:
    """For each column of the row layout, its ordered column (see :func:`_ordered_columns`)."""
    return torch.as_tensor([c + 1 for c in range(spec.num_bins + 2)] + [0, spec.num_bins + 3])


def _build_tables(spec: LogHistogramSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    cells = torch.arange(_NUM_CELLS, dtype=torch.int64) << _CELL_SHIFT
    lo = _ordered_columns(cells.to(torch.int32).view(torch.float32), spec)
    hi = _ordered_columns((cells + (1 << _CELL_SHIFT) - 1).to(torch.int32).view(torch.float32), spec)
    lut = lo.clone()
    thr = torch.full((_NUM_CELLS,), 2 ** 31 - 1, dtype=torch.int64)
    edge = torch.nonzero(lo != hi).flatten()  # the cells that hold an edge
    if bool((hi[edge] - lo[edge] != 1).any()):
        return None  # two edges in one cell: the bits path cannot reproduce it
    # bisection of every edge cell at once: the first bit pattern in the cell binned like its last value
    left, right = edge << _CELL_SHIFT, ((edge + 1) << _CELL_SHIFT) - 1
    for _ in range(_CELL_SHIFT):
        mid = (left + right) // 2
        up = _ordered_columns(mid.to(torch.int32).view(torch.float32), spec) == hi[edge]
        right, left = torch.where(up, mid, right), torch.where(up, left, mid + 1)
    # a step, not a wobble: 256 patterns either side of each edge binned by the reference
    window = right[:, None] + torch.arange(-256, 256)
    window = torch.clamp(window, (edge << _CELL_SHIFT)[:, None], ((edge + 1) << _CELL_SHIFT)[:, None] - 1)
    cols = _ordered_columns(window.to(torch.int32).view(torch.float32), spec).view(window.shape)
    if not bool((cols == torch.where(window >= right[:, None], hi[edge, None], lo[edge, None])).all()):
        return None
    thr[edge] = right - 1  # compared with '>': the sentinel 2**31 - 1 is above every pattern, NaN 0x7FFFFFFF too
    col_dtype = torch.uint8 if spec.row_size <= 255 else torch.int32
    return lut.to(col_dtype), thr.to(torch.int32)


_CHUNK = 1 << 20  # elements per block of the CPU path (bounds its temporary buffers)
_CELL_PATH_MIN = 1 << 16  # on a CPU, more elements than this take the per-cell counting


def _count_cells(members: list[torch.Tensor], lut: torch.Tensor, thr: torch.Tensor, rows: int) -> torch.Tensor:
    """``(len(members), rows)`` ordered counts on a CPU: per tensor, one ``bincount`` of a 16-bit key, the cell and
    whether the value is above the edge its cell holds; the 65536 counts go to their columns through the table."""
    lut64 = lut.to(torch.int64)
    # key -> column: the upper half is "above its cell's edge" (always 0 in a cell without one: clamped)
    to_column = torch.cat([lut64, (lut64 + 1).clamp_max_(rows - 1)])
    counts = torch.zeros(len(members), rows, dtype=torch.int64)
    for i, t in enumerate(members):
        flat = t.detach().reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            piece = flat[start:start + _CHUNK]
            if piece.dtype != torch.float32:
                piece = piece.to(torch.float32)
            bits = torch.bitwise_and(piece.view(torch.int32), 0x7FFFFFFF)  # |x|
            cell = torch.bitwise_right_shift(bits, _CELL_SHIFT)
            cell.add_(torch.gt(bits, thr.index_select(0, cell)), alpha=_NUM_CELLS)
            counts[i].index_add_(0, to_column, torch.bincount(cell, minlength=2 * _NUM_CELLS))
    return counts


@lru_cache(maxsize=64)
def _row_offsets(sizes: tuple[int, ...], rows: int, device: torch.device) -> torch.Tensor:
    """``i * rows`` for each element of the ``i``-th tensor (int32): the same few layouts come back step after step."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device, dtype=torch.int32) * rows,
                                   torch.as_tensor(sizes, device=device))


def _count_bits(members: list[torch.Tensor], numels: list[int], seg: torch.Tensor, num_segments: int,
                spec: LogHistogramSpec, tables: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor,
                concat: bool = False) -> None:
    """Add the rows of ``members`` (float32/16/bf16, local pieces) to ``out`` by the float-bits tables (``concat``:
    always through one buffer, e.g. for samples that are small whatever their number)."""
    lut, thr = tables
    device = out.device
    sizes = [t.numel() for t in members]
    rows = spec.row_size
    if device.type == "cpu" and not concat and sum(sizes) > _CELL_PATH_MIN:
        counts = _count_cells(members, lut, thr, rows)
    else:
        flat = torch.cat([t.detach().reshape(-1) for t in members]).to(torch.float32)  # our own buffer
        bits = flat.view(torch.int32).bitwise_and_(0x7FFFFFFF)  # |x|: positive bit patterns order as the values
        cell = torch.bitwise_right_shift(bits, _CELL_SHIFT)
        col = lut.index_select(0, cell)
        above = torch.gt(bits, thr.index_select(0, cell))
        col += above.view(torch.uint8) if col.dtype == torch.uint8 else above
        key = _row_offsets(tuple(sizes), rows, device).add(col)
        counts = torch.bincount(key, minlength=len(members) * rows).view(len(members), rows)
    out.index_add_(0, seg, counts.to(torch.int64).index_select(1, _order(spec).to(device)))
    implicit = [m - s for m, s in zip(numels, sizes)]  # a sparse tensor's unstored elements: zeros
    if any(implicit):
        out[:, spec.num_bins + 2] += torch.zeros(num_segments, dtype=torch.int64, device=device).index_add_(
            0, seg, torch.as_tensor(implicit, device=device))
