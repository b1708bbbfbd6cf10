"""ActivationProbe: the framework-free engine of bpkit's activation monitoring (no Lightning import here).

It owns everything :class:`bpkit.callbacks.ActivationMonitor` measures: which modules are watched, the forward
hooks (and the tensor hooks on their outputs' gradients), the statistics accumulated on the device
(:mod:`bpkit.stats.activations`), the one host read per log step, the rules that raise ``dead``, ``saturated``
and ``unused`` alerts (:mod:`bpkit.detect.activations`) and the metric names. A plain PyTorch loop, Lightning
Fabric and the Lightning callback drive the same probe.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import torch
from torch import nn

from bpkit.alert import Alert
from bpkit.detect.activations import ActivationRules
from bpkit.errors import BpkitConfigError, check_bool, check_float, check_int
from bpkit.stats.activations import (ActivationStats, ModuleStats, is_auto_module, output_tensor, saturation_kind,
                                     unit_dim)
from bpkit.stats.readback import readback

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a flat float64 tensor over the ranks and returns the sum (in place or a new tensor)."""


class ActivationProbe:
    r"""Watch the outputs of chosen modules (and optionally their gradients) on the steps you choose: mean, std,
    fraction of exact zeros, dead units, saturation of tanh/sigmoid and a fixed-range histogram per module, all
    computed on the device and read back to the host once per :meth:`flush`.

    Hooks exist only between :meth:`attach` and :meth:`detach` (or inside ``with probe.watch(step):``): the
    forward passes of other steps, evaluation and inference run with no hook at all, and nothing is left on the
    model after :meth:`detach`. Several forward/backward passes of one step (the micro-batches of gradient
    accumulation) are summed until :meth:`flush`. A forward run inside backward (activation checkpointing
    recomputing) is not counted twice.

    :meth:`flush` returns ``{metric: float}`` per module name as in ``named_modules()``: ``act/mean/<m>``,
    ``act/std/<m>``, ``act/zero_frac/<m>``, ``act/dead_frac/<m>``, ``act/saturated_frac/<m>`` (tanh/sigmoid
    only); with ``gradients=True`` the same for the gradient w.r.t. each module output under ``act_grad/``. The
    histograms of that flush are in :attr:`last_histograms` (``{"act/hist/<m>": (counts, edges)}``, for gradients
    ``act_grad/hist/<m>`` of ``log10|g|``), the alerts it raised in :attr:`new_alerts`, and every alert so far in
    :attr:`alerts`.

    A module whose input is the same for every sample of the batch (all zeros: a covariate or feature the data
    does not have) carries nothing from the data; it is reported once as ``unused``, not as dead or saturated.

    Under ``torch.distributed`` (world size > 1) :meth:`flush` sums the statistics over the ranks (one
    all-reduce, or the ``reduce`` you give), so they equal one process's statistics on the global batch: a unit
    is dead when it is zero on every rank, and output gradients are divided by the world size (each rank's loss
    averages its own part of the batch). Every rank must then call :meth:`flush` at the same steps.

    Args:
        model: the model to watch, or ``None`` to give it later to :meth:`bind`.
        modules: ``"auto"`` (every activation module and every Linear, Conv and RNN/LSTM/GRU layer) or a
            module name glob, or a list of globs (``fnmatch``, e.g. ``"blocks.*.act"``).
        histograms: keep a histogram per module.
        bins: histogram bins.
        hist_range: ``(low, high)`` of the linear histogram of unbounded outputs (tanh uses (-1, 1), sigmoid
            (0, 1)); outliers are counted in the edge bins.
        dead_threshold: alert ``dead`` when more than this fraction of a module's units output exactly zero
            for a whole batch (0..1).
        saturation_threshold: tanh is saturated where ``|y| > t``, sigmoid where ``y > t`` or ``y < 1 - t``
            (0.5 < t < 1).
        saturated_fraction: alert ``saturated`` when more than this fraction of a tanh/sigmoid module's
            outputs are saturated (0..1).
        patience: consecutive flushes over a threshold before an alert.
        gradients: also measure the gradient w.r.t. each module output (tensor hooks; call ``backward`` before
            :meth:`flush`).
        histogram_samples: histogram a strided sample of about this many elements of each output larger than that
            (:func:`bpkit.stats.sampling.strided_sample`, a new offset at each call), counts scaled to the whole
            output: estimates, at a fraction of the cost of a histogram's full pass. ``None`` (the default) counts
            every element. Mean, std, zeros, dead units and saturation are always exact.
        reduce: how :meth:`flush` sums the packed statistics over the ranks when the world size is > 1
            (default: ``torch.distributed.all_reduce``); ignored with one process.
        world_size: the number of ranks whose batches make one step (default: ``torch.distributed``'s world
            size when it is initialized, else 1).
        who: the name in warnings.

    Raises:
        BpkitConfigError: for a bad argument, or (here or in :meth:`bind`) a glob matching no module; the
            message names the glob and some module names.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from bpkit import ActivationProbe
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = model[0].bias.data.fill_(-100.0)  # a planted fault: every hidden ReLU unit is dead
        >>> probe = ActivationProbe(model, patience=2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for step in range(3):
        ...     with probe.watch(step):  # hooks on for this step only
        ...         loss = model(torch.randn(16, 4)).pow(2).mean()
        ...         loss.backward()
        ...     opt.step()
        ...     opt.zero_grad()
        ...     metrics = probe.flush()  # the one host read
        >>> metrics["act/dead_frac/1"], metrics["act/zero_frac/1"]
        (1.0, 1.0)
        >>> [(a.kind, a.step, a.where) for a in probe.alerts]
        [('dead', 1, '1')]
        >>> sorted(probe.last_histograms)
        ['act/hist/0', 'act/hist/1', 'act/hist/2']
        >>> [len(m._forward_hooks) for m in model.modules()]
        [0, 0, 0, 0]
    """

    def __init__(self, model: nn.Module | None, modules: str | Sequence[str] = "auto", histograms: bool = True,
                 bins: int = 64, hist_range: tuple[float, float] = (-4.0, 4.0), dead_threshold: float = 0.5,
                 saturation_threshold: float = 0.99, saturated_fraction: float = 0.5, patience: int = 3,
                 gradients: bool = False, histogram_samples: int | None = None, *, reduce: Reduce | None = None,
                 world_size: int | None = None, who: str = "bpkit ActivationProbe") -> None:
        if isinstance(modules, str) and modules:
            modules = [modules] if modules != "auto" else "auto"
        elif (isinstance(modules, Sequence) and not isinstance(modules, str) and modules
              and all(isinstance(m, str) and m for m in modules)):
            modules = list(modules)
        else:
            raise BpkitConfigError("modules", modules, '"auto", a module name glob or a non-empty list of globs')
        self.modules: str | list[str] = modules
        self._histograms_on = check_bool("histograms", histograms)
        self.bins = check_int("bins", bins)
        self.saturation_threshold = check_float("saturation_threshold", saturation_threshold, 0.5, 1.0,
                                                low_inclusive=False, high_inclusive=False)
        self.gradients = check_bool("gradients", gradients)
        self.rules = ActivationRules(dead_threshold, saturated_fraction, patience)
        checked = ActivationStats([], bins=self.bins, hist_range=hist_range, histogram_samples=histogram_samples)
        self.hist_range, self.histogram_samples = checked.hist_range, checked.histogram_samples  # validated now
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
        self._untaken: list[Alert] = []
        """The alerts raised by the last :meth:`flush`."""
        self.last_histograms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        """The histograms of the last :meth:`flush`: ``{key: (counts, edges)}``."""
        self.hook_calls = 0
        """Forward-hook invocations that did work (a test and debugging aid)."""
        self.names: list[str] = []
        """The names of the watched modules, in ``named_modules()`` order."""

        self._targets: list[tuple[str, nn.Module]] = []
        self._act: ActivationStats | None = None
        self._grad: ActivationStats | None = None
        self._handles: list[Any] = []
        self._step: int | None = None  # the step being collected
        self._step_calls = 0
        self._world = 1  # the world size of the step being collected
        self._device: torch.device | None = None
        # per module and call: the smallest and largest value of each input feature over the batch
        self._spread: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._order: list[str] = []  # the modules measured on this step, in the order they ran
        self._unused: set[str] = set()
        self._warned_empty = False
        if model is not None:
            self.bind(model)

    # ----------------------------------------------------------------- model
    def bind(self, model: nn.Module) -> list[str]:
        """Choose the modules of ``model`` to watch (hooks are attached only by :meth:`attach`). Rules, alerts and
        the ``unused`` modules are kept, so a model can be re-bound (a new fit of the same callback).

        Returns:
            The watched module names.

        Raises:
            BpkitConfigError: ``model`` is not a ``torch.nn.Module``, or a glob matches no module.
        """
        if not isinstance(model, nn.Module):
            raise BpkitConfigError("model", type(model).__name__, "a torch.nn.Module")
        self.reset()
        named = [(n, m) for n, m in model.named_modules() if n]
        compiled = [n for n, m in named if type(m).__name__ == "OptimizedModule"]
        hidden = tuple(f"{n}._orig_mod." for n in compiled) + tuple(f"{n}._orig_mod" for n in compiled)
        # a LightningModule compiled whole carries a compiler context; a plain model compiled whole is the wrapper
        whole = getattr(model, "_compiler_ctx", None) is not None or type(model).__name__ == "OptimizedModule"
        if self.modules == "auto":
            chosen = [n for n, m in named if is_auto_module(m)]
        else:
            chosen = []
            for glob in self.modules:
                hits = [n for n, _ in named if fnmatchcase(n, glob)]
                if not hits:
                    some = ", ".join(n for n, _ in named[:12]) + (", ..." if len(named) > 12 else "")
                    raise BpkitConfigError(
                        "modules", glob, f"a glob matching module names of the model ({len(named)} modules: {some})")
                chosen += [n for n in hits if n not in chosen]
        order = {n: i for i, (n, _) in enumerate(named)}
        chosen.sort(key=order.__getitem__)
        lost = [n for n in chosen if n.startswith(hidden)] if not whole else chosen
        if lost:
            where = "the whole model" if whole else ", ".join(compiled)
            warnings.warn(
                f"{self.who}: {where} is compiled with torch.compile; forward hooks do not run inside compiled "
                f"code, so {len(lost)} module(s) are NOT monitored ({', '.join(lost[:6])}"
                f"{', ...' if len(lost) > 6 else ''}). Monitor an uncompiled model, or compile only the parts you "
                "do not need to watch.", UserWarning, stacklevel=2)
            self._warned_empty = True
            chosen = [n for n in chosen if n not in lost]
        if not chosen and not lost:
            warnings.warn(f"{self.who}: modules='auto' found no activation, Linear, Conv or recurrent module in the "
                          "model; nothing is monitored. Pass module name globs.", UserWarning, stacklevel=2)
        found = dict(named)
        self.names = chosen
        self._targets = [(n, found[n]) for n in chosen]
        kinds = {n: saturation_kind(found[n]) for n in chosen}
        bins = self.bins if self._histograms_on else 0
        self._act = ActivationStats(chosen, kinds, bins=bins, hist_range=self.hist_range,
                                    saturation_threshold=self.saturation_threshold,
                                    histogram_samples=self.histogram_samples)
        self._grad = ActivationStats(chosen, None, bins=bins, log_magnitude=True,
                                     histogram_samples=self.histogram_samples) if self.gradients else None
        return list(chosen)

    # ----------------------------------------------------------------- hooks
    @property
    def pending_step(self) -> int | None:
        """The step whose statistics are collected and not flushed yet (``None``: nothing pending)."""
        return self._step

    @property
    def attached(self) -> bool:
        """Are the forward hooks on the model now?"""
        return bool(self._handles)

    def attach(self, step: int) -> None:
        """Put the forward hooks on the watched modules for the forward/backward passes of ``step``. Calling it
        again for the same step (the next micro-batch) is allowed; the statistics add up until :meth:`flush`.

        Raises:
            RuntimeError: no model was bound, or the statistics of another step were not flushed.
        """
        if self._act is None:
            raise RuntimeError(f"{self.who}: no model to watch: pass it to ActivationProbe(model) or bind(model) "
                               "before attach()")
        if self._step is not None and self._step != step:
            raise RuntimeError(f"{self.who}: the statistics of step {self._step} are not flushed yet; call flush() "
                               f"before attach({step})")
        if not self._targets:
            return
        if self._step is None:
            self._step = int(step)
            self._step_calls = 0
            self._world = self._world_size()
            self._device = None
        if self._handles:
            return
        for name, module in self._targets:
            self._handles.append(module.register_forward_hook(functools.partial(self._forward_hook, name)))

    def detach(self) -> None:
        """Remove the forward hooks (the statistics collected so far are kept for :meth:`flush`)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def watch(self, step: int) -> Iterator[ActivationProbe]:
        """``with probe.watch(step): ...``: :meth:`attach` on entry, :meth:`detach` on exit (also on an
        exception). Run the forward pass (and the backward pass, for ``gradients=True``) inside."""
        self.attach(step)
        try:
            yield self
        finally:
            self.detach()

    def reset(self) -> None:
        """Remove the hooks and drop what was collected and not flushed (rules, alerts and ``unused`` are kept)."""
        self.detach()
        self._step = None
        self._step_calls = 0
        self._device = None
        self._spread, self._order = {}, []
        for stats in (self._act, self._grad):
            if stats is not None:
                stats.reset()

    def _world_size(self) -> int:
        if self.world_size is not None:
            return self.world_size
        dist = torch.distributed
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def _forward_hook(self, name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        # a forward run inside backward is activation checkpointing recomputing: already counted
        if torch._C._current_graph_task_id() != -1:
            return
        y = output_tensor(output)
        if y is None or self._act is None:
            return
        self.hook_calls += 1
        self._step_calls += 1
        if self._device is None:
            self._device = y.device
        self._note_spread(name, inputs)
        dim = unit_dim(module, y)
        self._act.update(name, y, dim)
        if self._grad is not None and y.requires_grad:
            y.register_hook(functools.partial(self._grad_hook, name, dim))

    @torch.no_grad()
    def _note_spread(self, name: str, inputs: Any) -> None:
        """The smallest and largest value of each input feature over the batch (two kernels): :meth:`flush` finds
        from them whether the input is the same for every sample (min == max everywhere) and whether it is all
        zeros (both 0 everywhere)."""
        x = output_tensor(inputs)
        if x is None or x.dim() == 0 or x.shape[0] < 2 or x.numel() == 0:  # unknown: varying and non-zero
            low_high = (-torch.ones(1), torch.ones(1))
        else:
            flat = x.reshape(x.shape[0], -1)
            low_high = (flat.amin(0), flat.amax(0))  # 3-10x faster than aminmax(dim=0) on CPU
        calls = self._spread.get(name)
        if calls is None:
            self._order.append(name)
            self._spread[name] = calls = []
        calls.append(low_high)

    def _spreads(self, names: list[str], device: torch.device) -> torch.Tensor:
        """Per module of ``names``: ``[spread, top]``, non-negative, 0 when its input was the same for every sample
        (spread) or all zeros (top) in every call, as ONE flat float64 tensor (a few kernels for all modules)."""
        if not names:
            return torch.zeros(0, dtype=torch.float64, device=device)
        pairs = [(n, pair) for n in names for pair in self._spread[n]]
        ends = [low for _, (low, _) in pairs] + [high for _, (_, high) in pairs]
        if any(t.device != device for t in ends):
            ends = [t.to(device) for t in ends]
        both = torch.cat(ends).double()  # one cast for all (cat promotes mixed dtypes)
        lows, highs = both[:both.numel() // 2], both[both.numel() // 2:]
        per_element = torch.stack([highs - lows, torch.maximum(lows.abs(), highs.abs())], dim=1)
        per_element.nan_to_num_(nan=1.0)  # NaN (or inf - inf): varying and non-zero
        row = {n: i for i, n in enumerate(names)}
        segment = torch.repeat_interleave(torch.tensor([row[n] for n, _ in pairs], device=device),
                                          torch.tensor([low.numel() for _, (low, _) in pairs], device=device))
        # sums of non-negative numbers: 0 exactly when every one is 0, also after a cross-rank sum
        return torch.zeros(len(names), 2, dtype=torch.float64, device=device).index_add_(0, segment,
                                                                                         per_element).view(-1)

    def _grad_hook(self, name: str, dim: int, grad: torch.Tensor) -> None:
        if self._grad is not None:
            if self._world > 1:
                # each rank's loss averages its own part of the batch, so its output gradients are world_size
                # times those of the global batch (DDP/FSDP divide the parameter gradients the same way)
                grad = grad / self._world
            self._grad.update(name, grad, dim)

    # ----------------------------------------------------------------- the host read
    def flush(self, reduce: Reduce | None = None) -> dict[str, float]:
        """Read the statistics of the pending step back (one host read, after one cross-rank sum when the world
        size is > 1), run the rules, and start a new step. Removes the hooks if they are still attached.

        Args:
            reduce: the cross-rank sum for this flush (default: the one given to the constructor, else
                ``torch.distributed.all_reduce``); only used when the world size is > 1.

        Returns:
            ``{metric: float}`` (empty when nothing was collected). The histograms of this flush are then in
            :attr:`last_histograms`, the alerts it raised in :attr:`new_alerts` (and appended to :attr:`alerts`).
        """
        self.detach()
        self.last_histograms, self.new_alerts = {}, []
        step, self._step = self._step, None
        if step is None or self._act is None:
            return {}
        if self._step_calls == 0:
            self.reset()
            if not self._warned_empty:
                self._warned_empty = True
                warnings.warn(f"{self.who}: none of the monitored modules ran during training step {step} (is the "
                              "model compiled, or are these modules unused?); act/ is not logged.", UserWarning,
                              stacklevel=2)
            return {}
        device = self._device or torch.device("cpu")
        parts = [self._act.packed(device)]
        if self._grad is not None:
            parts.append(self._grad.packed(device))
        spread_names = [n for n in self.names if n in self._spread]
        parts.append(self._spreads(spread_names, device))
        self._spread = {}
        packed = torch.cat([p.to(device, torch.float64) for p in parts])
        summed = self._world > 1
        if summed:
            packed = (reduce or self.reduce or _all_reduce_sum)(packed)
        host = readback({"stats": packed})["stats"]
        split = parts[0].numel()
        split_grad = split + (parts[1].numel() if self._grad is not None else 0)
        acts = self._act.summarize(host[:split], one_batch_over_ranks=summed)
        grads = self._grad.summarize(host[split:split_grad], one_batch_over_ranks=summed) \
            if self._grad is not None else {}
        self._act.reset()
        if self._grad is not None:
            self._grad.reset()
        constant = self._constant_input(spread_names, host[split_grad:].reshape(-1, 2), acts)

        scalars: dict[str, float] = {}
        for prefix, stats in (("act", acts), ("act_grad", grads)):
            for name, st in stats.items():
                scalars.update(_scalars(prefix, name, st))
                if st.hist is not None:
                    self.last_histograms[f"{prefix}/hist/{name}"] = st.hist
        # a module fed the same input for every sample is unused by this data: not dead, not saturated
        alerts = self._unused_alert(step, [n for n in constant if n not in self._unused])
        skip = set(constant) | self._unused
        alerts += self.rules.update(step, dead={n: s.dead_frac for n, s in acts.items() if n not in skip},
                                    saturated={n: s.saturated_frac for n, s in acts.items() if n not in skip})
        self.new_alerts = alerts
        self._untaken.extend(alerts)
        self.alerts.extend(alerts)
        return scalars

    def _constant_input(self, names: list[str], spreads: Any, acts: dict[str, ModuleStats]) -> list[str]:
        """The modules unused by this data, in call order: an input that is all zeros, and after such a module,
        the modules whose input is the same for every sample (an activation of the zero-input layer's bias).
        A constant input that is not downstream of a zero one (a saturated RNN state) is left to the other
        rules, and so is everything after a layer that is dead on a varying input: it is starved by that layer."""
        order, self._order = self._order, []
        zero = {n for n, (_, top) in zip(names, spreads) if top == 0.0}
        constant = {n for n, (spread, _) in zip(names, spreads) if spread == 0.0}
        out: list[str] = []
        follows_unused = False
        for name in order:
            if name in zero or (follows_unused and name in constant):
                out.append(name)
                follows_unused = True
                continue
            follows_unused = False
            if name in acts and acts[name].dead_frac > self.rules.dead_threshold:
                break
        return out

    def _unused_alert(self, step: int, names: list[str]) -> list[Alert]:
        if not names:
            return []
        self._unused.update(names)
        message = (f"unused modules: {', '.join(names)} get an all-zero input (for example covariates or features "
                   "this data does not have), or only what such a module outputs, the same for every sample: they "
                   "carry nothing from the data and their units look dead. This is not a dead-ReLU problem (LeakyReLU "
                   "or another initialisation will not change it): feed these inputs, or remove the layers.")
        return [Alert("unused", int(step), ", ".join(names), 0.0, 0.0, message)]

    # ----------------------------------------------------------------- resume
    def take_new_alerts(self) -> list[Alert]:
        """The alerts raised since the last call (all of them are also in :attr:`alerts`), as
        :meth:`bpkit.GradientProbe.take_new_alerts`."""
        out, self._untaken = self._untaken, []
        return out

    def state_dict(self) -> dict[str, Any]:
        """The rules' state, the alerts and the ``unused`` modules: plain data (``torch.save``/JSON-able)."""
        return {"rules": self.rules.state_dict(), "alerts": [a.to_dict() for a in self.alerts],
                "unused": sorted(self._unused)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.rules.load_state_dict(state_dict.get("rules", {}))
        self.alerts = [Alert.from_dict(a) for a in state_dict.get("alerts", [])]
        self._unused = set(state_dict.get("unused", ()))


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def _scalars(prefix: str, name: str, st: ModuleStats) -> dict[str, float]:
    out = {f"{prefix}/mean/{name}": st.mean, f"{prefix}/std/{name}": st.std,
           f"{prefix}/zero_frac/{name}": st.zero_frac, f"{prefix}/dead_frac/{name}": st.dead_frac}
    if st.saturated_frac is not None:
        out[f"{prefix}/saturated_frac/{name}"] = st.saturated_frac
    return out
