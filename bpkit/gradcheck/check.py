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
from bpkit.gradcheck.report import GradcheckReport, GradcheckUnsupported, ParamCheck
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
    max_seconds: float | None = None,
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

    Before any finite difference, the loss is evaluated again after a move of every checked tensor and
    back: when it does not come back to the first value (beyond round-off), the loss is not a
    deterministic function of the weights (randomness outside torch/Python/NumPy's global RNGs, an
    environment, a replay buffer or a target network that changes with every call) and finite
    differences would report noise as a wrong backward, so :class:`GradcheckUnsupported` is raised.

    In float32 (and lower) a failing tensor is probed again at ``10 * eps``: when the two finite
    differences disagree with each other as much as with autograd, round-off explains the difference
    and the tensor is marked ``inconclusive`` instead of failed.

    With ``max_seconds``, tensors are checked most informative first (the first tensor, whose gradient
    passes through every layer's backward, then the last, nearest the loss, then spread evenly across
    depth) until the next one would not fit in the budget; the report lists the rest in ``unchecked``
    and says what it covered (:attr:`GradcheckReport.coverage`). In directional mode a first pass probes
    each tensor along its gradient only (a wrong scale or sign shows there at full size) and a second pass
    adds the random directions while time is left (the ``probes`` column says how many each tensor got).
    The table stays in ``named_parameters()`` order. At least one tensor is always checked.

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
        max_seconds: time budget of the check in seconds (``None``: check every selected tensor).

    Returns:
        A :class:`~bpkit.gradcheck.report.GradcheckReport`.

    Raises:
        BpkitConfigError: bad argument (``eps <= 0``, unknown mode, ``params`` matching nothing), or a
            batch the model cannot take (the message names the batch's shapes and the original error).
        GradcheckUnsupported: a loss finite differences cannot check: not a deterministic function of
            the weights, a manual-optimization ``training_step`` (other than truncated BPTT's), no
            trainable parameters, or a module that cannot be copied (the message says how to check by hand).

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
    if max_seconds is not None:
        max_seconds = check_float("max_seconds", max_seconds, 0.0, low_inclusive=False)

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
        evaluations = 1 + _check_deterministic(target, loss0, eps, atol, seed)

        def probe(i: int, step: float, part: str = "all") -> torch.Tensor:
            nonlocal evaluations
            (name, p), g = target.named[i], grads[i]
            # one generator per tensor: a re-probe at a smaller step sees the same directions/elements
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            with torch.no_grad():
                if mode == "directional":
                    rows = _directional(target, p, g, n_directions, step, gen, part)
                else:
                    rows, picked[name] = _elements(target, p, g, max_elements, step, gen)
            evaluations += 2 * rows.shape[0]
            return rows

        probes: dict[str, torch.Tensor] = {}
        order = informative_order(len(tensors))
        sync = max_seconds is not None and target.device.type == "cuda"
        # With a budget in directional mode, a first pass probes every tensor along its gradient only (a wrong
        # scale or sign shows at full size there), a second adds the random directions while time is left.
        two_pass = max_seconds is not None and mode == "directional" and n_directions > 1
        began = time.perf_counter()
        for done, i in enumerate(order):
            if max_seconds is not None and done > 0:
                elapsed = time.perf_counter() - start
                per_tensor = (time.perf_counter() - began) / done
                if elapsed + per_tensor > max_seconds:
                    break
            name = target.named[i][0]
            probes[name] = probe(i, eps, "gradient" if two_pass else "all")
            if sync:  # the budget is wall time: queued kernels count
                torch.cuda.synchronize(target.device)
            if progress is not None:
                progress(done + 1, len(tensors), name)
        if two_pass:
            began, first_pass = time.perf_counter(), list(probes)
            for done, name in enumerate(first_pass):
                per_tensor = (n_directions - 1) * (time.perf_counter() - began) / max(done, 1)
                if time.perf_counter() - start + (per_tensor if done else 0.0) > max_seconds:
                    break
                i = next(k for k, (n, _) in enumerate(target.named) if n == name)
                probes[name] = torch.cat([probes[name], probe(i, eps, "random")])
                if sync:
                    torch.cuda.synchronize(target.device)
        probes["__loss__"] = loss0
        host = readback(probes)  # the one device->host copy of the check (each re-probe adds one)
        loss_value = float(host["__loss__"])
        low_precision = torch.finfo(dtype).eps > torch.finfo(torch.float64).eps
        results = []
        for i, ((name, p), g) in enumerate(zip(target.named, grads)):
            if name not in probes:
                continue
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
            if low_precision and not result.passed and math.isfinite(result.rel_error):
                _mark_inconclusive(result, host[name], readback({"r": probe(i, 10 * eps)})["r"], rtol, atol, eps,
                                   str(dtype).replace("torch.", ""))
            results.append(result)
        unchecked = [name for name, _ in target.named if name not in probes]
        independence = check_batch_independence(model_or_loss_fn, batch, dtype=dtype) if batch_independence else None

    return GradcheckReport(mode=mode, eps=eps, rtol=rtol, atol=atol, dtype=str(dtype).replace("torch.", ""),
                           loss=loss_value, evaluations=evaluations, seconds=time.perf_counter() - start,
                           params=results, batch_independence=independence, unchecked=unchecked,
                           total_elements=sum(t.numel() for t in tensors), max_seconds=max_seconds,
                           notes=_notes(target))


def informative_order(n: int) -> list[int]:
    """Indices ``0 .. n-1``, most informative first: the first, the last, then evenly spread across depth.

    A wrong backward corrupts its own parameters' gradient and, through its input gradient, that of every
    tensor registered before it: the first tensor sees every wrong input gradient, the last is nearest the
    loss, and bisecting between them finds the rest early.

    Example::

        >>> informative_order(7)
        [0, 6, 3, 1, 4, 2, 5]
    """
    if n <= 0:
        return []
    order, seen = [0], {0}
    if n > 1:
        order.append(n - 1)
        seen.add(n - 1)
    spans = [(0, n - 1)]
    while spans:
        nxt = []
        for lo, hi in spans:
            if hi - lo < 2:
                continue
            mid = (lo + hi) // 2
            if mid not in seen:
                order.append(mid)
                seen.add(mid)
            nxt += [(lo, mid), (mid, hi)]
        spans = nxt
    return order + [i for i in range(n) if i not in seen]


def _check_deterministic(target: Target, loss0: torch.Tensor, eps: float, atol: float, seed: int) -> int:
    """Move every checked tensor, evaluate, move back and evaluate again: the loss must come back to ``loss0``.

    Catches randomness the re-seeding does not fix (a generator of the module's own, an environment) and
    state carried from one call to the next (a replay buffer, a call counter, a target network synced from the
    weights). Returns the number of evaluations it used.

    Raises:
        GradcheckUnsupported: when the loss does not come back (the message gives both values).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 999_983)
    with torch.no_grad():
        saved = [p.detach().clone() for _, p in target.named]
        for _, p in target.named:
            v = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=p.device, dtype=p.dtype)
            p.add_(v * (1e-2 * (p.abs().mean() + 1e-3)))
        target.loss()
        for (_, p), s in zip(target.named, saved):
            p.copy_(s)
        again = target.loss().detach()
    first, second = (float(v) for v in readback({"a": loss0.reshape(()), "b": again.reshape(())}).values())
    # beyond round-off, and large enough to move a finite-difference slope by more than atol
    tol = 1e3 * torch.finfo(loss0.dtype).eps * abs(first) + atol * eps
    if not (math.isfinite(first) and math.isfinite(second)) or abs(first - second) <= tol:
        return 2
    raise GradcheckUnsupported(
        f"training_step is not a deterministic function of the weights (dropout, randomness, environment "
        f"interaction?): the loss at the same weights was {first:.10g}, then {second:.10g} after one evaluation "
        f"elsewhere, so finite differences would measure that change, not the gradient",
        "bpkit.gradcheck.check_gradients(model.net, (x, y), loss_fn=...) on the network and a fixed batch, away "
        "from the randomness, environment steps, replay buffers or target-network syncs"
        if target.kind == "training_step" else "make the loss a pure function of the weights and the batch")


def _mark_inconclusive(result: ParamCheck, rows: Any, wider: Any, rtol: float, atol: float, eps: float,
                       dtype: str) -> None:
    """Float32: call a failure inconclusive when finite differences at ``eps`` and ``10 eps`` disagree as well.

    A wrong backward is wrong at both step sizes, where the two slopes agree with each other; round-off
    (which falls 10x at the larger step) makes them disagree with each other about as much as with autograd.
    """
    n1, n2, scale = rows[:, 0], wider[:, 0], rows[:, 2]
    analytic = rows[:, 1]
    spread = abs(n1 - n2) / (scale + atol / rtol)
    miss = abs(n2 - analytic) / (wider[:, 2] + atol / rtol)
    if all(map(math.isfinite, n2)) and (spread.max() > rtol or miss.max() <= rtol):
        result.inconclusive = True
        result.reason = (f"inconclusive in {dtype}: finite differences at eps={eps:g} and {10 * eps:g} disagree "
                         f"with each other (rel. {spread.max():.2g}) as much as with autograd (rel. "
                         f"{result.rel_error:.2g}): round-off, not the backward; check in float64 to decide")


def _notes(target: Target) -> list[str]:
    notes = []
    if target.kind == "training_step" and target.tbptt is not None:
        index, count, _ = target.tbptt
        notes.append(f"truncated BPTT: checked chunk {index + 1} of {count} (the first with a loss), from the "
                     f"detached state the chunks before it leave")
    return notes


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
                 gen: torch.Generator, part: str = "all") -> torch.Tensor:
    """Rows ``(numeric, autograd, scale, |grad|)``, one per direction, left on the device.

    ``part``: ``all`` (the gradient's direction, then random ones up to ``n``), ``gradient`` (the first
    direction only) or ``random`` (the rest only; the same directions as ``all`` draws).
    """
    orig = p.detach().clone()
    gnorm = torch.zeros((), dtype=p.dtype, device=p.device) if g is None else g.norm()
    dirs = []
    if g is not None:
        dirs.append(g / gnorm.clamp_min(torch.finfo(p.dtype).tiny))
    while len(dirs) < (1 if part == "gradient" else n):
        v = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=p.device, dtype=p.dtype)
        dirs.append(v / v.norm())
    if part == "random":
        dirs = dirs[1:]
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
