"""Statistics of module outputs (activations) and of their gradients, accumulated on the device.

Pure torch: never imports Lightning. Every :meth:`ActivationStats.update` launches the few reductions
of one tensor and keeps their small results on the device (element and unit counts are known from
shapes, so they stay Python integers). At log time :meth:`ActivationStats.packed` combines all of them
into ONE flat float64 tensor (ready for a cross-rank sum and a single host copy) and
:meth:`ActivationStats.summarize` turns the copied numbers into per-module statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bpkit.errors import BpkitConfigError, check_float, check_int
from bpkit.stats.sampling import sample_layout, strided_sample

_HEAD = 8  # calls, count, units, sum, sum of squares, zeros, dead units, saturated elements
_STAGE_MAX = 1 << 16
"""CPU tensors of at most this many elements are copied and reduced together with the others of their shape (on
a CPU the cost of a small tensor's dozen kernels is the per-kernel dispatch, not the data)."""
_STAGE_BUDGET = 1 << 20  # staged elements before they are reduced early (about 13 bytes each of work buffers)

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Softsign, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.LogSigmoid,
    nn.Tanhshrink, nn.Threshold, nn.GLU,
)
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.RNNBase,
)
_CHANNEL_FIRST: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


def is_auto_module(module: nn.Module) -> bool:
    """Whether ``modules="auto"`` watches this module: activations, Linear, Conv and recurrent layers."""
    return isinstance(module, ACTIVATION_TYPES + LAYER_TYPES)


def saturation_kind(module: nn.Module) -> str | None:
    """``"tanh"`` or ``"sigmoid"`` for the bounded activations whose saturation is measured, else ``None``."""
    if isinstance(module, (nn.Tanh, nn.Hardtanh)):
        return "tanh"
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return "sigmoid"
    return None


def unit_dim(module: nn.Module, tensor: torch.Tensor) -> int:
    """The dimension that indexes units: channels (dim 1) for convolutions and tensors of 4+ dims,
    features (last dim) otherwise, e.g. Linear/RNN outputs ``(B, F)`` or ``(B, T, F)``."""
    if isinstance(module, _CHANNEL_FIRST) or tensor.dim() >= 4:
        return 1 if tensor.dim() > 1 else 0
    return tensor.dim() - 1


def output_tensor(output: object) -> torch.Tensor | None:
    """The tensor to watch in a module's output: the tensor itself, the first tensor of a tuple/list
    (RNN/LSTM/GRU return ``(output, hidden)``), the first floating tensor value of a dict, or the data of
    a ``PackedSequence``. ``None`` when there is no floating-point tensor."""
    if isinstance(output, nn.utils.rnn.PackedSequence):
        output = output.data
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, Sequence) and not isinstance(output, str):
        for item in output:
            found = output_tensor(item) if not isinstance(item, (Sequence, Mapping)) else None
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class ModuleStats:
    """Statistics of one module's output (or output gradient) over one log interval.

    ``std`` is the population standard deviation over all elements; ``dead_frac`` is the fraction of
    units (features/channels) that were exactly zero for every sample and position of a batch,
    averaged over the batches seen; ``saturated_frac`` is ``None`` for modules that do not saturate.
    ``hist`` is ``(counts, edges)``; for gradients the histogram is of ``log10|g|`` over non-zero ``g``.
    """

    calls: int
    count: int
    mean: float
    std: float
    zero_frac: float
    dead_frac: float
    saturated_frac: float | None
    hist: tuple[np.ndarray, np.ndarray] | None


