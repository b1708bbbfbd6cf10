"""Statistics of module outputs (activations) and of their gradients, accumulated on the device.

Pure torch: never imports Lightning. Every :meth:`ActivationStats.update` launches the few reductions
of one tensor and keeps their small results on the device (element and unit counts are known from
shapes, so they stay Python integers). At log time :meth:`ActivationStats.packed` combines all of them
into ONE flat float64 tensor (ready for a cross-rank sum and a single host copy) and
:meth:`ActivationStats.summarize` turns the copied numbers into per-module statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bpkit.errors import BpkitConfigError, check_float, check_int

_HEAD = 8  # calls, count, units, sum, sum of squares, zeros, dead units, saturated elements

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

    Each :meth:`update` launches only the reductions of the big tensor (sum, sum of squares, a per-unit
    ``count_nonzero``, the saturation count and ``histc``) and keeps their small results; the arithmetic
    that combines them is done once for all modules and calls in :meth:`packed`, with a fixed number of
    kernels.

    Args:
        names: the module names, one row each, in a fixed order (the same on every rank).
        saturation: per name, ``"tanh"``, ``"sigmoid"`` or ``None`` (no saturation measured).
        bins: histogram bins (0 disables histograms).
        hist_range: ``(low, high)`` of the linear histogram of unbounded outputs; tanh outputs use
            ``(-1, 1)`` and sigmoid outputs ``(0, 1)``. Values outside are counted in the edge bins.
        saturation_threshold: tanh is saturated where ``|y| > t``, sigmoid where ``y > t`` or ``y < 1 - t``.
        log_magnitude: histogram ``log10|y|`` of the non-zero elements instead of ``y`` (for gradients).
        log_range: ``(low, high)`` in decades of the log-magnitude histogram.

    Raises:
        BpkitConfigError: bins < 0, a range with ``low >= high`` or a threshold outside (0.5, 1).

    Example::

        >>> import torch
        >>> s = ActivationStats(["act"], {"act": None}, bins=4, hist_range=(0.0, 2.0))
        >>> s.update("act", torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
        >>> st = s.summarize(s.packed().numpy())["act"]
        >>> st.mean, st.zero_frac, st.dead_frac, st.hist[0].tolist()
        (0.75, 0.5, 0.5, [2.0, 0.0, 1.0, 1.0])
    """

    def __init__(self, names: Sequence[str], saturation: Mapping[str, str | None] | None = None, bins: int = 64,
                 hist_range: tuple[float, float] = (-4.0, 4.0), saturation_threshold: float = 0.99,
                 log_magnitude: bool = False, log_range: tuple[float, float] = (-12.0, 2.0)) -> None:
        self.bins = check_int("bins", bins, minimum=0)
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
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated (start a new log interval)."""
        self._rows: list[int] = []  # per call: module row
        self._numel: list[int] = []
        self._units: list[int] = []
        self._mean: list[torch.Tensor] = []  # per call: 0-dim tensors on the device
        self._var: list[torch.Tensor] = []
        self._nonzero: list[torch.Tensor] = []  # per call: (units,) non-zero count of each unit
        self._saturated: list[tuple[int, torch.Tensor]] = []  # (call index, 0-dim count)
        self._hist: list[torch.Tensor] = []  # per call: (bins,)

    def range_of(self, name: str) -> tuple[float, float]:
        """The fixed histogram range of one module."""
        if self.log_magnitude:
            return self.log_range
        kind = self.saturation[name]
        return {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}.get(kind, self.hist_range)  # type: ignore[arg-type]

    def edges(self, name: str) -> np.ndarray:
        low, high = self.range_of(name)
        return np.linspace(low, high, self.bins + 1)

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
        if y.numel() == 0:
            return
        yf = y.float()  # no copy for float32; half/bfloat16 outputs are reduced in float32
        if y.dim() == 0:
            yf = yf.reshape(1)
        dim = yf.dim() - 1 if dim is None else dim % yf.dim()
        others = tuple(d for d in range(yf.dim()) if d != dim)
        self._rows.append(row)
        self._numel.append(yf.numel())
        self._units.append(yf.shape[dim])
        var, mean = _var_mean(yf)
        self._mean.append(mean)
        self._var.append(var)
        self._nonzero.append(torch.count_nonzero(yf, dim=others) if others else (yf != 0).long())
        kind = self.saturation[name]
        t = self.saturation_threshold
        if kind == "tanh":
            self._saturated.append((len(self._rows) - 1, torch.count_nonzero(yf.abs() > t)))
        elif kind == "sigmoid":
            self._saturated.append((len(self._rows) - 1, torch.count_nonzero((yf - 0.5).abs() > t - 0.5)))
        if self.bins:
            low, high = self.range_of(name)
            # log-magnitude: exact zeros land in bin 0 as -inf; packed() takes them out again
            values = yf.abs().log10() if self.log_magnitude else yf
            self._hist.append(_histogram(values, self.bins, low, high))

    def packed(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Everything accumulated, as ONE flat float64 tensor on the device, per module
        ``calls, count, units, sum, sum of squares, zeros, dead units, saturated, histogram...``, then the
        non-zero count of every unit of every call. Every entry is a sum, so a cross-rank sum of this tensor
        gives the statistics of all ranks (:meth:`summarize` recounts the dead units from the summed counts)."""
        m, width = len(self.names), _HEAD + self.bins
        if not self._rows:
            self._layout = []
            return torch.zeros(m * width, dtype=torch.float64, device=device)
        device = self._mean[0].device
        f64 = dict(dtype=torch.float64, device=device)
        calls = len(self._rows)
        rows = torch.tensor(self._rows, device=device)
        host = torch.tensor([[1.0, n, u] for n, u in zip(self._numel, self._units)], dtype=torch.float64)
        host = host.to(device, non_blocking=True)
        numel = host[:, 1]
        mean = torch.stack(self._mean).double()
        var = torch.stack(self._var).double()
        # sums of y and y^2 in float64 from each call's (two-pass, exact-ish) mean and variance
        sums = torch.stack([mean * numel, (var + mean * mean) * numel], dim=1)
        nonzero = torch.cat(self._nonzero)
        unit_rows = torch.repeat_interleave(torch.arange(calls, device=device),
                                            torch.tensor(self._units, device=device))
        per_call = torch.zeros(calls, 2, **f64)  # non-zero elements, dead units
        per_call.index_add_(0, unit_rows, torch.stack([nonzero.double(), (nonzero == 0).double()], dim=1))
        saturated = torch.zeros(calls, **f64)
        if self._saturated:
            idx = torch.tensor([i for i, _ in self._saturated], device=device)
            saturated.index_add_(0, idx, torch.stack([c for _, c in self._saturated]).double())
        zeros = (numel - per_call[:, 0])[:, None]
        columns = [host, sums, zeros, per_call[:, 1:], saturated[:, None]]
        if self.bins:
            hist = torch.stack(self._hist).double()
            if self.log_magnitude:
                hist[:, :1] -= zeros
            columns.append(hist)
        table = torch.zeros(m, width, **f64).index_add_(0, rows, torch.cat(columns, dim=1))
        # the per-unit non-zero counts go along: after a cross-rank sum a unit is dead only where it was
        # zero on every rank's part of the batch (summing each rank's dead units would overcount)
        self._layout = list(zip(self._rows, self._units))
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


