"""The batch-independence check: sample i's output must not depend on sample j's input."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bpkit.errors import BpkitConfigError, check_float
from bpkit.gradcheck._target import copy_module, describe, frozen_randomness
from bpkit.gradcheck.report import BatchIndependenceReport
from bpkit.stats.readback import readback


def check_batch_independence(model: nn.Module, batch: Any, *, samples: Sequence[int] | None = None,
                             dtype: torch.dtype = torch.float64, tol: float = 1e-10,
                             seed: int = 0) -> BatchIndependenceReport:
    """Backpropagate from single samples' outputs and check that no other sample's input gets a gradient.

    A ``view``/``reshape`` where a ``transpose``/``permute`` was meant (``(B, T, F) -> (T, B, F)``),
    a reduction over the wrong dimension or a batch-level statistic all make the output of
    sample ``i`` depend on the input of sample ``j != i``; in a correct model that gradient is
    exactly zero. The model runs as a float64 copy in eval mode, because BatchNorm in training
    mode mixes samples on purpose; the model you pass is not modified.

    Args:
        model: an ``nn.Module`` (a LightningModule's ``forward`` is used) taking the batch's input.
        batch: the input tensor ``(B, ...)``, or a batch ``(x, *rest)`` whose ``x`` is used; it must be
            floating point (token ids carry no gradient).
        samples: the samples whose outputs are probed; default: first, middle and last.
        dtype: the dtype of the copy.
        tol: a gradient on another sample counts as a leak above ``tol`` times the largest gradient
            norm of the probe.
        seed: seed of the random weights that reduce a sample's output to a scalar.

    Returns:
        A :class:`~bpkit.gradcheck.report.BatchIndependenceReport`.

    Raises:
        BpkitConfigError: no floating input with at least 2 samples, an output without the batch
            dimension first, a sample index out of range, or a batch the model cannot take.

    Example::

        >>> import torch
        >>> from bpkit.gradcheck import check_batch_independence
        >>> check_batch_independence(torch.nn.Linear(4, 2), torch.randn(8, 4)).passed
        True
    """
    check_float("tol", tol, 0.0)
    if not isinstance(model, nn.Module):
        raise BpkitConfigError("model", type(model).__name__, "an nn.Module (the batch-independence check calls it)")
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(x, Mapping) or not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0 \
            or x.shape[0] < 2:
        raise BpkitConfigError("batch", describe(batch), "a floating-point input of shape (batch >= 2, ...) as the "
                                                         "batch or its first element")
    n = x.shape[0]
    chosen = sorted({0, n // 2, n - 1}) if samples is None else list(samples)
    for s in chosen:
        if isinstance(s, bool) or not isinstance(s, int) or not -n <= s < n:
            raise BpkitConfigError("samples", list(samples), f"sample indices in [0, {n})")
    chosen = [s % n for s in chosen]

    with frozen_randomness():
        torch.manual_seed(seed)
        clone = copy_module(model, dtype).eval()
        first = next(clone.parameters(), None)
        xin = x.detach().to(device=first.device if first is not None else x.device, dtype=dtype).clone()
        xin.requires_grad_(True)
        with torch.enable_grad():
            taps = _tap_modules(clone, n)  # each module's input and output, to say where samples mix if they do
            try:
                out = clone(xin)
            except Exception as exc:
                expected = (f"an input that {type(model).__name__} accepts; "
                            f"calling it raised {type(exc).__name__}: {exc}")
                raise BpkitConfigError("batch", describe(batch), expected) from exc
            finally:
                for handle in taps.handles:
                    handle.remove()
            out = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
                raise BpkitConfigError("output", describe(out), f"a tensor whose first dimension is the batch ({n})")
            gen = torch.Generator().manual_seed(seed)
            norms = []
            for s in chosen:
                w = torch.randn(out[s].shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
                (g,) = torch.autograd.grad((out[s] * w).sum(), xin, retain_graph=True, allow_unused=True)
                norms.append(torch.zeros(n, dtype=dtype, device=xin.device) if g is None
                             else g.reshape(n, -1).norm(dim=1))
        host = readback({"norms": torch.stack(norms)})["norms"]
        leaks = [s for row, s in zip(host, chosen) if _leaks(row, s, tol)]
        origin = _where_mixing(taps, xin, leaks[0], tol, seed) if leaks else None

    report = BatchIndependenceReport(batch_size=n, input_shape=tuple(x.shape), tol=tol, origin=origin)
    for row, s in zip(host, chosen):
        others = row.copy()
        others[s] = 0.0
        limit = tol * max(row.max(), 0.0)
        leaking = int((others > limit).sum())
        report.samples.append({"sample": s, "own_grad_norm": float(row[s]), "max_leak": float(others.max()),
                               "worst_other": int(others.argmax()), "leaking": leaking})
    return report


def _leaks(row: Any, sample: int, tol: float) -> bool:
    others = row.copy()
    others[sample] = 0.0
    return bool((others > tol * max(row.max(), 0.0)).any())


class _Taps:
    """What every submodule took in and gave out in one forward pass, in forward order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.Tensor | None, torch.Tensor | None]] = []
        self.handles: list[Any] = []


def _batch_view(t: Any, n: int) -> torch.Tensor | None:
    """The tensor with the batch (of size ``n``) first: ``(B, ...)`` as is, ``(T, B, ...)`` transposed."""
    t = t[0] if isinstance(t, (tuple, list)) and t else t
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() == 0 or not t.requires_grad:
        return None
    if t.shape[0] == n:
        return t
    if t.dim() > 1 and t.shape[1] == n:
        return t.transpose(0, 1)
    return None


def _tap_modules(model: nn.Module, n: int) -> _Taps:
    taps = _Taps()
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod: nn.Module, inputs: Any, output: Any, name: str = name) -> None:
            taps.calls.append((name, _batch_view(inputs, n), _batch_view(output, n)))

        taps.handles.append(module.register_forward_hook(hook))
    return taps


def _where_mixing(taps: _Taps, xin: torch.Tensor, sample: int, tol: float, seed: int) -> str | None:
    """The first place, in forward order, where a module's input (or output) for ``sample`` already depends on other
    samples' inputs, in words: a module that mixes samples itself, or the parent's code between two modules."""
    gen = torch.Generator().manual_seed(seed + 1)

    def mixes(t: torch.Tensor | None) -> bool | None:
        if t is None:
            return None
        w = torch.randn(t[sample].shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
        (g,) = torch.autograd.grad((t[sample] * w).sum(), xin, retain_graph=True, allow_unused=True)
        if g is None:
            return False
        row = g.reshape(g.shape[0], -1).norm(dim=1)
        return _leaks(readback({"row": row})["row"], sample, tol)

    previous = None  # the last module whose output was still clean
    for name, inp, out in taps.calls:
        if mixes(inp):
            if previous is None:
                return f"before `{name}` (the input of the first module already mixes samples)"
            return (f"between `{previous}` and `{name}`: the output of `{previous}` keeps samples apart, the input of "
                    f"`{name}` mixes them, so the mixing happens in the parent module's forward (a view/reshape "
                    "instead of a transpose/permute, or a reduction over the batch dimension)")
        verdict = mixes(out)
        if verdict:
            return (f"`{name}`: its input keeps samples apart, its output mixes them (a batch-wide statistic or a "
                    "view/reshape across the batch inside it)")
        if verdict is not None:
            previous = name
    return None