class ActivationStats:
    """Accumulate per-module statistics of many tensors on their device, without host reads.

    Each :meth:`update` launches only the reductions of the big tensor (mean, sum of squared deviations, a
    per-unit non-zero count, the saturation count and the histogram) and keeps their small results; the
    arithmetic that combines them is done once for all modules and calls in :meth:`packed`, with a fixed number
    of kernels. On CPU a small tensor (up to 65536 elements), whose dozen kernels cost their dispatch more than
    their data, is copied instead, and :meth:`packed` reduces all the copies of one shape and kind with one set of
    kernels; larger ones are reduced at once. Both give the numbers of the plain reductions (a float32 sum and a
    float32 sum of squared deviations from the mean, the non-zero test of ``count_nonzero``, a float32 bin index).

    With ``histogram_samples=n`` the histogram of a tensor of more than ``n`` elements is taken over a strided
    sample of about ``n`` of them (:func:`bpkit.stats.sampling.strided_sample`, the offset moving by one at
    each call of the module) and its counts are scaled by ``numel / sample size``: estimates, which add up to
    the tensor's size (non-finite and, for ``log_magnitude``, zero elements of the sample left out). Mean, std,
    zeros, dead units and saturation stay exact. A tensor of at most ``n`` elements is counted exactly.

    Args:
        names: the module names, one row each, in a fixed order (the same on every rank).
        saturation: per name, ``"tanh"``, ``"sigmoid"`` or ``None`` (no saturation measured).
        bins: histogram bins (0 disables histograms).
        hist_range: ``(low, high)`` of the linear histogram of unbounded outputs; tanh outputs use
            ``(-1, 1)`` and sigmoid outputs ``(0, 1)``. Values outside are counted in the edge bins.
        saturation_threshold: tanh is saturated where ``|y| > t``, sigmoid where ``y > t`` or ``y < 1 - t``.
        log_magnitude: histogram ``log10|y|`` of the non-zero elements instead of ``y`` (for gradients).
        log_range: ``(low, high)`` in decades of the log-magnitude histogram.
        histogram_samples: histogram at most about this many elements of each tensor (a strided sample, counts
            scaled to the tensor: estimates); ``None`` counts every element.

    Raises:
        BpkitConfigError: bins < 0, a range with ``low >= high``, a threshold outside (0.5, 1) or
            ``histogram_samples`` < 1.

    Example::

        >>> import torch
        >>> s = ActivationStats(["act"], {"act": None}, bins=4, hist_range=(0.0, 2.0))
        >>> s.update("act", torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
        >>> st = s.summarize(s.packed().numpy())["act"]
        >>> st.mean, st.zero_frac, st.dead_frac, st.hist[0].tolist()
        (0.75, 0.5, 0.5, [2.0, 0.0, 1.0, 1.0])
        >>> big = ActivationStats(["act"], bins=4, hist_range=(0.0, 1.0), histogram_samples=1000)
        >>> big.update("act", torch.rand(100, 100))
        >>> counts = big.summarize(big.packed().numpy())["act"].hist[0]
        >>> round(float(counts.sum())), bool(abs(counts / 2500 - 1).max() < 0.1)
        (10000, True)
    """

    def __init__(self, names: Sequence[str], saturation: Mapping[str, str | None] | None = None, bins: int = 64,
                 hist_range: tuple[float, float] = (-4.0, 4.0), saturation_threshold: float = 0.99,
                 log_magnitude: bool = False, log_range: tuple[float, float] = (-12.0, 2.0),
                 histogram_samples: int | None = None) -> None:
        self.bins = check_int("bins", bins, minimum=0)
        self.histogram_samples = None if histogram_samples is None else check_int("histogram_samples",
                                                                                   histogram_samples, minimum=1)
        self.hist_range = _check_range("hist_range", hist_range)
        self.log_range = _check_range("log_range", log_range)
        self.saturation_threshold = check_float("saturation_threshold", saturation_threshold, 0.5, 1.0,
                                                low_inclusive=False, high_inclusive=False)
        self.log_magnitude = log_magnitude
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.saturation = {n: (saturation or {}).get(n) for n in self.names}
        for name, kind in self.saturation.items():
            if kind not in (None, "tanh", "sigmoid"):
                raise BpkitConfigError(f"saturation[{name}]", kind, "one of tanh, sigmoid or None")
        self._layout: list[tuple[int, int]] = []  # (row, units) of each call in the last packed(), kept by reset()
        self._phase = [0] * len(self.names)  # per module: sampled histograms so far (the sample's offset)
        self._edges: dict[str, np.ndarray] = {}
        self._scratch: dict[tuple, tuple[torch.Tensor, ...]] = {}  # per staged shape: work buffers
        self._scratch_seen: set[tuple] = set()
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated (start a new log interval)."""
        # per call, in the order the results below are kept: (call number, row, numel, units, scale of the first
        # moment, scale of the squared deviations, histogram scale); the calls reduced one by one come first
        self._meta: list[tuple[int, int, int, int, float, float, float]] = []
        self._first: list[torch.Tensor] = []  # per call: 0-dim sum (CPU) or mean (accelerators)
        self._m2: list[torch.Tensor] = []  # per call: 0-dim sum of squared deviations (CPU) or variance
        self._nonzero: list[torch.Tensor] = []  # per call: (units,) non-zero count of each unit
        self._saturated: list[tuple[int, torch.Tensor]] = []  # (call index in _meta, 0-dim count)
        self._hist: list[torch.Tensor] = []  # per call: (bins,), on CPU (bins + 1,) (the last one: NaN)
        # small CPU tensors wait here (copies), grouped by shape and module kind, and are reduced together
        self._staged: dict[tuple, list[tuple[int, int, torch.Tensor]]] = {}
        self._staged_numel = 0
        self._group_meta: list[tuple[int, int, int, int, float, float, float]] = []
        self._group: list[tuple[torch.Tensor, ...]] = []  # per group: (first, m2, nonzero, saturated, hist)
        self._calls = 0

    def range_of(self, name: str) -> tuple[float, float]:
        """The fixed histogram range of one module."""
        if self.log_magnitude:
            return self.log_range
        kind = self.saturation[name]
        return {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}.get(kind, self.hist_range)  # type: ignore[arg-type]

    def edges(self, name: str) -> np.ndarray:
        """The ``bins + 1`` histogram edges of one module (a fresh array)."""
        edges = self._edges.get(name)
        if edges is None:
            low, high = self.range_of(name)
            edges = self._edges[name] = np.linspace(low, high, self.bins + 1)
        return edges.copy()

    def update(self, name: str, tensor: torch.Tensor, dim: int | None = None) -> None:
        """Add one tensor (a module output or its gradient). A few kernels, no host read.

        Args:
            name: a name given at construction.
            tensor: floating tensor whose first dimension is the batch.
            dim: the unit dimension (default: the last one); a unit is dead in this tensor if it is zero
                for every index of all other dimensions.
        """
        row = self.index[name]
        y = tensor.detach()
        numel = y.numel()
        if numel == 0:
            return
        yf = y.float()  # no copy for float32; half/bfloat16 outputs are reduced in float32
        if y.dim() == 0:
            yf = yf.reshape(1)
        dim = yf.dim() - 1 if dim is None else dim % yf.dim()
        others = tuple(d for d in range(yf.dim()) if d != dim)
        units = yf.shape[dim]
        seq, self._calls = self._calls, self._calls + 1
        exact_hist = self.histogram_samples is None or numel <= self.histogram_samples
        if yf.device.type == "cpu" and numel <= _STAGE_MAX:
            # small: a copy now, the reductions of all the tensors of one shape together in packed()
            key = (tuple(yf.shape), dim, self.saturation[name], self.range_of(name) if self.bins else None)
            copy = yf.clone() if y.dtype == torch.float32 else yf  # float() made a copy already
            self._staged.setdefault(key, []).append((seq, row, copy))
            self._staged_numel += numel
            if self._staged_numel > _STAGE_BUDGET:
                self._scratch_seen.update(self._staged)
                self._reduce_staged()
            return
        call = len(self._meta)
        if yf.device.type == "cpu":
            # two-pass: the sum, then the squared deviations from the mean in one more pass (exact-ish like
            # var_mean, which is about 10x slower on CPU)
            total = yf.sum()
            self._m2.append(torch.sub(yf, total, alpha=1.0 / numel).pow_(2).sum())
            self._first.append(total)
            scales = (1.0, 1.0)
            # bool() is the non-zero test of count_nonzero (NaN counts), about 3x faster than count_nonzero
            nonzero = yf.bool()
            self._nonzero.append(nonzero.sum(others, dtype=torch.int32) if others else nonzero.int())
        else:
            var, mean = torch.var_mean(yf, correction=0)
            self._first.append(mean)
            self._m2.append(var)
            scales = (float(numel), float(numel))
            self._nonzero.append(torch.count_nonzero(yf, dim=others) if others else (yf != 0).long())
        kind = self.saturation[name]
        t = self.saturation_threshold
        if kind == "tanh":
            self._saturated.append((call, torch.count_nonzero(yf.abs() > t)))
        elif kind == "sigmoid":
            self._saturated.append((call, torch.count_nonzero((yf - 0.5).abs() > t - 0.5)))
        hist_scale = 1.0
        if self.bins:
            low, high = self.range_of(name)
            sample = yf
            if not exact_hist:
                sample = strided_sample(yf, self.histogram_samples, self._phase[row])  # type: ignore[arg-type]
                self._phase[row] += 1
                hist_scale = numel / sample.numel()
            if self.log_magnitude:
                # exact zeros land in bin 0 as -inf and packed() takes them out again; in a sample they are
                # left out here (NaN falls in no bin), as packed() knows only the whole tensor's zeros
                values = sample.abs().log10()
                if hist_scale != 1.0:
                    values.masked_fill_(sample == 0, float("nan"))
            else:
                values = sample
            self._hist.append(_histogram(values, self.bins, low, high))
        self._meta.append((seq, row, numel, units, *scales, hist_scale))

    def _reduce_staged(self) -> None:
        """Reduce the staged tensors: each group of one shape and kind with one set of kernels for all of them, in
        work buffers kept from one log step to the next (fresh large buffers cost page faults on every step)."""
        used = {}
        for key, staged in self._staged.items():
            shape, dim, kind, hist_range = key
            k, numel = len(staged), math.prod(shape)
            work = self._scratch.get(key)
            if work is None or work[0].shape[0] != k:
                work = (torch.empty((k, *shape)), torch.empty(k, numel), torch.empty((k, *shape), dtype=torch.bool),
                        torch.empty((k, *shape), dtype=torch.int32))
            used[key] = work
            y, tmp, nonzero_mask, ints = work
            torch.stack([t for _, _, t in staged], out=y)
            flat = y.view(k, numel)
            total = flat.sum(1)
            m2 = torch.sub(flat, total[:, None], alpha=1.0 / numel, out=tmp).pow_(2).sum(1)
            nonzero_mask.copy_(y)  # x != 0, NaN included: the test of count_nonzero
            ints.copy_(nonzero_mask)
            others = tuple(d + 1 for d in range(len(shape)) if d != dim)
            nonzero = ints.sum(others, dtype=torch.int32).view(-1) if others else ints.view(-1).clone()
            t = self.saturation_threshold
            saturated = None
            if kind == "tanh":
                saturated = (torch.abs(flat, out=tmp) > t).sum(1)
            elif kind == "sigmoid":
                saturated = (torch.sub(flat, 0.5, out=tmp).abs_() > t - 0.5).sum(1)
            hist, hist_scale = None, 1.0
            if hist_range is not None:
                low, high = hist_range
                bins = self.bins
                sample, out = flat, tmp
                if self.histogram_samples is not None and numel > self.histogram_samples:
                    # the same strided sample of every tensor of the group (the offset of the group's first module)
                    run, stride = sample_layout(shape, self.histogram_samples)
                    phase = self._phase[staged[0][1]] % stride
                    for _, row, _ in staged:
                        self._phase[row] += 1
                    runs = (numel // run - phase + stride - 1) // stride
                    sample = flat.as_strided((k, runs, run), (numel, stride * run, 1), phase * run)
                    hist_scale = numel / (runs * run)
                    out = torch.empty(sample.shape)
                values = sample
                if self.log_magnitude:
                    values = torch.abs(sample, out=out).log10_()
                    if hist_scale != 1.0:
                        values.masked_fill_(sample == 0, float("nan"))  # zeros out of a sample (see update)
                torch.sub(values, low, out=out).mul_(bins / (high - low)).clamp_(0, bins - 1).nan_to_num_(nan=bins)
                index = ints.view(-1)[:out.numel()].view(k, -1)
                index.copy_(out.view(k, -1))
                index += torch.arange(0, k * (bins + 1), bins + 1, dtype=torch.int32)[:, None]
                hist = torch.bincount(index.view(-1), minlength=k * (bins + 1)).view(k, bins + 1)
            self._group.append((total, m2, nonzero, saturated, hist))
            units = shape[dim]
            self._group_meta.extend((seq, row, numel, units, 1.0, 1.0, hist_scale) for seq, row, _ in staged)
        self._scratch.update(used)
        self._staged = {}
        self._staged_numel = 0

    def packed(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Everything accumulated, as ONE flat float64 tensor on the device, per module
        ``calls, count, units, sum, sum of squares, zeros, dead units, saturated, histogram...``, then the
        non-zero count of every unit of every call. Every entry is a sum, so a cross-rank sum of this tensor
        gives the statistics of all ranks (:meth:`summarize` recounts the dead units from the summed counts)."""
        m, width = len(self.names), _HEAD + self.bins
        keep = set(self._staged) | self._scratch_seen
        self._reduce_staged()
        self._scratch = {k: v for k, v in self._scratch.items() if k in keep}  # shapes of this interval only
        self._scratch_seen = set()
        meta = self._meta + self._group_meta
        if not meta:
            self._layout = []
            return torch.zeros(m * width, dtype=torch.float64, device=device)
        device = (self._first or [g[0] for g in self._group])[0].device
        f64 = dict(dtype=torch.float64, device=device)
        calls, direct = len(meta), len(self._meta)
        rows = torch.tensor([c[1] for c in meta], device=device)
        host = torch.tensor([[1.0, n, u, f, s, h, float(h == 1.0)] for _, _, n, u, f, s, h in meta],
                            dtype=torch.float64).to(device, non_blocking=True)
        numel = host[:, 1]

        def joined(i: int, single: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(([torch.stack(single)] if single else []) + [g[i] for g in self._group])

        first = joined(0, self._first).double() * host[:, 3]  # sums
        m2 = joined(1, self._m2).double() * host[:, 4]  # sums of squared deviations from the mean
        # sums of y and y^2 in float64 from each call's (two-pass, exact-ish) sum and squared deviations
        sums = torch.stack([first, m2 + first * first / numel], dim=1)
        nonzero = torch.cat(self._nonzero + [g[2] for g in self._group])
        units = [c[3] for c in meta]
        unit_rows = torch.repeat_interleave(torch.arange(calls, device=device), torch.tensor(units, device=device))
        per_call = torch.zeros(calls, 2, **f64)  # non-zero elements, dead units
        per_call.index_add_(0, unit_rows, torch.stack([nonzero.double(), (nonzero == 0).double()], dim=1))
        saturated = torch.zeros(calls, **f64)
        if self._saturated:
            idx = torch.tensor([i for i, _ in self._saturated], device=device)
            saturated.index_add_(0, idx, torch.stack([c for _, c in self._saturated]).double())
        start = direct
        for g in self._group:
            if g[3] is not None:
                saturated[start:start + len(g[0])] = g[3].double()
            start += len(g[0])
        zeros = (numel - per_call[:, 0])[:, None]
        columns = [host[:, :3], sums, zeros, per_call[:, 1:], saturated[:, None]]
        if self.bins:
            hist = joined(4, self._hist)[:, :self.bins].double()
            if any(c[6] != 1.0 for c in meta):
                hist *= host[:, 5:6]  # sampled: counts scaled to the whole tensor
            if self.log_magnitude:
                hist[:, :1] -= zeros * host[:, 6:7]  # the zeros counted in bin 0 (exact histograms only)
            columns.append(hist)
        table = torch.zeros(m, width, **f64).index_add_(0, rows, torch.cat(columns, dim=1))
        # the per-unit non-zero counts go along, in call order (the same on every rank): after a cross-rank sum
        # a unit is dead only where it was zero on every rank's part of the batch (summing each rank's dead
        # units would overcount)
        order = sorted(range(calls), key=lambda i: meta[i][0])
        if order != list(range(calls)):
            offsets = np.concatenate([[0], np.cumsum(units)])
            nonzero = nonzero[torch.from_numpy(np.concatenate(
                [np.arange(offsets[i], offsets[i + 1]) for i in order])).to(device)]
        self._layout = [(meta[i][1], units[i]) for i in order]
        return torch.cat([table.reshape(-1), nonzero.double()])

    def summarize(self, packed: np.ndarray, one_batch_over_ranks: bool = False) -> dict[str, ModuleStats]:
        """Per-module statistics from the host copy of :meth:`packed` (after any cross-rank sum).
        Modules that saw no tensor are left out.

        Args:
            packed: the host copy.
            one_batch_over_ranks: ``packed`` is the cross-rank sum of the parts of ONE global batch (DDP):
                a unit is dead only where it is zero in every part, as one process would count it on the
                whole batch. ``False`` counts each part's dead units as a batch of its own.
        """
        packed = np.asarray(packed, dtype=np.float64)
        size = len(self.names) * (_HEAD + self.bins)
        table = packed[:size].reshape(len(self.names), _HEAD + self.bins)
        tail, layout = packed[size:], self._layout
        dead_units = None
        if one_batch_over_ranks and tail.size and tail.size == sum(u for _, u in layout):
            dead_units, unit_total = np.zeros(len(self.names)), np.zeros(len(self.names))
            for (row, units), counts in zip(layout, np.split(tail, np.cumsum([u for _, u in layout])[:-1])):
                dead_units[row] += np.count_nonzero(counts == 0)
                unit_total[row] += units
        out: dict[str, ModuleStats] = {}
        for i, (name, row) in enumerate(zip(self.names, table)):
            calls, count, units, total, total_sq, zeros, dead, saturated = row[:_HEAD]
            if dead_units is not None:
                dead, units = dead_units[i], unit_total[i]
            if calls == 0 or count == 0:
                continue
            mean = total / count
            var = max(total_sq / count - mean * mean, 0.0)
            hist = (row[_HEAD:].copy(), self.edges(name)) if self.bins else None
            out[name] = ModuleStats(
                calls=int(round(calls)), count=int(round(count)), mean=float(mean), std=float(np.sqrt(var)),
                zero_frac=float(zeros / count), dead_frac=float(dead / units) if units else 0.0,
                saturated_frac=float(saturated / count) if self.saturation[name] is not None else None,
                hist=hist,
            )
        return out


def _histogram(values: torch.Tensor, bins: int, low: float, high: float, groups: int = 0) -> torch.Tensor:
    """Counts of ``values`` in ``bins`` equal bins over [low, high]; values outside fall in the edge bins,
    NaN in none. ``histc`` on accelerators; on CPU an ``int32`` index + ``bincount`` (about 3x faster than CPU
    histc, and bincount's size check is free there, unlike on CUDA where it would sync), whose ``bins + 1``-th
    count is the NaN: the caller drops it. The bin of ``v`` is ``floor((v - low) * (bins / (high - low)))`` in
    float32, clamped to ``[0, bins - 1]``. ``groups=k`` (CPU): ``values`` is ``(k, n)``, ``(k, bins + 1)`` counts
    of its rows (one bincount)."""
    if values.device.type != "cpu":
        return torch.histc(values.clamp(low, high), bins, low, high)
    idx = (values - low).mul_(bins / (high - low)).clamp_(0, bins - 1).nan_to_num_(nan=bins).int()
    if groups:
        idx += torch.arange(0, groups * (bins + 1), bins + 1, dtype=torch.int32)[:, None]
        return torch.bincount(idx.view(-1), minlength=groups * (bins + 1)).view(groups, bins + 1)
    return torch.bincount(idx.reshape(-1), minlength=bins + 1)  # a copy only for a non-contiguous input


def _check_range(key: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise BpkitConfigError(key, value, "a pair (low, high) of numbers with low < high") from None
    if not low < high or not np.isfinite([low, high]).all():
        raise BpkitConfigError(key, value, "a pair (low, high) of finite numbers with low < high")
    return low, high
