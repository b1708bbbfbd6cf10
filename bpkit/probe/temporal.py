"""TemporalProbe: gradient flow through time, the framework-free engine of bpkit's temporal monitoring (no Lightning
import here).

For every watched module that maps a sequence to a sequence (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``, or any module
named by a glob), on the steps you choose, the probe measures the norm of the loss's gradient with respect to the
module's input at every time step, through a tensor hook on that input:

- the **profile**: those norms from the last time step back, divided by the norm at the last step
  (``profile[0] == 1``; ``profile[k]``: the gradient ``k`` steps before the last, relative to the last);
- the **memory horizon**: how many steps, counting the last one, the gradient stays at or above
  ``horizon_fraction`` (default 0.1, one order of magnitude) of its value at the last step before it first falls
  below; the whole length when it never does;
- the **truncation boundary** (truncated BPTT): the norm of the gradient that reached the detached state a chunk
  started from, relative to the chunk's last-step input gradient: how much gradient the truncation cuts off;
- the rules: ``vanishing`` when the gradient at the first time step is below ``vanishing`` (1e-5) of the one at
  the last, ``exploding`` when anywhere going back it exceeds ``exploding`` (1e3) times it, for ``patience``
  consecutive flushes; ``where`` names the module.

Hooks exist only between :meth:`TemporalProbe.attach` and :meth:`TemporalProbe.detach`: other steps run with no
hook, no extra kernel and no host read. An input that does not require grad (the data fed to the first
recurrent layer) is replaced, on those steps only, by a detached leaf copy that requires grad, so that its gradient
exists; the parameters' gradients are unchanged (the training result is the same with and without the probe).

:func:`plot_profile` draws one step's profile (the ``time/grad/<m>`` image) and :func:`plot_heatmap` the report's
heatmap (time step back x training step) from the run record's ``temporal`` entries (:data:`RECORD_ENTRY`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import torch
from torch import nn

from bpkit.alert import Alert
from bpkit.errors import BpkitConfigError, check_float, check_int
from bpkit.stats.readback import readback
from bpkit.record import ENTRY_TEMPORAL

RECORD_ENTRY = ENTRY_TEMPORAL
"""The run-record entry type the Lightning callback writes at each log step: ``{"fraction": f, "modules": {name:
{"profile": [...], "horizon": h, "boundary": b or None, "last_norm": n}}}`` (``profile``: relative norms from the
last time step back)."""

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a flat float64 tensor over the ranks and returns the sum (in place or a new tensor)."""


@dataclass
class _Call:
    """One forward call of a watched module on a watched step."""

    length: int
    continues: bool  # its initial state carries gradient from the previous call (a chain of chunks)
    sq: torch.Tensor | None = None  # (T,) squared gradient norm per time step, summed over batch and features
    boundary: torch.Tensor | None = None  # squared norm of the gradient reaching a detached initial state


@dataclass(frozen=True)
class TemporalProfile:
    """What one flush measured for one module.

    Attributes:
        profile: gradient norms from the last time step back, relative to the last step's (``profile[0] == 1``).
        last_norm: the gradient norm at the last time step (summed over the batch and the features).
        horizon: steps, counting the last one, the gradient stays >= the horizon fraction of its last value.
        boundary: gradient norm at the truncation boundary relative to ``last_norm`` (``None``: not measured).
    """

    profile: np.ndarray
    last_norm: float
    horizon: int
    boundary: float | None

    @property
    def first_ratio(self) -> float:
        """The gradient at the first time step over the one at the last."""
        return float(self.profile[-1])

    @property
    def max_ratio(self) -> float:
        """The largest gradient going back, over the one at the last step."""
        return float(np.max(self.profile))

    def to_dict(self) -> dict[str, Any]:
        return {"profile": [_json_float(v) for v in self.profile], "horizon": int(self.horizon),
                "boundary": None if self.boundary is None else _json_float(self.boundary),
                "last_norm": _json_float(self.last_norm)}


