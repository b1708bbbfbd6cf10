"""The gradient noise scale of McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"), on the device.

A minibatch gradient :math:`G_B` (the mean of ``B`` per-sample gradients) has
:math:`E|G_B|^2 = |G|^2 + \\mathrm{tr}(\\Sigma)/B`, where :math:`G` is the true gradient and :math:`\\Sigma` the
per-sample gradient covariance. Two batch sizes ``b_small < b_big`` give the paper's unbiased estimators
(appendix A.1)::

    |G|^2     ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/b_small - 1/b_big)

and the simple noise scale ``B_simple = tr(Sigma) / |G|^2``. One pair of norms gives a very noisy estimate (the
``|G|^2`` estimate can even be negative), so, as in the paper's appendix, both are smoothed with an exponential
moving average *separately* and divided afterwards. The paper's critical batch size, beyond which a larger batch
no longer cuts the number of steps proportionally, is ``B_crit ~ B_noise``, and ``B_simple`` is its practical
estimate (the paper finds the two within about an order of magnitude of each other across its tasks).

Everything here is pure torch (and numpy for the small fit): the estimator keeps its state on the device and reads
it back to the host only in :meth:`NoiseScaleEstimator.read`. No Lightning import: a plain PyTorch loop, Fabric and
:class:`bpkit.callbacks.NoiseScaleMonitor` drive the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bpkit.errors import BpkitConfigError, check_float, check_int

__all__ = ["NoiseScaleEstimator", "batch_size_of", "critical_batch_sentence", "fit_steps_vs_batch", "split_batch",
           "split_batch_sq_norms", "sq_norm", "unbiased_estimates"]


def unbiased_estimates(sq_small: Any, sq_big: Any, b_small: float, b_big: float) -> tuple[Any, Any]:
    """McCandlish et al.'s unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` from two squared gradient norms.

    Args:
        sq_small: ``|G_small|^2``, the squared norm of a mean gradient over ``b_small`` samples (a float or a tensor;
            the mean of several such norms is just as unbiased).
        sq_big: ``|G_big|^2`` over ``b_big`` samples.
        b_small: the small batch size.
        b_big: the big batch size (``> b_small``).

    Returns:
        ``(grad_sq, trace)``, of the inputs' type.

    Raises:
        BpkitConfigError: when ``b_big <= b_small`` or a size is not positive.

    Example::

        >>> g2, tr = unbiased_estimates(1.0 + 8.0 / 4, 1.0 + 8.0 / 16, 4, 16)  # |G|^2 = 1, tr(Sigma) = 8
        >>> round(g2, 6), round(tr, 6)
        (1.0, 8.0)
    """
    if not b_small > 0:
        raise BpkitConfigError("b_small", b_small, "a positive batch size")
    if not b_big > b_small:
        raise BpkitConfigError("b_big", b_big, f"a batch size larger than b_small={b_small}")
    grad_sq = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    trace = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


def sq_norm(tensors: Sequence[torch.Tensor | None], scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``scale**2 * sum |t|^2`` over the tensors (``None`` skipped) as a float32 0-dim tensor on their device, in one
    fused ``_foreach_norm`` launch; never reads to the host.

    Example::

        >>> sq_norm([torch.ones(4), None, torch.full((1,), 2.0)], scale=0.5)
        tensor(2.)
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return torch.zeros(())
    norms = torch._foreach_norm(present, 2.0)
    total = torch.stack(norms).float().square().sum() if len({n.dtype for n in norms}) == 1 else \
        torch.stack([n.float() for n in norms]).square().sum()
    if isinstance(scale, torch.Tensor):
        return total * scale.float().square()
    return total if scale == 1.0 else total * (scale * scale)


def batch_size_of(batch: Any) -> int | None:
    """The batch size of a batch: the first dimension of its first tensor (in tuples, lists and dicts); ``None``
    when it holds no tensor with a dimension. Reads shapes only, never the values.

    Example::

        >>> batch_size_of({"x": torch.zeros(5, 3), "y": [torch.zeros(5)]}), batch_size_of([1, 2])
        (5, None)
    """
    return _batch_len(batch)


def _batch_len(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, Mapping):
        values = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        return None
    for value in values:
        n = _batch_len(value)
        if n is not None:
            return n
    return None


def _slice(batch: Any, start: int, stop: int, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop, n) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_slice(v, start, stop, n) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, start, stop, n) for v in batch)
    return batch


def split_batch(batch: Any, parts: int = 2) -> tuple[list[Any], int]:
    """Cut a batch (a tensor, or tuples/lists/dicts of tensors whose first dimension is the batch) into ``parts``
    equal pieces along the first dimension; a remainder of fewer than ``parts`` samples is left out.

    Returns:
        ``(pieces, piece_size)``; ``([], 0)`` when the batch has fewer than ``parts`` samples or no tensor.

    Example::

        >>> pieces, size = split_batch((torch.arange(5), torch.arange(5) * 10), 2)
        >>> size, [p[1].tolist() for p in pieces]
        (2, [[0, 10], [20, 30]])
    """
    n = _batch_len(batch)
    if n is None or n < parts:
        return [], 0
    size = n // parts
    return [_slice(batch, i * size, (i + 1) * size, n) for i in range(parts)], size


def split_batch_sq_norms(loss_fn: Callable[[Any], torch.Tensor], params: Sequence[torch.Tensor], batch: Any,
                         parts: int = 2) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """The two squared norms of one split batch: ``|G_small|^2`` (the mean over the ``parts`` pieces' gradients)
    and ``|G_big|^2`` (the gradient of the whole, the mean of the pieces' gradients: no extra backward pass).

    The gradients come from ``torch.autograd.grad``: the parameters' ``.grad`` are left untouched. The caller keeps
    RNG states and buffers (dropout, BatchNorm) as they were: see :class:`bpkit.callbacks.NoiseScaleMonitor`.

    Args:
        loss_fn: the mean loss of a piece of the batch (``loss_fn(piece) -> 0-dim tensor``).
        params: the parameters to differentiate (those that require a gradient).
        batch: the batch to split.
        parts: pieces (``>= 2``); ``b_small = len(batch) // parts``, ``b_big = parts * b_small``.

    Returns:
        ``(sq_small, sq_big, b_small, b_big)`` (device tensors, host ints), or ``None`` when the batch is too small.

    Example::

        >>> w = torch.zeros(2, requires_grad=True)
        >>> x, y = torch.eye(2).repeat(2, 1), torch.tensor([1.0, 1.0, 3.0, 3.0])
        >>> sq_small, sq_big, b_small, b_big = split_batch_sq_norms(
        ...     lambda b: ((b[0] @ w - b[1]) ** 2).mean(), [w], (x, y))
        >>> round(sq_small.item(), 4), round(sq_big.item(), 4), b_small, b_big, w.grad is None
        (10.0, 8.0, 2, 4, True)
    """
    check_int("parts", parts, 2)
    pieces, size = split_batch(batch, parts)
    if not pieces:
        return None
    params = [p for p in params if p.requires_grad]
    total: list[torch.Tensor] | None = None
    sq_small = None
    with torch.enable_grad():
        for piece in pieces:
            loss = loss_fn(piece)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
            sq = sq_norm(grads)
            sq_small = sq if sq_small is None else sq_small + sq
            if total is None:
                total = list(grads)
            else:
                torch._foreach_add_(total, grads)
    assert total is not None and sq_small is not None
    return sq_small / parts, sq_norm(total, 1.0 / parts), size, size * parts


class NoiseScaleEstimator:
    """``|G|^2``, ``tr(Sigma)`` and ``B_simple`` from pairs of squared gradient norms, smoothed on the device.

    Each :meth:`update` turns one pair (two batch sizes) into the unbiased estimates and folds them into two
    exponential moving averages (with the bias correction of Adam, so the first estimates are not pulled to 0);
    a pair with a non-finite norm (an AMP overflow) is skipped on the device. :meth:`read` is the one host read:
    ``B_simple`` is the ratio of the two averages, as in the paper's appendix A.1.

    Args:
        ema: the moving averages' decay per estimate, in ``[0, 1)``; ``0`` keeps the last estimate only.

    Raises:
        BpkitConfigError: on a decay outside ``[0, 1)``.

    Example::

        >>> est = NoiseScaleEstimator(ema=0.5)
        >>> for _ in range(3):
        ...     est.update(torch.tensor(1.0 + 8.0 / 4), torch.tensor(1.0 + 8.0 / 16), 4, 16)
        >>> out = est.read()
        >>> round(out["grad_sq"], 4), round(out["trace"], 4), round(out["b_simple"], 4), out["estimates"]
        (1.0, 8.0, 8.0, 3)
    """

    def __init__(self, ema: float = 0.95) -> None:
        check_float("ema", ema, 0.0, 1.0, high_inclusive=False)
        self.ema = float(ema)
        # [ema(|G|^2), ema(tr), total weight of the averages, estimates folded in]
        self._state: torch.Tensor | None = None
        self.sizes = (0.0, 0.0)  # the last (b_small, b_big), on the host
        self._coef: dict[tuple[float, float, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _ensure(self, device: torch.device) -> torch.Tensor:
        if self._state is None:
            self._state = torch.zeros(4, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        elif self._state.device != device:
            self._state = self._state.to(device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
        return self._state

    @property
    def device_state(self) -> torch.Tensor | None:
        """The state vector on the device (``None`` before the first update), e.g. to average across ranks."""
        return self._state

    def update(self, sq_small: torch.Tensor, sq_big: torch.Tensor, b_small: float, b_big: float) -> None:
        """Fold one pair of squared norms into the averages: a handful of small kernels, no host read."""
        device = sq_small.device
        state = self._ensure(device)
        key = (float(b_small), float(b_big), device)
        coef = self._coef.get(key)
        if coef is None:  # the estimators are linear in the two norms: [|G|^2, tr, 1] = coef @ [sq_small, sq_big] + e3
            unbiased_estimates(0.0, 0.0, key[0], key[1])  # validates the sizes
            rows = [[-key[0] / (key[1] - key[0]), key[1] / (key[1] - key[0])],
                    [1.0 / (1.0 / key[0] - 1.0 / key[1]), -1.0 / (1.0 / key[0] - 1.0 / key[1])], [0.0, 0.0]]
            coef = (torch.tensor(rows, dtype=state.dtype).to(device),
                    torch.tensor([0.0, 0.0, 1.0], dtype=state.dtype).to(device))
            self._coef = {key: coef}  # one pair of sizes at a time in practice
        new = torch.addmv(coef[1], coef[0], torch.stack([sq_small, sq_big]).to(state.dtype))
        ok = torch.isfinite(new).all()
        # a skipped pair (non-finite) has weight 0; nan_to_num keeps 0 * inf out of the average
        state[:3].lerp_(new.nan_to_num(0.0, 0.0, 0.0), ok * (1.0 - self.ema))
        state[3].add_(ok)
        self.sizes = (key[0], key[1])

    def read(self, state: torch.Tensor | None = None) -> dict[str, float]:
        """The smoothed numbers on the host (one read): ``grad_sq``, ``trace``, ``b_simple`` (``nan`` while the
        ``|G|^2`` average is not positive: the noise still hides the mean gradient), ``estimates``, ``b_small``,
        ``b_big``. ``state``: read this vector instead (e.g. :attr:`device_state` averaged across ranks)."""
        state = self._state if state is None else state
        if state is None:
            return {"estimates": 0}
        g2_ema, tr_ema, weight, count = (float(v) for v in state.detach().tolist())
        b_small, b_big = self.sizes
        if weight <= 0:
            return {"estimates": int(round(count))}
        grad_sq, trace = g2_ema / weight, tr_ema / weight
        b_simple = trace / grad_sq if grad_sq > 0 and trace >= 0 else float("nan")
        return {"grad_sq": grad_sq, "trace": trace, "b_simple": b_simple, "estimates": int(round(count)),
                "b_small": b_small, "b_big": b_big}

    def state_dict(self) -> dict[str, Any]:
        """The averages as plain Python numbers (one host read)."""
        return {"ema": self.ema, "sizes": list(self.sizes),
                "state": None if self._state is None else self._state.detach().tolist()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s averages (on the CPU until the next update moves them)."""
        state = state_dict.get("state")
        self._state = None if state is None else torch.tensor(state[:4], dtype=torch.float64)
        self.sizes = tuple(float(v) for v in state_dict.get("sizes", (0.0, 0.0)))  # type: ignore[assignment]


def _round2(x: float) -> str:
    """Two significant figures, as a plain integer when it is one: 687 -> '690', 12.3 -> '12', 3.14 -> '3.1'."""
    if x <= 0 or not math.isfinite(x):
        return f"{x:g}"
    digits = 1 - int(math.floor(math.log10(x)))
    value = round(x, digits)
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:g}"


def critical_batch_sentence(batch_size: float, critical_batch: float | None) -> str:
    """A plain sentence about the batch size against the critical batch (``B_crit ~ B_simple``), for reports.

    Args:
        batch_size: the batch size per optimizer step (all micro-batches and ranks together).
        critical_batch: the measured ``B_simple`` (``None``/``nan``/not positive: it could not be estimated).

    Example::

        >>> critical_batch_sentence(64, 687)
        'batch 64 is 11x below the critical batch ~690: a larger batch would use the same data about as efficiently and take fewer steps'
        >>> critical_batch_sentence(1024, 100)
        'batch 1024 is 10x above the critical batch ~100: a smaller batch would reach the same loss with less data and compute; this one buys few extra steps'
        >>> critical_batch_sentence(64, 90)
        'batch 64 is near the critical batch ~90: a good trade-off between the number of steps and the data used'
    """
    if critical_batch is None or not math.isfinite(critical_batch) or critical_batch <= 0:
        return (f"the gradient noise scale at batch {batch_size:g} could not be estimated: the gradient's mean is "
                "still hidden by its noise (run longer, or log less often so more estimates are averaged)")
    ratio = critical_batch / batch_size
    crit = _round2(critical_batch)
    if ratio >= 2:
        return (f"batch {batch_size:g} is {ratio:.0f}x below the critical batch ~{crit}: a larger batch would use "
                "the same data about as efficiently and take fewer steps")
    if ratio <= 0.5:
        return (f"batch {batch_size:g} is {1 / ratio:.0f}x above the critical batch ~{crit}: a smaller batch would "
                "reach the same loss with less data and compute; this one buys few extra steps")
    return (f"batch {batch_size:g} is near the critical batch ~{crit}: a good trade-off between the number of steps "
            "and the data used")


def fit_steps_vs_batch(batch_sizes: Sequence[float], steps: Sequence[float]) -> tuple[float, float]:
    """Fit McCandlish et al.'s ``S = S_min (1 + B_noise / B)`` to steps-to-target against batch size.

    Linear in ``1/B`` (``S = S_min + S_min B_noise / B``): least squares on the relative error (each point
    weighted by ``1/S``), so a large-``S`` small-batch run does not dominate.

    Returns:
        ``(S_min, B_noise)``.

    Raises:
        BpkitConfigError: with fewer than two distinct batch sizes.

    Example::

        >>> b = [8, 16, 32, 64, 128]
        >>> s_min, b_noise = fit_steps_vs_batch(b, [100 * (1 + 40 / x) for x in b])
        >>> round(s_min, 6), round(b_noise, 6)
        (100.0, 40.0)
    """
    b = np.asarray(batch_sizes, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    if len(set(b.tolist())) < 2 or len(b) != len(s):
        raise BpkitConfigError("batch_sizes", list(b), "at least two distinct batch sizes, one step count each")
    a = np.stack([np.ones_like(b), 1.0 / b], axis=1) / s[:, None]
    (s_min, slope), *_ = np.linalg.lstsq(a, np.ones_like(s), rcond=None)
    return float(s_min), float(slope / s_min) if s_min != 0 else float("nan")
