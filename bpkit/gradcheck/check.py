"""Finite differences against autograd for a whole model, on a real batch, at any size."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bpkit.errors import BpkitConfigError, check_choice, check_float, check_int
from bpkit.gradcheck._target import Target, frozen_randomness
from bpkit.gradcheck.independence import check_batch_independence
from bpkit.gradcheck.report import GradcheckReport, ParamCheck
from bpkit.stats.readback import readback

MODES = ("directional", "full")
# eps, rtol, atol per dtype of the copy: central differences lose about half the mantissa.
_DEFAULTS = {torch.float64: (1e-6, 1e-3, 1e-8), torch.float32: (1e-3, 5e-2, 1e-5)}
_LOW_PRECISION = (1e-2, 2e-1, 1e-3)


def check_gradients(
    model_or_loss_fn: Any,
    batch: Any,
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    params: str | Sequence[str] | None = None,
    mode: str = "directional",
    n_directions: int = 3,
    max_elements: int = 32,
    eps: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    dtype: torch.dtype = torch.float64,
    train: bool = True,
    seed: int = 0,
    batch_idx: int = 0,
    batch_independence: bool = False,
    confirm: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> GradcheckReport:
    """Compare autograd's gradient with central finite differences of the loss, per parameter tensor.

    The check runs on a deep copy of the model in ``dtype`` (the model you pass is never modified)
    with the batch cast to ``dtype``. Randomness is identical in every evaluation (the RNG is forked
    and re-seeded with ``seed`` before each forward pass, so dropout draws the same mask), and the
    caller's RNG streams are left as they were.

    ``mode="directional"`` probes each tensor ``p`` along ``n_directions`` unit directions ``v``: the
    normalised gradient itself (a wrong scale or sign shows at full size there) and random
    Gaussian directions (a wrong component orthogonal to the gradient shows there), comparing
    ``(L(p + eps v) - L(p - eps v)) / 2 eps`` with ``grad . v``: ``2 * n_directions`` forward passes
    per tensor whatever its size. ``mode="full"`` perturbs single elements, every element of tensors
    with at most ``max_elements`` elements and ``max_elements`` sampled elements of larger ones.

    A probe ``k`` passes when ``|numeric_k - autograd_k| <= atol + rtol * scale_k``; the scale of a
    directional probe is ``max(|grad|, |numeric_k|)``, that of an element is the larger of its two
    values. Nothing is read back to the host before all evaluations are queued (one copy at the end).

    Args:
        model_or_loss_fn: a LightningModule (anything with ``training_step``: its loss is
            ``training_step(batch, batch_idx)``, taken from a tensor, ``dict["loss"]`` or the first
            element of a tuple; ``self.log`` is a no-op on the copy), an ``nn.Module`` used with
            ``loss_fn``, or a plain function checked with respect to its floating-point inputs
            (those with ``requires_grad`` if any do; a non-scalar output is reduced by a fixed
            random projection).
        batch: the batch. For an ``nn.Module``: ``x`` or ``(x, *rest)`` gives ``loss_fn(model(x), *rest)``
            (a tuple output, like the RNN's ``(out, hidden)``, contributes its first element); with
            ``loss_fn=None`` the model's output must be the scalar loss.
        loss_fn: the loss for an ``nn.Module``.
        params: glob(s) over parameter names (``"blocks.2.*"``); default: every trainable tensor.
        mode: ``directional`` or ``full``.
        n_directions: directions per tensor in directional mode (the first is the gradient's).
        max_elements: elements per tensor in full mode.
        eps: finite-difference step; default 1e-6 in float64, 1e-3 in float32.
        rtol: relative tolerance; default 1e-3 in float64, 5e-2 in float32.
        atol: absolute tolerance; default 1e-8 in float64, 1e-5 in float32.
        dtype: the dtype of the copy; float64 unless the device has none.
        train: evaluate in training mode (dropout on with a fixed mask; BatchNorm normalises with
            the batch statistics and the backward through them is checked; running statistics change
            on the copy only). ``False``: eval mode.
        seed: the seed of the evaluations and of the random directions/elements.
        batch_idx: passed to ``training_step``.
        batch_independence: also run :func:`check_batch_independence` on the batch's input.
        confirm: probe a failing tensor again at ``eps / 10``, then ``eps / 100`` (same directions or
            elements) and let it pass if a smaller step agrees: a step across a kink (ReLU, max-pool, abs)
            spoils a finite difference at one step size, while a wrong backward is wrong at every step size.
        progress: called as ``progress(done, total, name)`` after each tensor.

    Returns:
        A :class:`~bpkit.gradcheck.report.GradcheckReport`.

    Raises:
        BpkitConfigError: bad argument (``eps <= 0``, unknown mode, ``params`` matching nothing), or a
            batch the model cannot take (the message names the batch's shapes and the original error).

    Example::

        >>> import torch
        >>> from bpkit.gradcheck import check_gradients
        >>> from bpkit.models import MLP
        >>> net = MLP(8, 3, depth=3, width=16)
        >>> batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
        >>> report = check_gradients(net, batch, loss_fn=torch.nn.functional.cross_entropy)
        >>> report.passed, len(report.params)
        (True, 6)
    """
    eps, rtol, atol = validate_options(mode=mode, n_directions=n_directions, max_elements=max_elements, eps=eps,
                                       rtol=rtol, atol=atol, dtype=dtype, seed=seed)

    start = time.perf_counter()
    with frozen_randomness():
        target = Target(model_or_loss_fn, batch, loss_fn=loss_fn, params=params, dtype=dtype, train=train,
                        seed=seed, batch_idx=batch_idx)
        loss0 = target.first_loss()
        tensors = [t for _, t in target.named]
        grads: tuple[torch.Tensor | None, ...] = (None,) * len(tensors)
        if loss0.requires_grad:
            grads = torch.autograd.grad(loss0, tensors, allow_unused=True)
        loss0 = loss0.detach()
        picked: dict[str, list[tuple[int, ...]]] = {}
        evaluations = 1

        def probe(i: int, step: float) -> torch.Tensor:
            nonlocal evaluations
            (name, p), g = target.named[i], grads[i]
            # one generator per tensor: a re-probe at a smaller step sees the same directions/elements
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            with torch.no_grad():
                if mode == "directional":
                    rows = _directional(target, p, g, n_directions, step, gen)
                else:
                    rows, picked[name] = _elements(target, p, g, max_elements, step, gen)
            evaluations += 2 * rows.shape[0]
            return rows

        probes: dict[str, torch.Tensor] = {}
        for i, (name, _) in enumerate(target.named):
            probes[name] = probe(i, eps)
            if progress is not None:
                progress(i + 1, len(tensors), name)
        probes["__loss__"] = loss0
        host = readback(probes)  # the one device->host copy of the check (each re-probe adds one)
        loss_value = float(host["__loss__"])
        results = []
        for i, ((name, p), g) in enumerate(zip(target.named, grads)):
            result = _judge(name, p, g is None, host[name], picked.get(name), mode, rtol, atol, loss_value)
            for smaller in (eps / 10, eps / 100) if confirm and math.isfinite(result.rel_error) else ():
                if result.passed:
                    break
                retry = _judge(name, p, g is None, readback({"r": probe(i, smaller)})["r"], picked.get(name), mode,
                               rtol, atol, loss_value)
                if retry.passed:
                    retry.reason = (f"ok at eps={smaller:g} (at eps={eps:g} the step crossed a kink such as "
                                    f"ReLU's: rel. error {result.rel_error:.2g})")
                    result = retry
            results.append(result)
        independence = check_batch_independence(model_or_loss_fn, batch, dtype=dtype) if batch_independence else None

    return GradcheckReport(mode=mode, eps=eps, rtol=rtol, atol=atol, dtype=str(dtype).replace("torch.", ""),
                           loss=loss_value, evaluations=evaluations, seconds=time.perf_counter() - start,
                           params=results, batch_independence=independence)


def validate_options(*, mode: str, n_directions: int, max_elements: int, eps: float | None, rtol: float | None,
                     atol: float | None, dtype: torch.dtype, seed: int) -> tuple[float, float, float]:
    """Check the options of :func:`check_gradients`; return ``(eps, rtol, atol)`` with dtype defaults filled in.

    Raises:
        BpkitConfigError: naming the first bad option.
    """
    check_choice("mode", mode, MODES)
    check_int("n_directions", n_directions)
    check_int("max_elements", max_elements)
    check_int("seed", seed, minimum=0)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BpkitConfigError("dtype", dtype, "a floating-point torch.dtype, e.g. torch.float64")
    d_eps, d_rtol, d_atol = _DEFAULTS.get(dtype, _LOW_PRECISION)
    eps = d_eps if eps is None else check_float("eps", eps, 0.0, low_inclusive=False)
    rtol = d_rtol if rtol is None else check_float("rtol", rtol, 0.0, low_inclusive=False)
    atol = d_atol if atol is None else check_float("atol", atol, 0.0)
    return eps, rtol, atol


def _directional(target: Target, p: torch.Tensor, g: torch.Tensor | None, n: int, eps: float,
                 gen: torch.Generator) -> torch.Tensor:
    """Rows ``(numeric, autograd, scale, |grad|)``, one per direction, left on the device."""
    orig = p.detach().clone()
    gnorm = torch.zeros((), dtype=p.dtype, device=p.device) if g is None else g.norm()
    dirs = []
    if g is not None:
        dirs.append(g / gnorm.clamp_min(torch.finfo(p.dtype).tiny))
    while len(dirs) < n:
        v = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=p.device, dtype=p.dtype)
        dirs.append(v / v.norm())
    rows = []
    for v in dirs:
        p.add_(v, alpha=eps)
        plus = p.detach().clone()
        up = target.loss()
        p.copy_(orig).sub_(v, alpha=eps)
        # The step actually taken, after rounding of orig +- eps v, so that rounding is not counted as error.
        step = plus.sub_(p)
        down = target.loss()
        p.copy_(orig)
        numeric = (up - down) / (2 * eps)
        analytic = torch.zeros_like(numeric) if g is None else (g * step).sum() / (2 * eps)
        rows.append(torch.stack([numeric, analytic, torch.maximum(gnorm, numeric.abs()), gnorm]))
    return torch.stack(rows)


def _elements(target: Target, p: torch.Tensor, g: torch.Tensor | None, k: int, eps: float,
              gen: torch.Generator) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    numel = p.numel()
    gnorm = torch.zeros((), dtype=p.dtype, device=p.device) if g is None else g.norm()
    flat = torch.arange(numel) if numel <= k else torch.randperm(numel, generator=gen)[:k].sort().values
    shape = tuple(p.shape)
    index = list(zip(*(t.tolist() for t in torch.unravel_index(flat, shape)))) if shape else [()]
    rows = []
    for idx in index:
        orig = p[idx].clone()
        p[idx] = orig + eps
        plus = p[idx].clone()
        up = target.loss()
        p[idx] = orig - eps
        step = plus - p[idx]
        down = target.loss()
        p[idx] = orig
        numeric = (up - down) / step
        analytic = torch.zeros_like(numeric) if g is None else g[idx]
        rows.append(torch.stack([numeric, analytic, torch.maximum(numeric.abs(), analytic.abs()), gnorm]))
    return torch.stack(rows), index


def _judge(name: str, p: torch.Tensor, unused: bool, rows: Any, picked: list[tuple[int, ...]] | None, mode: str,
           rtol: float, atol: float, loss: float) -> ParamCheck:
    numeric, analytic, scale = rows[:, 0], rows[:, 1], rows[:, 2]
    diff = abs(numeric - analytic)
    finite = bool(all(map(math.isfinite, numeric))) and bool(all(map(math.isfinite, analytic)))
    rel = (diff / (scale + atol / rtol)).max() if finite else math.nan
    passed = bool(finite and math.isfinite(loss) and rel <= rtol)
    common = dict(name=name, shape=tuple(p.shape), numel=p.numel(), probes=len(rows), grad_norm=float(rows[0, 3]),
                  max_abs_error=float(diff.max()) if finite else math.nan, rel_error=float(rel), passed=passed)
    worst = int(diff.argmax()) if finite else 0
    if not math.isfinite(loss):
        reason = "the loss itself is not finite"
    elif not all(map(math.isfinite, analytic)):
        reason = "the autograd gradient is not finite"
    elif not finite:
        reason = "the loss is not finite after moving this tensor by eps (try a smaller eps)"
    elif passed:
        reason = "ok (no autograd gradient: unused by the loss)" if unused else "ok"
    elif unused:
        reason = (f"autograd gives no gradient (the tensor is unused or detached), but the loss changes with it "
                  f"(finite-difference slope {numeric[worst]:.3g})")
    elif mode == "full":
        n, a = numeric[worst], analytic[worst]
        sign = "sign error: " if n * a < 0 else ""
        reason = f"{sign}element {list(picked[worst])}: autograd {a:.4g} vs finite differences {n:.4g}"
        if n != 0 and n * a >= 0:
            reason += f" (ratio {a / n:.4g})"
    else:
        n, a = numeric[0], analytic[0]
        ratio = a / n if n != 0 else math.inf
        if ratio < 0:
            reason = f"sign error: autograd points against the finite-difference slope (autograd/numeric = {ratio:.3g})"
        elif abs(n - a) > atol + rtol * scale[0]:
            reason = f"autograd is {ratio:.4g}x the finite-difference slope along the gradient"
        else:
            reason = (f"wrong along a random direction (autograd {analytic[worst]:.4g} vs numeric "
                      f"{numeric[worst]:.4g}): part of the gradient is wrong")
    return ParamCheck(reason=reason, **common)