def _var_mean(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Population variance and mean. ``torch.var_mean`` on accelerators; on CPU an explicit two-pass
    (mean, then mean of squared deviations), about 10x faster there than CPU var_mean and as exact."""
    if y.device.type != "cpu":
        return torch.var_mean(y, correction=0)
    mean = y.mean()
    return (y - mean).pow_(2).mean(), mean


def _histogram(values: torch.Tensor, bins: int, low: float, high: float) -> torch.Tensor:
    """Counts of ``values`` in ``bins`` equal bins over [low, high]; values outside fall in the edge bins,
    NaN in none. ``histc`` on accelerators; on CPU an index + ``bincount`` (about 3x faster than CPU histc,
    and bincount's size check is free there, unlike on CUDA where it would sync)."""
    if values.device.type != "cpu":
        return torch.histc(values.clamp(low, high), bins, low, high)
    idx = (values.reshape(-1) - low).mul_(bins / (high - low)).clamp_(0, bins - 1).nan_to_num_(nan=bins)
    return torch.bincount(idx.long(), minlength=bins + 1)[:bins]


def _check_range(key: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise BpkitConfigError(key, value, "a pair (low, high) of numbers with low < high") from None
    if not low < high or not np.isfinite([low, high]).all():
        raise BpkitConfigError(key, value, "a pair (low, high) of finite numbers with low < high")
    return low, high