def memory_horizon(profile: Sequence[float] | np.ndarray, fraction: float = 0.1) -> int:
    """How many steps, counting the last one, the gradient stays at or above ``fraction`` of its value at the last
    step before it first falls below (the whole length when it never does).

    Args:
        profile: gradient norms from the last time step back (any scale: divided by ``profile[0]``).
        fraction: the fraction of the last step's gradient (0 < fraction <= 1).

    Example::

        >>> memory_horizon([1.0, 0.5, 0.2, 0.05, 0.5], fraction=0.1)
        3
        >>> memory_horizon([2.0, 4.0, 8.0])
        3
    """
    p = np.asarray(profile, dtype=np.float64)
    if p.size == 0 or not p[0] > 0:
        return 0
    below = np.flatnonzero(~(p / p[0] >= fraction))  # NaN counts as below
    return int(below[0]) if below.size else int(p.size)


class TemporalRules:
    """``vanishing`` and ``exploding`` through time, over the profiles of successive flushes (host-side state).

    A module's gradient vanishes through time when the gradient at the first time step is below ``vanishing``
    times the one at the last, and explodes when somewhere going back it is above ``exploding`` times it. An alert
    needs the condition on ``patience`` consecutive checks spanning at least ``min_steps`` training steps (from the
    first of them; default 0: the checks alone). A freshly initialised RNN can start with a vanishing profile and
    learn its way out (with Adam, an LSTM with forget-gate bias 0 on a 30-step lag does in about 70 steps, a GRU
    at T=40 with an unlucky init in about 80): raise ``min_steps`` to hear only about a model that stays there.
    An alert is raised once; the rule re-arms when the condition clears.

    Args:
        vanishing: the ratio first/last below which the gradient vanishes (0 < v < 1).
        exploding: the ratio max/last above which the gradient explodes (> 1).
        patience: consecutive checks the condition must hold.
        min_steps: training steps the condition must have held, from the first of those checks (>= 0).

    Example::

        >>> rules = TemporalRules(patience=2, min_steps=10)
        >>> [len(rules.update(s, {"lstm": (1e-7, 1.0)})) for s in (9, 19, 29)]
        [0, 1, 0]
        >>> [[a.kind for a in rules.update(s, {"lstm": (1.0, 1e4)})] for s in (39, 49)]
        [[], ['exploding']]
    """

    def __init__(self, vanishing: float = 1e-5, exploding: float = 1e3, patience: int = 3, min_steps: int = 0
                 ) -> None:
        self.vanishing = check_float("vanishing", vanishing, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        self.exploding = check_float("exploding", exploding, 1.0, low_inclusive=False)
        self.patience = check_int("patience", patience, 1)
        self.min_steps = check_int("min_steps", min_steps, 0)
        self._run: dict[str, int] = {}
        self._since: dict[str, int] = {}
        self._latched: set[str] = set()

    def update(self, step: int, ratios: Mapping[str, tuple[float, float]]) -> list[Alert]:
        """One check: ``ratios`` maps a module to (first/last, max/last) of its profile. Returns new alerts."""
        alerts: list[Alert] = []
        for name, (first, top) in ratios.items():
            for kind, hit, value, threshold in (("vanishing", first < self.vanishing, first, self.vanishing),
                                                ("exploding", top > self.exploding, top, self.exploding)):
                key = f"{kind}:{name}"
                if not hit:
                    self._run[key] = 0
                    self._since.pop(key, None)
                    self._latched.discard(key)
                    continue
                self._run[key] = self._run.get(key, 0) + 1
                since = self._since.setdefault(key, int(step))
                if (self._run[key] >= self.patience and int(step) - since >= self.min_steps
                        and key not in self._latched):
                    self._latched.add(key)
                    alerts.append(Alert(kind, int(step), name, float(value), threshold,
                                        _message(kind, name, value, int(step) - since)))
        return alerts

    def state_dict(self) -> dict[str, Any]:
        return {"run": dict(self._run), "since": dict(self._since), "latched": sorted(self._latched)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._run = {str(k): int(v) for k, v in dict(state_dict.get("run", {})).items()}
        self._since = {str(k): int(v) for k, v in dict(state_dict.get("since", {})).items()}
        self._latched = set(state_dict.get("latched", ()))


def _message(kind: str, name: str, value: float, steps: int) -> str:
    held = f" (for {steps} training steps now)" if steps > 0 else ""
    if kind == "vanishing":
        return (f"gradient vanishing through time in {name}: the loss hears the first time step at {value:.1e} of "
                f"the last{held}, so the model cannot learn dependencies that long. Try an LSTM/GRU, a forget-gate "
                "bias of 1 (LSTM), an orthogonal recurrent init with spectral radius near 1, shorter sequences, or "
                "attention/skip connections through time.")
    return (f"gradient exploding through time in {name}: going back from the last time step the gradient grows "
            f"to {value:.1e} times its value there{held}. Scale the recurrent weights down (spectral radius <= 1, "
            "orthogonal init), clip gradients (GradientClipping), or use an LSTM/GRU.")


class TemporalProbe:
    r"""Measure the loss's gradient with respect to the input of sequence modules at every time step, on the steps
    you choose: its profile from the last time step back, the memory horizon, the gradient at a truncation boundary,
    and ``vanishing``/``exploding`` alerts through time.

    Per watched module (name as in ``named_modules()``), :meth:`flush` returns ``time/horizon/<m>`` (steps),
    ``time/grad_ratio/<m>`` (first step over last), ``time/grad_max_ratio/<m>`` (largest going back over last) and,
    when a chunk started from a given detached state (truncated BPTT), ``time/boundary/<m>``. The profiles are in
    :attr:`profiles`, the alerts of that flush in :attr:`new_alerts`, all so far in :attr:`alerts`.

    Several forward calls of a module on one step are understood as follows: a call whose initial state (``hx``)
    carries gradient continues the previous call (truncated BPTT's chunks re-run over ``k2`` steps) and their
    profiles are joined in time; calls that start afresh (micro-batches, truncated BPTT's chunks with ``k2 = k1``)
    are summed (squared norms) when they have the same length as the last one that received a gradient. Calls
    that got no gradient (a chunk with no loss) are left out.

    Args:
        model: the model to watch, or ``None`` to give it later to :meth:`bind`.
        modules: ``"auto"`` (every ``nn.RNN``/``nn.LSTM``/``nn.GRU``) or a module name glob, or a list of globs
            (``fnmatch``); a matched module's first argument is its input sequence.
        time_dim: the time dimension of the input of a module named by a glob that is not an ``nn.RNNBase``
            (``nn.RNNBase`` modules follow their ``batch_first``; an unbatched 2-D input has time at 0).
        horizon_fraction: the memory horizon counts the steps whose gradient is at least this fraction of the
            last step's (0 < f <= 1; default 0.1: within one order of magnitude).
        vanishing: alert when the first step's gradient is below this fraction of the last step's (default 1e-5).
        exploding: alert when going back the gradient grows above this many times the last step's (default 1e3).
        patience: consecutive flushes a condition must hold before its alert.
        min_steps: training steps (the ``step`` given to :meth:`attach`) a condition must have held, from the
            first of those flushes, before its alert (a fresh RNN often starts vanishing and learns its way out).
        boundary: measure the gradient reaching a detached initial state given to an ``nn.RNNBase`` (``hx``).
        reduce: how :meth:`flush` sums the squared norms over the ranks when the world size is > 1.
        world_size: the number of ranks (default: ``torch.distributed``'s, else 1).
        who: the name in warnings.

    Raises:
        BpkitConfigError: for a bad argument, or (here or in :meth:`bind`) a glob matching no module.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from bpkit.probe.temporal import TemporalProbe
        >>> _ = torch.manual_seed(0)
        >>> model = nn.ModuleDict({"rnn": nn.RNN(2, 16, batch_first=True), "head": nn.Linear(16, 1)})
        >>> with torch.no_grad():  # recurrent weights orthogonal x 0.3: spectral radius 0.3
        ...     _ = model.rnn.weight_hh_l0.copy_(torch.linalg.qr(torch.randn(16, 16))[0] * 0.3)
        >>> probe = TemporalProbe(model, patience=1, min_steps=0)
        >>> with probe.watch(step=0):  # hooks on for this step only
        ...     out, _ = model.rnn(torch.randn(8, 20, 2))
        ...     model.head(out[:, -1]).pow(2).mean().backward()
        >>> metrics = probe.flush()  # the one host read
        >>> metrics["time/horizon/rnn"], metrics["time/grad_ratio/rnn"] < 1e-5
        (2.0, True)
        >>> [(a.kind, a.where) for a in probe.new_alerts]
        [('vanishing', 'rnn')]
        >>> len(model.rnn._forward_pre_hooks)
        0
    """

    def __init__(self, model: nn.Module | None = None, modules: str | Sequence[str] = "auto", time_dim: int = 1,
                 horizon_fraction: float = 0.1, vanishing: float = 1e-5, exploding: float = 1e3, patience: int = 3,
                 min_steps: int = 0, boundary: bool = True, *, reduce: Reduce | None = None,
                 world_size: int | None = None, who: str = "bpkit TemporalProbe") -> None:
        if isinstance(modules, str) and modules:
            modules = "auto" if modules == "auto" else [modules]
        elif (isinstance(modules, Sequence) and not isinstance(modules, str) and modules
              and all(isinstance(m, str) and m for m in modules)):
            modules = list(modules)
        else:
            raise BpkitConfigError("modules", modules, '"auto", a module name glob or a non-empty list of globs')
        self.modules: str | list[str] = modules
        self.time_dim = check_int("time_dim", time_dim, 0)
        self.horizon_fraction = check_float("horizon_fraction", horizon_fraction, 0.0, 1.0, low_inclusive=False)
        if not isinstance(boundary, bool):
            raise BpkitConfigError("boundary", boundary, "true or false")
        self.boundary = boundary
        self.rules = TemporalRules(vanishing, exploding, patience, min_steps)
        if reduce is not None and not callable(reduce):
            raise BpkitConfigError("reduce", reduce, "a callable that sums a tensor over the ranks, or None")
        self.reduce = reduce
        if world_size is not None:
            check_int("world_size", world_size)
        self.world_size = world_size
        self.who = who

        self.alerts: list[Alert] = []
        """Every alert raised so far (kept in :meth:`state_dict`)."""
        self.new_alerts: list[Alert] = []
        """The alerts raised by the last :meth:`flush`."""
        self.profiles: dict[str, TemporalProfile] = {}
        """The profiles measured by the last :meth:`flush`, per module."""
        self.names: list[str] = []
        """The watched module names, in ``named_modules()`` order."""
        self.hook_calls = 0
        """Forward calls measured (a test and debugging aid)."""

        self._targets: list[tuple[str, nn.Module]] = []
        self._handles: list[Any] = []
        self._calls: dict[str, list[_Call]] = {}
        self._step: int | None = None
        self._warned: set[str] = set()
        self._bound = False
        if model is not None:
            self.bind(model)

    # ----------------------------------------------------------------- model
    def bind(self, model: nn.Module) -> list[str]:
        """Choose the modules of ``model`` to watch (hooks are attached only by :meth:`attach`); rules and alerts
        are kept. Returns the watched names.

        Raises:
            BpkitConfigError: ``model`` is not a ``torch.nn.Module``, or a glob matches no module.
        """
        if not isinstance(model, nn.Module):
            raise BpkitConfigError("model", type(model).__name__, "a torch.nn.Module")
        self.reset()
        named = list(model.named_modules())
        if self.modules == "auto":
            chosen = [n for n, m in named if isinstance(m, nn.RNNBase)]
            if not chosen:
                warnings.warn(f"{self.who}: modules='auto' found no nn.RNN/LSTM/GRU in the model; nothing is "
                              "monitored. Name sequence modules with a glob (modules='encoder.*').", UserWarning,
                              stacklevel=2)
        else:
            chosen = []
            for glob in self.modules:
                hits = [n for n, _ in named if fnmatchcase(n, glob)]
                if not hits:
                    some = ", ".join(n or "''" for n, _ in named[:12]) + (", ..." if len(named) > 12 else "")
                    raise BpkitConfigError(
                        "modules", glob, f"a glob matching module names of the model ({len(named)} modules: {some})")
                chosen += [n for n in hits if n not in chosen]
        found = dict(named)
        order = {n: i for i, (n, _) in enumerate(named)}
        chosen.sort(key=order.__getitem__)
        self.names = chosen
        self._targets = [(n, found[n]) for n in chosen]
        self._bound = True
        return list(chosen)

    # ----------------------------------------------------------------- hooks
    @property
    def pending_step(self) -> int | None:
        """The step whose gradients are collected and not flushed yet (``None``: nothing pending)."""
        return self._step

    @property
    def attached(self) -> bool:
        """Are the hooks on the model now?"""
        return bool(self._handles)

    def attach(self, step: int) -> None:
        """Put the hooks on the watched modules for the forward/backward passes of ``step`` (again for the same
        step is allowed: the next micro-batch or chunk).

        Raises:
            RuntimeError: no model was bound, or another step was not flushed.
        """
        if not self._bound:
            raise RuntimeError(f"{self.who}: no model to watch: pass it to TemporalProbe(model) or bind(model) "
                               "before attach()")
        if self._step is not None and self._step != step:
            raise RuntimeError(f"{self.who}: step {self._step} is not flushed yet; call flush() before "
                               f"attach({step})")
        if not self._targets:
            return
        if self._step is None:
            self._step = int(step)
            self._calls = {}
        if self._handles:
            return
        for name, module in self._targets:
            self._handles.append(module.register_forward_pre_hook(functools.partial(self._pre_hook, name),
                                                                  with_kwargs=True))

    def detach(self) -> None:
        """Remove the hooks (what was collected is kept for :meth:`flush`; tensor hooks already placed on this
        step's graph still fire in its backward)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def watch(self, step: int) -> Iterator[TemporalProbe]:
        """``with probe.watch(step): ...``: :meth:`attach` on entry, :meth:`detach` on exit. Run the forward
        pass and the backward pass inside (or at least the forward: the tensor hooks fire in the backward)."""
        self.attach(step)
        try:
            yield self
        finally:
            self.detach()

    def reset(self) -> None:
        """Remove the hooks and drop what was collected and not flushed (rules and alerts are kept)."""
        self.detach()
        self._step = None
        self._calls = {}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"{self.who}: {message}", UserWarning, stacklevel=4)

    def _time_dim(self, module: nn.Module, x: torch.Tensor) -> int:
        if isinstance(module, nn.RNNBase):
            return 0 if x.dim() == 2 or not module.batch_first else 1
        return self.time_dim

    def _pre_hook(self, name: str, module: nn.Module, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        # no gradient to measure (evaluation, no_grad), or activation checkpointing recomputing inside backward
        if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return None
        in_args = bool(args)
        x = args[0] if in_args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = type(x).__name__ if not isinstance(x, torch.Tensor) else f"a {x.dtype} tensor"
            self._warn_once(f"input:{name}", f"the input of {name or 'the model'} is {what}, not a floating-point "
                            "tensor (a PackedSequence or token ids): its gradient through time is not measured.")
            return None
        tdim = self._time_dim(module, x)
        if x.dim() <= tdim or x.dim() < 2:
            self._warn_once(f"shape:{name}", f"the input of {name or 'the model'} has shape {tuple(x.shape)}, with "
                            f"no time dimension {tdim}: its gradient through time is not measured (set time_dim).")
            return None
        watched = x.view_as(x) if x.requires_grad else x.detach().requires_grad_()
        call = _Call(length=int(x.shape[tdim]), continues=False)
        dims = [d for d in range(x.dim()) if d != tdim]
        watched.register_hook(functools.partial(_on_input_grad, call, dims))
        if in_args:
            args = (watched, *args[1:])
        else:
            kwargs = {**kwargs, "input": watched}
        if isinstance(module, nn.RNNBase):
            args, kwargs = self._watch_state(call, args, kwargs)
        self._calls.setdefault(name, []).append(call)
        self.hook_calls += 1
        return args, kwargs

    def _watch_state(self, call: _Call, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        in_args = len(args) > 1
        hx = args[1] if in_args else kwargs.get("hx")
        tensors = [hx] if isinstance(hx, torch.Tensor) else list(hx) if isinstance(hx, (tuple, list)) else []
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        if not tensors:
            return args, kwargs
        if any(t.requires_grad for t in tensors):
            call.continues = True  # the state carries gradient on to the previous chunk: not a boundary
            return args, kwargs
        if not self.boundary or not all(t.is_floating_point() for t in tensors):
            return args, kwargs
        leaves = [t.detach().requires_grad_() for t in tensors]
        for leaf in leaves:
            leaf.register_hook(functools.partial(_on_state_grad, call))
        new_hx: Any = leaves[0] if isinstance(hx, torch.Tensor) else type(hx)(leaves)
        if in_args:
            return (args[0], new_hx, *args[2:]), kwargs
        return args, {**kwargs, "hx": new_hx}

    # ----------------------------------------------------------------- the host read
    def flush(self, reduce: Reduce | None = None) -> dict[str, float]:
        """Read the gradients of the pending step back (one host read), compute the profiles, run the rules, and
        start a new step. Removes the hooks if they are still attached.

        Returns:
            ``{metric: float}`` (empty when nothing was measured). The profiles are then in :attr:`profiles` and
            the new alerts in :attr:`new_alerts` (and appended to :attr:`alerts`).
        """
        self.detach()
        self.profiles, self.new_alerts = {}, []
        step, self._step = self._step, None
        calls, self._calls = self._calls, {}
        if step is None:
            return {}
        packed: dict[str, torch.Tensor] = {}
        for name in self.names:
            chosen = _combine(calls.get(name, []))
            if chosen is not None:
                packed[name] = chosen
        if not packed:
            return {}
        world = self._world_size()
        if world > 1:
            flat = torch.cat([t.reshape(-1) for t in packed.values()])
            flat = (reduce or self.reduce or _all_reduce_sum)(flat)
            sizes = [t.numel() for t in packed.values()]
            packed = dict(zip(packed, flat.split(sizes)))
        host = readback(packed)
        scalars: dict[str, float] = {}
        ratios: dict[str, tuple[float, float]] = {}
        for name, values in host.items():
            sq, bound = values[:-1], values[-1]
            norms = np.sqrt(np.maximum(sq[::-1], 0.0))
            last = float(norms[0])
            if not last > 0 or not math.isfinite(last):
                self._warn_once(f"zero:{name}", f"the gradient at the last time step of {name or 'the model'} is "
                                f"{last}: no profile on step {step} (is there a loss on the last step?).")
                continue
            rel = norms / last
            boundary = None if math.isnan(bound) else float(math.sqrt(max(bound, 0.0)) / last)
            prof = TemporalProfile(rel, last, memory_horizon(rel, self.horizon_fraction), boundary)
            self.profiles[name] = prof
            scalars[f"time/horizon/{name}"] = float(prof.horizon)
            scalars[f"time/grad_ratio/{name}"] = prof.first_ratio
            scalars[f"time/grad_max_ratio/{name}"] = prof.max_ratio
            if boundary is not None:
                scalars[f"time/boundary/{name}"] = boundary
            ratios[name] = (prof.first_ratio, prof.max_ratio)
        self.new_alerts = self.rules.update(step, ratios)
        self.alerts.extend(self.new_alerts)
        return scalars

    def record(self) -> dict[str, Any]:
        """The last flush's profiles as a JSON-able run-record entry (type :data:`RECORD_ENTRY`)."""
        return {"fraction": self.horizon_fraction, "modules": {n: p.to_dict() for n, p in self.profiles.items()}}

    def _world_size(self) -> int:
        if self.world_size is not None:
            return self.world_size
        dist = torch.distributed
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """The rules' state and the alerts: plain data."""
        return {"rules": self.rules.state_dict(), "alerts": [a.to_dict() for a in self.alerts]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.rules.load_state_dict(state_dict.get("rules", {}))
        self.alerts = [Alert.from_dict(a) for a in state_dict.get("alerts", [])]


def _on_input_grad(call: _Call, dims: list[int], grad: torch.Tensor) -> None:
    sq = grad.detach().to(torch.promote_types(grad.dtype, torch.float32)).pow(2).sum(dim=dims)
    call.sq = sq if call.sq is None else call.sq + sq


def _on_state_grad(call: _Call, grad: torch.Tensor) -> None:
    sq = grad.detach().to(torch.promote_types(grad.dtype, torch.float32)).pow(2).sum()
    call.boundary = sq if call.boundary is None else call.boundary + sq


def _combine(calls: list[_Call]) -> torch.Tensor | None:
    """One module's calls on one step -> a float64 vector: squared norms per time step (oldest first), then the
    squared boundary norm (NaN when not measured); ``None`` when no call got a gradient."""
    chains: list[list[_Call]] = []
    for call in calls:
        if call.continues and chains:
            chains[-1].append(call)
        else:
            chains.append([call])
    joined: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
    for chain in chains:
        while chain and chain[-1].sq is None:  # trailing forward-only calls (no loss there)
            chain.pop()
        if not chain:
            continue
        ref = next(c.sq for c in chain if c.sq is not None)
        parts = [c.sq if c.sq is not None else ref.new_zeros(c.length) for c in chain]
        joined.append((sum(c.length for c in chain), torch.cat(parts) if len(parts) > 1 else parts[0],
                       chain[0].boundary))
    if not joined:
        return None
    length = joined[-1][0]
    same = [j for j in joined if j[0] == length]
    sq = torch.stack([s for _, s, _ in same]).sum(0).to(torch.float64)
    bounds = [b for _, _, b in same if b is not None]
    bound = (torch.stack(bounds).sum().to(torch.float64) if bounds
             else torch.tensor(float("nan"), dtype=torch.float64, device=sq.device))
    return torch.cat([sq, bound.reshape(1).to(sq.device)])


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def _json_float(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------- plots (matplotlib, Agg; imported on use)
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=80)
    FigureCanvasAgg(fig)
    return fig


def plot_profile(profile: TemporalProfile, name: str, step: int, fraction: float = 0.1) -> Any:
    """One step's profile as a line plot (``log10`` gradient norm relative to the last step, against the steps
    back), with the horizon fraction drawn: the ``time/grad/<m>`` image. Returns a matplotlib ``Figure``.

    Example::

        >>> import numpy as np
        >>> p = TemporalProfile(np.array([1.0, 0.3, 0.05]), 2.0, 2, None)
        >>> fig = plot_profile(p, "rnn", step=9)
        >>> fig.axes[0].get_xlabel()
        'time steps back from the last'
    """
    fig = _figure(4.0, 2.6)
    ax = fig.add_subplot(1, 1, 1)
    rel = np.where(profile.profile > 0, profile.profile, np.nan)
    ax.plot(np.arange(len(rel)), np.log10(rel), lw=1.5)
    ax.axhline(math.log10(fraction), color="grey", lw=0.8, ls="--")
    ax.set_xlabel("time steps back from the last")
    ax.set_ylabel("log10 |dL/dx_t| / last")
    ax.set_title(f"{name or 'model'}: step {step}, horizon {profile.horizon}", fontsize=9)
    fig.subplots_adjust(left=0.18, bottom=0.18, right=0.97, top=0.88)  # tight_layout would cost ~20% more
    return fig


def heatmap_data(entries: Iterable[Mapping[str, Any]], module: str | None = None
                 ) -> tuple[str, np.ndarray, np.ndarray] | None:
    """The report heatmap's data from run-record entries: ``(module, steps, log10 relative norms)`` with one row
    per logged training step and one column per time step back (NaN where a step's profile is shorter). Reads the
    entries of type :data:`RECORD_ENTRY`; ``module``: which one (default: the first found). ``None`` if none."""
    rows: list[tuple[int, list[float]]] = []
    for entry in entries:
        if entry.get("type") != RECORD_ENTRY:
            continue
        mods = (entry.get("data") or {}).get("modules") or {}
        if module is None and mods:
            module = next(iter(mods))
        data = mods.get(module) if module is not None else None
        if not isinstance(data, Mapping) or not isinstance(data.get("profile"), list):
            continue
        rows.append((int(entry.get("step", 0)), [np.nan if v is None else float(v) for v in data["profile"]]))
    if not rows or module is None:
        return None
    width = max(len(r) for _, r in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, (_, r) in enumerate(rows):
        vals = np.asarray(r, dtype=np.float64)
        grid[i, :len(r)] = np.log10(np.where(vals > 0, vals, np.nan))
    return module, np.asarray([s for s, _ in rows], dtype=np.int64), grid


def plot_heatmap(entries: Iterable[Mapping[str, Any]], module: str | None = None) -> Any:
    """The report's temporal heatmap: ``log10`` of the gradient norm relative to the last time step, time steps
    back (x) by training step (y), from the run record's ``temporal`` entries (:data:`RECORD_ENTRY`, written by
    ``TemporalGradientMonitor``). Returns a matplotlib ``Figure`` (Agg), or ``None`` when the record has none.

    Example::

        >>> entries = [{"type": "temporal", "step": s, "data": {"fraction": 0.1, "modules": {"rnn": {
        ...     "profile": [1.0, 0.1 ** (s + 1), 0.01 ** (s + 1)], "horizon": 1, "boundary": None,
        ...     "last_norm": 1.0}}}} for s in (9, 19)]
        >>> fig = plot_heatmap(entries)
        >>> fig.axes[0].get_title()
        'rnn: log10 gradient through time (relative to the last step)'
        >>> plot_heatmap([]) is None
        True
    """
    data = heatmap_data(list(entries), module)
    if data is None:
        return None
    name, steps, grid = data
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    finite = grid[np.isfinite(grid)]
    low = float(min(finite.min(), -1.0)) if finite.size else -8.0
    high = float(max(finite.max(), 0.0)) if finite.size else 0.0
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=low, vmax=high, interpolation="nearest",
                   extent=(-0.5, grid.shape[1] - 0.5, -0.5, len(steps) - 0.5))
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int))
    ax.set_yticks(ticks)
    ax.set_yticklabels([str(steps[i]) for i in ticks])
    ax.set_xlabel("time steps back from the last")
    ax.set_ylabel("training step")
    ax.set_title(f"{name or 'model'}: log10 gradient through time (relative to the last step)", fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 relative norm")
    fig.tight_layout()
    return fig
