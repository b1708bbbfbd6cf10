"""ActivationMonitor: per-layer activation statistics and histograms, dead and saturated units."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from lightning.pytorch.callbacks.callback import Callback
from typing_extensions import override

import lightning.pytorch as pl
from bpkit.alert import Alert
from bpkit.callbacks import _cadence, _sink
from bpkit.callbacks._checks import check_bool
from bpkit.detect.activations import ActivationRules
from bpkit.errors import BpkitConfigError, check_float, check_int
from bpkit.stats.activations import (ActivationStats, ModuleStats, is_auto_module, output_tensor, saturation_kind,
                                     unit_dim)
from bpkit.stats.readback import readback


class ActivationMonitor(Callback):
    r"""Watch the outputs of chosen modules (and optionally their gradients) on training steps at the
    logging cadence: mean, std, fraction of exact zeros, dead units, saturation of tanh/sigmoid, and a
    fixed-range histogram per module, all computed on the device and read back once per log step.

    Forward hooks are attached in ``on_train_batch_start`` only when the step logs and removed in
    ``on_train_batch_end``: other training steps, validation, test and predict run with no hook at all
    (no extra kernel, no host read). Nothing is left on the model after fit.

    Logged (through bpkit's sink, to every logger and the run record), per module name as in
    ``named_modules()``: ``act/mean/<m>``, ``act/std/<m>``, ``act/zero_frac/<m>``, ``act/dead_frac/<m>``,
    ``act/saturated_frac/<m>`` (tanh/sigmoid only) and the histogram ``act/hist/<m>``; with
    ``gradients=True`` the same for the gradient w.r.t. the module output under ``act_grad/``
    (its histogram is of ``log10|g|``). Alerts ``dead`` and ``saturated`` are kept in ``.alerts``. Under DDP the
    statistics are summed over the ranks (one all-reduce per log step) and equal one process's on the global
    batch: a unit is dead when it is zero on every rank, output gradients are divided by the world size.

    A module whose input is the same for every sample of the batch (all zeros: a covariate or feature the
    data does not have) carries nothing from the data; it is reported once as ``unused``, not as dead or
    saturated (LeakyReLU or another init would not change it).

    Args:
        modules: ``"auto"`` (every activation module and every Linear, Conv and RNN/LSTM/GRU layer) or a
            module name glob, or a list of globs (``fnmatch``, e.g. ``"blocks.*.act"``).
        log_every_n_steps: cadence in batches; ``None`` follows ``Trainer(log_every_n_steps)``, ``0`` measures
            nothing. The batches measured are those whose ``train/*`` metrics Lightning logs (a batch step ``s``
            logs when ``(s + 1) % n == 0``), and their statistics are logged at that same step, also under
            manual optimization with several optimizers.
        histograms: log a histogram per module.
        bins: histogram bins.
        hist_range: ``(low, high)`` of the linear histogram of unbounded outputs (tanh uses (-1, 1), sigmoid
            (0, 1)); outliers are counted in the edge bins.
        dead_threshold: alert ``dead`` when more than this fraction of a module's units output exactly zero
            for a whole batch (0..1).
        saturation_threshold: tanh is saturated where ``|y| > t``, sigmoid where ``y > t`` or ``y < 1 - t``
            (0.5 < t < 1).
        saturated_fraction: alert ``saturated`` when more than this fraction of a tanh/sigmoid module's
            outputs are saturated (0..1).
        patience: consecutive log steps over a threshold before an alert.
        gradients: also measure the gradient w.r.t. each module output (tensor hooks, log steps only).

    Raises:
        BpkitConfigError: for a bad argument here, or at the start of fit for a glob matching no module.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from bpkit.callbacks import ActivationMonitor
        >>> monitor = ActivationMonitor(modules="auto", gradients=True, log_every_n_steps=50)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
    """

    def __init__(self, modules: str | Sequence[str] = "auto", log_every_n_steps: int | None = None,
                 histograms: bool = True, bins: int = 64, hist_range: tuple[float, float] = (-4.0, 4.0),
                 dead_threshold: float = 0.5, saturation_threshold: float = 0.99, saturated_fraction: float = 0.5,
                 patience: int = 3, gradients: bool = False) -> None:
        super().__init__()
        if isinstance(modules, str) and modules:
            modules = [modules] if modules != "auto" else "auto"
        elif isinstance(modules, Sequence) and modules and all(isinstance(m, str) and m for m in modules):
            modules = list(modules)
        else:
            raise BpkitConfigError("modules", modules, '"auto", a module name glob or a non-empty list of globs')
        self.modules = modules
        if log_every_n_steps is not None:
            check_int("log_every_n_steps", log_every_n_steps, 0)
        self.log_every_n_steps = log_every_n_steps
        self._interval = 50
        # per module: how much its input differs between samples, and its largest |input|
        self._spread: dict[str, torch.Tensor] = {}
        self._unused: set[str] = set()
        self._order: list[str] = []  # the modules measured on this log step, in the order they ran
        self.histograms = check_bool("histograms", histograms)
        self.bins = check_int("bins", bins)
        self.saturation_threshold = check_float("saturation_threshold", saturation_threshold, 0.5, 1.0,
                                                low_inclusive=False, high_inclusive=False)
        self.gradients = check_bool("gradients", gradients)
        self.rules = ActivationRules(dead_threshold, saturated_fraction, patience)
        self.hist_range = ActivationStats([], bins=self.bins, hist_range=hist_range).hist_range  # validated now
        self.alerts: list[Alert] = []
        self.hook_calls = 0  # forward-hook invocations that did work (a test and debugging aid)
        self._names: list[str] = []
        self._targets: list[tuple[str, torch.nn.Module]] = []
        self._act: ActivationStats | None = None
        self._grad: ActivationStats | None = None
        self._handles: list[Any] = []
        self._collecting_step: int | None = None
        self._step_calls = 0
        self._warned_empty = False
        self._world_size = 1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules, gradients=self.gradients)

    # ----------------------------------------------------------------- setup
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self._interval = _cadence.interval(trainer, self.log_every_n_steps, "bpkit ActivationMonitor")
        named = [(n, m) for n, m in pl_module.named_modules() if n]
        compiled = [n for n, m in named if type(m).__name__ == "OptimizedModule"]
        hidden = tuple(f"{n}._orig_mod." for n in compiled) + tuple(f"{n}._orig_mod" for n in compiled)
        whole = getattr(pl_module, "_compiler_ctx", None) is not None
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
            where = "the whole LightningModule" if whole else ", ".join(compiled)
            warnings.warn(
                f"bpkit ActivationMonitor: {where} is compiled with torch.compile; forward hooks do not run inside "
                f"compiled code, so {len(lost)} module(s) are NOT monitored ({', '.join(lost[:6])}"
                f"{', ...' if len(lost) > 6 else ''}). Monitor an uncompiled model, or compile only the parts you do not need to watch.",
                UserWarning, stacklevel=2)
            self._warned_empty = True
            chosen = [n for n in chosen if n not in lost]
        if not chosen and not lost:
            warnings.warn("bpkit ActivationMonitor: modules='auto' found no activation, Linear, Conv or recurrent "
                          "module in the model; nothing is monitored. Pass module name globs.", UserWarning,
                          stacklevel=2)
        modules = dict(named)
        self._names = chosen
        self._targets = [(n, modules[n]) for n in chosen]
        kinds = {n: saturation_kind(modules[n]) for n in chosen}
        bins = self.bins if self.histograms else 0
        self._act = ActivationStats(chosen, kinds, bins=bins, hist_range=self.hist_range,
                                    saturation_threshold=self.saturation_threshold)
        self._grad = ActivationStats(chosen, None, bins=bins, log_magnitude=True) if self.gradients else None

    # ----------------------------------------------------------------- cadence
    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        step = _cadence.batch_step(trainer)
        if self._collecting_step is not None and self._collecting_step != step:
            self._flush(trainer, pl_module)
        if not self._targets or not _cadence.is_log_step(step, self._interval):
            return
        if self._collecting_step is None:
            self._collecting_step = step
            self._step_calls = 0
        self._world_size = trainer.world_size
        self._attach()

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._detach()
        if self._collecting_step is None:
            return
        # with gradient accumulation the micro-batches of one step are summed until the optimizer steps
        if _cadence.ends_window(trainer, pl_module):
            self._flush(trainer, pl_module)

    # ----------------------------------------------------------------- hooks
    def _attach(self) -> None:
        if self._handles:
            return
        for name, module in self._targets:
            self._handles.append(module.register_forward_hook(functools.partial(self._forward_hook, name)))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _forward_hook(self, name: str, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        # a forward run inside backward is activation checkpointing recomputing: already counted
        if torch._C._current_graph_task_id() != -1:
            return
        y = output_tensor(output)
        if y is None or self._act is None:
            return
        self.hook_calls += 1
        self._step_calls += 1
        self._note_spread(name, inputs)
        dim = unit_dim(module, y)
        self._act.update(name, y, dim)
        if self._grad is not None and y.requires_grad:
            y.register_hook(functools.partial(self._grad_hook, name, dim))

    @torch.no_grad()
    def _note_spread(self, name: str, inputs: Any) -> None:
        """How much the module's input differs between the samples of the batch (0: the same for all)."""
        x = output_tensor(inputs)
        if x is None or x.dim() == 0 or x.shape[0] < 2:  # unknown: counts as varying and non-zero
            spread = torch.ones(2, dtype=torch.float64, device=x.device if x is not None else "cpu")
        else:
            spread = torch.stack([(x - x[:1]).abs().amax(), x.abs().amax()]).to(torch.float64)
        prev = self._spread.get(name)
        if prev is None:
            self._order.append(name)
        self._spread[name] = spread if prev is None else torch.maximum(prev, spread.to(prev.device))

    def _grad_hook(self, name: str, dim: int, grad: torch.Tensor) -> None:
        if self._grad is not None:
            if self._world_size > 1:
                # each rank's loss averages its own part of the batch, so its output gradients are world_size
                # times those of the global batch (DDP/FSDP divide the parameter gradients the same way)
                grad = grad / self._world_size
            self._grad.update(name, grad, dim)

    # ----------------------------------------------------------------- log step
    def _flush(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        step = self._collecting_step
        self._collecting_step = None
        assert self._act is not None and step is not None
        if self._step_calls == 0:
            self._spread, self._order = {}, []
            self._act.reset()
            if self._grad is not None:
                self._grad.reset()
            if not self._warned_empty:
                self._warned_empty = True
                warnings.warn("bpkit ActivationMonitor: none of the monitored modules ran during training step "
                              f"{step} (is the model compiled, or are these modules unused?); act/ is not logged.",
                              UserWarning, stacklevel=2)
            return
        parts = [self._act.packed(pl_module.device)]
        if self._grad is not None:
            parts.append(self._grad.packed(pl_module.device))
        spread_names = [n for n in self._names if n in self._spread]
        parts.append(torch.cat([self._spread[n].to(pl_module.device, torch.float64) for n in spread_names])
                     if spread_names else torch.zeros(0, dtype=torch.float64, device=pl_module.device))
        self._spread = {}
        packed = torch.cat([p.to(torch.float64) for p in parts])
        if trainer.world_size > 1:
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
        host = readback({"stats": packed})["stats"]
        self._act.reset()
        split = parts[0].numel()
        split_grad = split + (parts[1].numel() if self._grad is not None else 0)
        summed = trainer.world_size > 1
        acts = self._act.summarize(host[:split], one_batch_over_ranks=summed)
        grads = self._grad.summarize(host[split:split_grad], one_batch_over_ranks=summed) \
            if self._grad is not None else {}
        constant = self._constant_input(spread_names, host[split_grad:].reshape(-1, 2), acts)
        if self._grad is not None:
            self._grad.reset()

        scalars: dict[str, float] = {}
        hists: dict[str, Any] = {}
        for prefix, stats in (("act", acts), ("act_grad", grads)):
            for name, st in stats.items():
                scalars.update(_scalars(prefix, name, st))
                if st.hist is not None:
                    hists[f"{prefix}/hist/{name}"] = st.hist
        _sink.log_scalars(trainer, scalars, step)
        if hists:
            _sink.log_histograms(trainer, hists, step)
        # a module fed the same input for every sample is unused by this data: not dead, not saturated
        alerts = self._unused_alert(step, [n for n in constant if n not in self._unused])
        skip = set(constant) | self._unused
        alerts += self.rules.update(step, dead={n: s.dead_frac for n, s in acts.items() if n not in skip},
                                    saturated={n: s.saturated_frac for n, s in acts.items() if n not in skip})
        for alert in alerts:
            self.alerts.append(alert)
            _sink.log_alert(trainer, alert)

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

    # ----------------------------------------------------------------- cleanup and resume
    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._detach()

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._detach()
        self._collecting_step = None

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._detach()
        self._collecting_step = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rules": self.rules.state_dict(), "alerts": [a.to_dict() for a in self.alerts],
                "unused": sorted(self._unused)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rules.load_state_dict(state_dict.get("rules", {}))
        self.alerts = [Alert(**a) for a in state_dict.get("alerts", [])]
        self._unused = set(state_dict.get("unused", ()))


def _scalars(prefix: str, name: str, st: ModuleStats) -> dict[str, float]:
    out = {f"{prefix}/mean/{name}": st.mean, f"{prefix}/std/{name}": st.std,
           f"{prefix}/zero_frac/{name}": st.zero_frac, f"{prefix}/dead_frac/{name}": st.dead_frac}
    if st.saturated_frac is not None:
        out[f"{prefix}/saturated_frac/{name}"] = st.saturated_frac
    return out
