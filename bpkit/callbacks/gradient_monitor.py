"""GradientMonitor: every layer's gradient at every step, nearly free, with pathology detection."""

from __future__ import annotations

import fnmatch
import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks.callback import Callback
from typing_extensions import override

from bpkit.alert import Alert
from bpkit.callbacks import _buffers, _cadence, _sink, _step_cache
from bpkit.callbacks._checks import check_bool, check_globs
from bpkit.detect import (ExplodingDetector, ExplodingGradientError, NonFiniteDetector, NonFiniteGradientError,
                          SpikeDetector, VanishingDetector)
from bpkit.detect.nonfinite import nonfinite_message
from bpkit.errors import BpkitConfigError, check_choice, check_float, check_int
from bpkit.stats.grads import GradStats, grad_stats
from bpkit.stats.histograms import LogHistogramSpec, log_histograms
from bpkit.stats.norms import group_norms
from bpkit.stats.readback import Readback
from bpkit.stats.step_rows import StepRows
from bpkit.stats.updates import snapshot, update_norms, update_ratios

ACTIONS = ("warn", "skip", "stop", "raise")
GROUP_BY = ("parameter", "module")


def _detector_kwargs(key: str, value: Any, cls: type) -> dict[str, Any] | None:
    """``True`` -> defaults, ``False``/``None`` -> off, a mapping -> keyword arguments (validated)."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise BpkitConfigError(key, value, "true, false or a mapping of detector options")
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "name")]
    for k in value:
        if k not in allowed:
            raise BpkitConfigError(f"{key}.{k}", value[k], "an option among " + ", ".join(allowed))
    try:
        cls(**dict(value))
    except BpkitConfigError as err:
        raise err.with_prefix(key) from None
    return dict(value)


HIST_EVERY_LOG = 10
"""The default histogram cadence of a long (or unbounded) run, in log intervals: W&B's ``watch`` takes 1000 steps."""
HIST_MIN_SNAPSHOTS = 8
"""The default cadence gives a run of known length at least this many histogram snapshots (when it has as many
log steps)."""


def histogram_every_log(total_steps: float | None, interval: int) -> int:
    """The default histogram cadence, in log intervals: every 10th log step of a long run, more often in a short one
    so it still gets about :data:`HIST_MIN_SNAPSHOTS` snapshots, never more often than every log step.

    Args:
        total_steps: the run's optimizer steps (``None`` or infinite: unknown).
        interval: the log interval in steps (``0``: no periodic logging).

    Example::

        >>> histogram_every_log(50, 10), histogram_every_log(160, 10), histogram_every_log(100_000, 50)
        (1, 2, 10)
    """
    if interval <= 0 or total_steps is None or not math.isfinite(total_steps) or total_steps <= 0:
        return HIST_EVERY_LOG
    log_steps = int(total_steps) // interval
    return max(1, min(HIST_EVERY_LOG, log_steps // HIST_MIN_SNAPSHOTS))


def _run_length(trainer: pl.Trainer) -> float | None:
    """The run's optimizer steps when Lightning knows them (``estimated_stepping_batches``, else ``max_steps``)."""
    try:
        total = float(trainer.estimated_stepping_batches)
    except Exception:  # no dataloader length (an iterable dataset) and no max_steps
        total = float("inf")
    if not math.isfinite(total) and getattr(trainer, "max_steps", -1) and trainer.max_steps > 0:
        total = float(trainer.max_steps)
    return total if math.isfinite(total) else None


class _Plan:
    """What the monitor watches for one optimizer, and the detectors' state for it."""

    def __init__(self, params: list[torch.Tensor], names: list[str], group_by: str, device: torch.device,
                 covers_all: bool, interval: int, check_every: int) -> None:
        self.params, self.names, self.covers_all = params, names, covers_all
        self.grouped = group_by == "module"
        if self.grouped:
            self.units: list[str] = []
            index = []
            for name in names:
                unit = name.rsplit(".", 1)[0] if "." in name else "(root)"
                if unit not in self.units:
                    self.units.append(unit)
                index.append(self.units.index(unit))
        else:
            self.units, index = list(names), list(range(len(names)))
        self.unit_of_host = np.array(index, dtype=np.int64)
        self.unit_of = torch.as_tensor(index, dtype=torch.int64, device=device)
        # the vanishing rule looks at weight matrices/kernels only: a bias or a norm scale can have a
        # near-zero gradient by construction (a bias right before batch norm gets exactly zero)
        self.vanishing_eligible = self.units_present(np.array([p.dim() >= 2 for p in params]))
        self.detectors: dict[str, Any] = {}
        width = len(self.units)
        # one row per optimizer step (unit norms, total) and per check step (unit and weight norms),
        # read back at the next log step and replayed through the detectors there
        self.rows = StepRows([(width,), ()], interval + 2)
        self.checks = StepRows([(width,), (width,)], interval // check_every + 3)
        self.param_ids = tuple(id(p) for p in params)
        self.weight_norms: torch.Tensor | None = None  # per unit, from the last step that computed them
        self.pending: dict[str, torch.Tensor] | None = None
        self.snapshot: torch.Tensor | None = None
        self.snapshot_buffer: torch.Tensor | None = None  # kept between logging steps on a CPU only
        self.snapshot_params: list[torch.Tensor] = []
        self.snapshot_units: torch.Tensor | None = None
        self.optimizer_size = 0  # parameters in the optimizer's groups when the plan was made
        # host bookkeeping of the replay: which units ever got a non-zero gradient, and for how many steps a
        # unit had a gradient that was exactly zero (structurally unused parameters, not vanishing ones)
        self.nonzero = np.zeros(len(self.units), dtype=bool)
        self.zero_steps = np.zeros(len(self.units), dtype=np.int64)
        self.unused_flagged = np.zeros(len(self.units), dtype=bool)
        self.trainable: np.ndarray | None = None  # per unit at the pending log step; None: all
        self.present_masks: dict[tuple[bool, ...], tuple[torch.Tensor, np.ndarray]] = {}

    def units_of(self, stats: GradStats) -> GradStats:
        return stats.grouped(self.unit_of, len(self.units)) if self.grouped else stats

    def units_present(self, present: np.ndarray) -> np.ndarray:
        """Per unit: does any of its tensors have the property (host booleans per tensor)."""
        if not self.grouped:
            return present.astype(bool)
        hits = np.zeros(len(self.units), dtype=np.int64)
        np.add.at(hits, self.unit_of_host, present.astype(np.int64))
        return hits > 0


class GradientMonitor(Callback):
    r"""Per-layer gradient statistics at every optimizer step, computed on the device in a few fused
    kernels and read back once per log interval, with vanishing / exploding / non-finite / spike
    detection and actions.

    Runs in ``on_before_optimizer_step``: it sees unscaled AMP gradients, runs once per optimizer
    step under gradient accumulation, and also under manual optimization. Logs (through every
    logger of the Trainer) ``grad/norm_total``, and per tensor (or per module with
    ``group_by="module"``) ``grad/norm/<name>``, ``grad/max/<name>``, ``weight/norm/<name>``,
    ``update/ratio/<name>``, the histograms ``grad/hist/<name>`` and ``weight/hist/<name>``, and
    ``grad/alert/<kind>`` for every alert. Alerts are also warned and kept in ``.alerts``.

    Watches every parameter the include/exclude globs select, frozen ones included: a layer unfrozen
    mid-run (``BackboneFinetuning``, ``optimizer.add_param_group``) is watched from its first gradient,
    while frozen tensors stay out of the per-layer scalars. A tensor whose gradient is exactly zero on
    every step (its input is all zeros) is reported once as ``unused``, not as vanishing. A skipped step
    (``on_nonfinite="skip"``) also puts back the buffers its forward pass changed (BatchNorm's running
    statistics). A run that crashes writes its buffered steps and alerts, and the last steps' loss and
    gradient norm (a ``last_steps`` entry of the run record).

    Args:
        log_every_n_steps: read back and log on the batches where Lightning logs ``train/*`` metrics with this
            interval (default: the Trainer's ``log_every_n_steps``), at the step of that batch's ``train/loss``;
            ``0``: no periodic logging. Detection covers every step regardless: each step writes its norms
            into a device buffer, which is read back at log steps (or when full) and replayed through the rules;
            alerts are warned and recorded either way.
        per_layer: log per-tensor (per-module) scalars; ``False`` logs the totals and alerts only.
        histograms: log fixed-range log10-magnitude histograms of gradients and weights.
        histogram_every_n_steps: the histograms' cadence in steps (on the batches ``(step + 1) % n == 0``).
            Default (``None``): the first log step, then every 10th log interval (e.g. 500 steps with Lightning's
            ``log_every_n_steps=50``; W&B's ``watch`` takes 1000), more often in a run whose length is known
            (``trainer.estimated_stepping_batches``, or ``max_steps``) so that it gets at least 8 snapshots, but
            never more often than every log step: a 50-step run with ``log_every_n_steps=10`` gets one at each of
            its 5 log steps, a 160-step run every 2nd log step, a 10,000-step run every 10th. A histogram reads
            every element of every gradient and weight several times, the other statistics once.
        update_ratio: log ``||w_after - w_before|| / ||w_before||`` (exact: the weights are copied before
            the optimizer step on logging steps only).
        include: glob(s) over ``named_parameters()`` names to watch (default: all trainable ones).
        exclude: glob(s) to leave out.
        group_by: ``parameter`` (one entry per tensor) or ``module`` (per owning module, for big models).
        on_nonfinite: ``skip`` (default: drop the update, weights and optimizer state untouched),
            ``stop`` (skip and stop training), ``raise`` or ``warn``. Every action but ``warn`` reads one
            number (the total norm) from the device per step.
        on_exploding: ``warn`` (default), ``skip``, ``stop`` or ``raise`` for the exploding rule. Every action
            but ``warn`` reads the buffered norms from the device each step and runs the rules right away.
        vanishing: ``True``, ``False`` or options of :class:`bpkit.detect.VanishingDetector`
            (``rel_max``, ``rel_weight``, ``patience``).
        exploding: ``True``, ``False`` or options of :class:`bpkit.detect.ExplodingDetector`
            (``factor`` 100, ``growth`` 1000, ``patience`` 3, ``warmup`` 50, ``max_norm``, ``window``, ``ema``): the
            total norm above 100x its running median, or 1000x its first steps, for 3 steps in a row. Calibrated on
            healthy deep ReLU MLPs with every optimizer config (silent) and the exploding RNN recipe (flagged ~10
            steps before its first NaN): ``benchmarks/results/calibration.md``.
        spike: ``True``, ``False`` or options of :class:`bpkit.detect.SpikeDetector` (``z``, ``alpha``,
            ``warmup``, ``min_std``), applied to the loss and to the total gradient norm.
        check_every_n_steps: the vanishing rule sees every this many steps and the logging steps (with the
            weight norms of the last logging step); the non-finite, exploding and spike rules see every step.
        histogram_range: ``(low, high)`` in log10 units of the histogram bins.
        bins_per_decade: histogram bins per power of ten.

    Raises:
        BpkitConfigError: on an unknown action or grouping, a negative interval, bad detector
            options, or (at train start) an include/exclude glob that matches no parameter.

    Example::

        >>> import lightning.pytorch as pl
        >>> from bpkit.callbacks import GradientMonitor
        >>> monitor = GradientMonitor(exclude="*.bias", on_nonfinite="skip")
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=1, logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
    """

    def __init__(self, log_every_n_steps: int | None = None, per_layer: bool = True, histograms: bool = True,
                 update_ratio: bool = True, histogram_every_n_steps: int | None = None, include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None, group_by: str = "parameter",
                 on_nonfinite: str = "skip", on_exploding: str = "warn",
                 vanishing: bool | Mapping[str, Any] = True, exploding: bool | Mapping[str, Any] = True,
                 spike: bool | Mapping[str, Any] = True, check_every_n_steps: int = 10,
                 histogram_range: Sequence[float] = (-12.0, 4.0), bins_per_decade: int = 2) -> None:
        if log_every_n_steps is not None:
            check_int("log_every_n_steps", log_every_n_steps, 0)
        self.log_every_n_steps = log_every_n_steps
        self._warned_at: dict[str, int] = {}
        self.per_layer = check_bool("per_layer", per_layer)
        self.histograms = check_bool("histograms", histograms)
        if histogram_every_n_steps is not None:
            check_int("histogram_every_n_steps", histogram_every_n_steps, 1)
        self.histogram_every_n_steps = histogram_every_n_steps
        self.update_ratio = check_bool("update_ratio", update_ratio)
        self.include = check_globs("include", include)
        self.exclude = check_globs("exclude", exclude)
        self.group_by = check_choice("group_by", group_by, GROUP_BY)
        self.check_every_n_steps = check_int("check_every_n_steps", check_every_n_steps, 1)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ACTIONS)
        self.on_exploding = check_choice("on_exploding", on_exploding, ACTIONS)
        self._vanishing = _detector_kwargs("vanishing", vanishing, VanishingDetector)
        self._exploding = _detector_kwargs("exploding", exploding, ExplodingDetector)
        self._spike = _detector_kwargs("spike", spike, SpikeDetector)
        if on_exploding != "warn" and self._exploding is None:
            raise BpkitConfigError("on_exploding", on_exploding, "'warn' when the exploding detector is off")
        if not isinstance(histogram_range, Sequence) or isinstance(histogram_range, str) or len(histogram_range) != 2:
            raise BpkitConfigError("histogram_range", histogram_range, "a pair (low, high) of log10 magnitudes")
        low = check_float("histogram_range[0]", histogram_range[0])
        high = check_float("histogram_range[1]", histogram_range[1], low, low_inclusive=False)
        self.hist_spec = LogHistogramSpec(low, high, check_int("bins_per_decade", bins_per_decade, 1))
        self.alerts: list[Alert] = []
        self.skipped_steps = 0
        self._plans: dict[int, _Plan] = {}
        self._plan_by_opt: dict[int, _Plan] = {}
        self._loaded: dict[str, Any] = {}
        self._loss_spike: SpikeDetector | None = None if self._spike is None else \
            SpikeDetector(("loss", "grad_norm_total"), **self._spike)
        self._totals: list[torch.Tensor] = []
        self._interval = 50
        self._hist_interval = 0
        self._hist_every_log = HIST_EVERY_LOG
        self._rows_capacity = self._interval + 2
        self._loss_rows = StepRows([(), ()], self._rows_capacity)  # loss and total norm per batch, for the spike rule
        self._last_step = 0  # the batch step of the last optimizer step seen
        self._pending_step: int | None = None  # the batch step whose statistics wait to be logged
        self._recent: dict[int, dict[str, Any]] = {}  # the last steps replayed, for a crash report
        self._unused_after = 10  # steps with an exactly zero gradient before a tensor is called unused
        self._inactive = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, group_by=self.group_by)

    # ---------------------------------------------------------------- setup

    def _selected(self, pl_module: pl.LightningModule) -> list[tuple[str, torch.nn.Parameter]]:
        # frozen parameters too: one unfrozen later (BackboneFinetuning) is watched from its first gradient
        named = list(pl_module.named_parameters())
        out = [(n, p) for n, p in named
               if (not self.include or any(fnmatch.fnmatchcase(n, g) for g in self.include))
               and not any(fnmatch.fnmatchcase(n, g) for g in self.exclude)]
        return out

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._interval = _cadence.interval(trainer, self.log_every_n_steps, "bpkit GradientMonitor")
        self._hist_interval = self.histogram_every_n_steps or 0  # 0: the default cadence, in log intervals
        self._hist_every_log = HIST_EVERY_LOG  # set from the run's length at train start
        self._rows_capacity = (self._interval or 50) + 2  # with no periodic log, the rows are read back when full
        if not len(self._loss_rows):
            self._loss_rows = StepRows([(), ()], self._rows_capacity * max(1, int(trainer.accumulate_grad_batches or 1)))
        named = list(pl_module.named_parameters())
        self._inactive = not any(p.requires_grad for _, p in named)
        if self._inactive:
            if self.include or self.exclude:
                raise BpkitConfigError("include" if self.include else "exclude", list(self.include or self.exclude),
                                       "no include/exclude: this model has no trainable parameters")
            warnings.warn(f"bpkit GradientMonitor: {type(pl_module).__name__} has no trainable parameters; "
                          "there are no gradients to monitor and nothing is logged.", UserWarning, stacklevel=2)
            return
        names = [n for n, _ in named]  # frozen ones too: a glob may name layers that are unfrozen later
        example = names[0]
        for key, globs in (("include", self.include), ("exclude", self.exclude)):
            for g in globs:
                if not any(fnmatch.fnmatchcase(n, g) for n in names):
                    raise BpkitConfigError(key, g, f"a glob matching at least one parameter name "
                                                   f"(e.g. {example!r})")
        if not self._selected(pl_module):
            raise BpkitConfigError("include", list(self.include), "a selection that leaves at least one parameter "
                                                                  "after exclude")

    def _plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> _Plan | None:
        plan = self._plan_by_opt.get(id(optimizer))
        size = sum(len(group["params"]) for group in optimizer.param_groups)
        if plan is not None and plan.optimizer_size == size:
            return plan
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), len(self._plans))
        selected = self._selected(pl_module)
        if len(trainer.optimizers) > 1:  # each optimizer's plan watches its own parameters
            in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
            selected = [(n, p) for n, p in selected if id(p) in in_opt]
        if not selected:
            return None
        if plan is not None and [n for n, _ in selected] == plan.names:
            plan.optimizer_size = size  # a group was added, the watched tensors are the same: keep the plan
            return plan
        if plan is not None:
            self._drain()  # the old plan's buffered steps go through its detectors before it is replaced
            self._plans.pop(index, None)
        # every parameter of the module is in the plan: the tensors with a gradient are then all the gradients
        covers_all = len(selected) == sum(1 for _ in pl_module.parameters())
        plan = _Plan([p for _, p in selected], [n for n, _ in selected], self.group_by, selected[0][1].device,
                     covers_all, self._rows_capacity - 2, self.check_every_n_steps)
        plan.optimizer_size = size
        if self._vanishing is not None:
            plan.detectors["vanishing"] = VanishingDetector(**self._vanishing)
        if self._exploding is not None:
            plan.detectors["exploding"] = ExplodingDetector(**self._exploding)
        plan.detectors["nonfinite"] = NonFiniteDetector()
        saved = self._loaded.get("plans", {}).pop(index, None)
        if saved is not None and list(saved["units"]) != plan.units:
            warnings.warn(f"bpkit GradientMonitor: the checkpoint's state watched {len(saved['units'])} tensors, "
                          f"this run watches {len(plan.units)}; the detectors start afresh.", UserWarning, stacklevel=2)
            saved = None
        if saved is not None:
            for kind, det in plan.detectors.items():
                if kind in saved["detectors"]:
                    det.load_state_dict(saved["detectors"][kind])
        self._plans[index] = plan
        self._plan_by_opt[id(optimizer)] = plan
        return plan

    # ---------------------------------------------------------------- the step

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hist_every_log = histogram_every_log(_run_length(trainer), self._interval)

    def _is_hist_step(self, step: int) -> bool:
        """Histograms on this batch step: ``histogram_every_n_steps`` when given, else the first log step and
        every ``_hist_every_log``-th log step (a fixed multiple of the log interval)."""
        if self._hist_interval:
            return (step + 1) % self._hist_interval == 0
        if (step + 1) % self._interval:
            return False
        index = (step + 1) // self._interval  # 1 for the first log step
        return index == 1 or index % self._hist_every_log == 0

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._totals.clear()
        if "skip" in (self.on_nonfinite, self.on_exploding) or "stop" in (self.on_nonfinite, self.on_exploding):
            _buffers.save_for_skip(trainer, pl_module)  # a skipped step puts BatchNorm's running stats back

    @override
    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        plan = None if self._inactive else self._plan(trainer, pl_module, optimizer)
        if plan is None:
            return
        step = self._last_step = _cadence.batch_step(trainer)  # the step of this batch's train/loss
        present = tuple(p.grad is not None for p in plan.params)
        present_mask = None
        if all(present):
            params, present_idx = plan.params, None
        elif any(present):
            params = [p for p, ok in zip(plan.params, present) if ok]
            cached = plan.present_masks.get(present)
            if cached is None:  # frozen or unused tensors: the same few patterns step after step
                cached = (torch.as_tensor([i for i, ok in enumerate(present) if ok], device=params[0].device),
                          np.array(present))
                plan.present_masks[present] = cached
            present_idx, present_mask = cached
        else:
            return
        grads = [p.grad for p in params]
        hist_step = self.histograms and self._interval > 0 and self._is_hist_step(step)
        log_step = hist_step or _cadence.is_log_step(step, self._interval)
        check_step = "vanishing" in plan.detectors and (log_step or step % self.check_every_n_steps == 0)
        device = grads[0].device
        if plan.rows.must_drain(device) or plan.checks.must_drain(device):
            self._drain()  # only when a log interval outgrows the buffer
        # the per-step cost of detection: the norms are written into a preallocated device buffer, replayed
        # through the detectors at the next log step
        row_norms, row_total = plan.rows.push(step, device, present_mask)
        direct = present_idx is None and not plan.grouped
        # the vanishing rule compares with the weight norms of the last logging step (weights move ~1e-3 per
        # step, the rule's threshold is 1e-5 of the weight norm): a check step reads no weights
        need_weights = log_step or (check_step and (plan.weight_norms is None or present_idx is not None))
        if log_step and device.type == "cpu" and plan.snapshot_buffer is None and self.update_ratio:
            # one model-sized float32 buffer kept on a CPU for the logging steps' |g| and weight snapshot
            plan.snapshot_buffer = torch.empty(sum(p.numel() for p in params), device=device)
        stats = grad_stats(grads, params if need_weights else None, max_abs=log_step,
                           out=(row_norms, row_total) if direct else None,
                           scratch=plan.snapshot_buffer if log_step else None)
        if plan.covers_all or self._all_with_grad(pl_module, params):  # every gradient of the module is in `params`
            # GradientClipping, later in this hook, reuses these norms (only when they cover every gradient)
            _step_cache.publish(pl_module, trainer, optimizer, params, stats.norms, stats.total,
                                param_ids=plan.param_ids if present_idx is None else None)
        if present_idx is not None:
            stats = self._scatter(stats, present_idx, len(present))
        units = plan.units_of(stats)
        if not direct:
            row_norms.copy_(units.norms)
            row_total.copy_(stats.total)
        if units.weight_norms is not None and present_idx is None:
            plan.weight_norms = units.weight_norms
        if check_step:
            eligible = plan.vanishing_eligible if present_idx is None else \
                plan.vanishing_eligible & plan.units_present(np.array(present))
            check_norms, check_weights = plan.checks.push(step, device, eligible)
            check_norms.copy_(units.norms)
            check_weights.copy_(units.weight_norms if units.weight_norms is not None else plan.weight_norms)
        self._totals.append(stats.total)

        if log_step:
            self._prepare_log(plan, units, stats, grads, params, present_idx, hist_step)
            self._pending_step = step
            # frozen tensors (requires_grad=False) are left out of the per-layer scalars, not logged as zeros
            plan.trainable = None if present_idx is None else \
                plan.units_present(np.array([p.requires_grad for p in plan.params]))

        checks = []
        if self.on_nonfinite != "warn":
            checks.append(("nonfinite", self.on_nonfinite))
        if self.on_exploding != "warn" and "exploding" in plan.detectors:
            checks.append(("exploding", self.on_exploding))
        if checks:
            # an action decides on this very step: the one host read per step that an action costs
            if checks[-1][0] == "exploding":  # the rule needs its history: read the buffered rows and replay them
                flags = self._drain().get(id(plan), {})
            else:  # NaN/Inf in any gradient makes the total norm NaN/Inf: one number decides
                total_host = stats.total.item()
                _step_cache.note_host_total(pl_module, total_host)  # lets norm clipping skip a multiply by 1
                flags = {"nonfinite": not math.isfinite(total_host)}
            for kind, action in checks:
                if trainer.strategy.reduce_boolean_decision(bool(flags.get(kind, False)), all=False):
                    self._act(trainer, pl_module, optimizer, plan, kind, action, units)
                    break

    @staticmethod
    def _all_with_grad(pl_module: pl.LightningModule, params: list[torch.Tensor]) -> bool:
        with_grad = [p for p in pl_module.parameters() if p.grad is not None]
        return len(with_grad) == len(params) and all(a is b for a, b in zip(with_grad, params))

    @staticmethod
    def _scatter(stats: GradStats, idx: torch.Tensor, num: int) -> GradStats:
        """Back to one entry per watched tensor, zeros where a tensor got no gradient this step."""

        def full(v: torch.Tensor) -> torch.Tensor:
            return v.new_zeros(num).index_copy_(0, idx, v)

        return GradStats(full(stats.norms), stats.total, None if stats.weight_norms is None else full(stats.weight_norms),
                         None if stats.max_abs is None else full(stats.max_abs))

    def _prepare_log(self, plan: _Plan, units: GradStats, stats: GradStats, grads: list[torch.Tensor],
                     params: list[torch.Tensor], present: torch.Tensor | None, histograms: bool) -> None:
        pending = {"norms": units.norms, "max": units.max_abs, "weight": units.weight_norms, "total": stats.total}
        seg = plan.unit_of if present is None else plan.unit_of.index_select(0, present)
        if histograms:
            pending["grad_hist"] = log_histograms(grads, self.hist_spec, seg, len(plan.units))
            pending["weight_hist"] = log_histograms(params, self.hist_spec, seg, len(plan.units))
        if self.update_ratio:
            plan.snapshot = snapshot(params, plan.snapshot_buffer)
            if plan.snapshot.device.type == "cpu":  # a GPU's caching allocator reuses the memory by itself
                plan.snapshot_buffer = plan.snapshot
            plan.snapshot_params = list(params)
            plan.snapshot_units = seg
        plan.pending = pending

    def _act(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, plan: _Plan, kind: str,
             action: str, units: GradStats) -> None:
        self._drain()  # the detector sees this step before it names the tensors
        found = plan.detectors[kind].alerts(plan.units)
        if trainer.world_size > 1 and kind == "nonfinite":
            # every rank acts (the decision was agreed); the NaN may be on another rank's gradients only
            # (e.g. after DDP's all-reduce): every rank, rank 0 the logger included, names the same tensors
            mask = trainer.strategy.reduce(units.nonfinite.to(torch.float32), reduce_op="sum")
            bad = [u for u, m in zip(plan.units, Readback({"m": mask}).result()["m"].tolist()) if m > 0]
            if not found or found[0].where != ", ".join(bad):
                step = _cadence.batch_step(trainer)
                found = [Alert("nonfinite", step, ", ".join(bad), 1.0, 0.0, nonfinite_message(bad, step))]
        if not found and kind == "nonfinite":  # every tensor's norm is finite, their total overflowed float32
            step = _cadence.batch_step(trainer)
            found = [Alert("nonfinite", step, "total", 1.0, 0.0,
                           f"the total gradient norm overflowed float32 at step {step} (each tensor's own norm is "
                           "finite); lower the learning rate or clip gradients.")]
        self._emit(trainer, found)
        if action == "raise":
            error = NonFiniteGradientError if kind == "nonfinite" else ExplodingGradientError
            raise error(found[0].message if found else f"{kind} gradients at step {_cadence.batch_step(trainer)}")
        # torch optimizers (and GradScaler.step) skip parameters whose .grad is None: weights and
        # optimizer state stay exactly as they were
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        _buffers.restore_after_skip(pl_module)  # the forward of this step moved BatchNorm's running stats
        self.skipped_steps += 1
        if action == "stop":
            trainer.should_stop = True

    # ---------------------------------------------------------------- logging

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._loss_spike is not None:
            self._update_spikes(trainer, outputs)
        if any(plan.pending is not None for plan in self._plans.values()):
            self._flush(trainer)

    @torch.no_grad()
    def _update_spikes(self, trainer: pl.Trainer, outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        has_loss = isinstance(loss, torch.Tensor) and loss.numel() == 1
        if not has_loss and not self._totals:
            return
        ref = loss if has_loss else self._totals[0]
        if len(self._totals) > 1:  # several optimizers stepped: the norm of all their gradients together
            total = torch.stack(self._totals).norm()
        else:
            total = self._totals[0] if self._totals else ref.new_full((), float("nan"), dtype=torch.float32)
        # the loss of a batch belongs to the optimizer step it fed
        step = _cadence.batch_step(trainer)
        rows = self._loss_rows
        if rows.must_drain(total.device):
            self._drain()  # only when a log interval outgrows the buffer
        row_loss, row_total = rows.push(step, total.device)
        if has_loss:
            row_loss.copy_(loss.reshape(()))
        else:
            row_loss.fill_(float("nan"))
        row_total.copy_(total)
        self._totals.clear()

    def _pending_rows(self) -> dict[str, torch.Tensor]:
        """Every buffered row not yet replayed through the detectors."""
        out = {}
        for i, plan in self._plans.items():
            for name, rows in (("rows", plan.rows), ("checks", plan.checks)):
                if len(rows):
                    out[f"{i}/{name}"] = rows.pending()
        if len(self._loss_rows):
            out["loss/rows"] = self._loss_rows.pending()
        return out

    def _drain(self) -> dict[int, dict[str, bool]]:
        """Read every buffered row back (one copy) and replay it; what :meth:`_replay` returns."""
        rows = self._pending_rows()
        return self._replay(Readback(rows).result()) if rows else {}

    def _replay(self, host: Mapping[str, np.ndarray]) -> dict[int, dict[str, bool]]:
        """Feed the read-back rows to the detectors in step order. Returns, per plan (by ``id``), the
        non-finite and exploding flags of its last step."""
        flags: dict[int, dict[str, bool]] = {}
        for i, plan in self._plans.items():
            width, det = len(plan.units), plan.detectors
            if f"{i}/rows" in host:
                steps, masks = plan.rows.take()
                rows = host[f"{i}/rows"]
                last = {}
                for step, row in zip(steps, rows):
                    norms, total = row[:width], row[width]
                    last["nonfinite"] = det["nonfinite"].update(~np.isfinite(norms), step)
                    if "exploding" in det:
                        last["exploding"] = det["exploding"].update(total, norms, step)
                flags[id(plan)] = last
                # unused-tensor bookkeeping and the last steps for a crash record, over all rows at once
                norms = rows[:, :width]
                if any(m is not None for m in masks):
                    got = np.stack([np.ones(width, dtype=bool) if m is None else plan.units_present(m) for m in masks])
                else:
                    got = True
                plan.nonzero |= (got & (norms != 0)).any(axis=0)
                plan.zero_steps += (got & (norms == 0)).sum(axis=0)
                bad = (~np.isfinite(norms[-20:])).any(axis=1)
                for step, total, nonfinite in zip(steps[-20:], rows[-20:, width].tolist(), bad.tolist()):
                    self._note_recent(step, total=total, nonfinite=nonfinite)
            if f"{i}/checks" in host:
                steps, eligible = plan.checks.take()
                for step, mask, row in zip(steps, eligible, host[f"{i}/checks"]):
                    # a tensor whose gradient has been exactly zero on every step is unused, not vanishing
                    det["vanishing"].update(row[:width], row[width:], step, mask & plan.nonzero)
        if "loss/rows" in host:
            steps, _ = self._loss_rows.take()
            for step, row in zip(steps, host["loss/rows"]):
                self._loss_spike.update(row, step)
            for step, loss in zip(steps[-20:], host["loss/rows"][-20:, 0].tolist()):
                self._note_recent(step, loss=loss)
        return flags

    def _note_recent(self, step: int, **values: Any) -> None:
        self._recent.setdefault(int(step), {}).update(values)
        while len(self._recent) > 20:  # the last steps, for the record of a run that crashes
            del self._recent[min(self._recent)]

    def _unused_alerts(self, plan: _Plan) -> list[Alert]:
        """Tensors that had a gradient, exactly zero, on each of ``_unused_after`` or more steps: reported once."""
        new = ~plan.nonzero & ~plan.unused_flagged & (plan.zero_steps >= self._unused_after)
        if not new.any():
            return []
        plan.unused_flagged |= new
        hit = [u for u, m in zip(plan.units, new) if m]
        owners = sorted({u.rsplit(".", 1)[0] if "." in u and not plan.grouped else u for u in hit})
        steps = int(plan.zero_steps[new].min())
        message = (f"unused parameters: {', '.join(hit)} got a gradient of exactly zero on every one of {steps}+ "
                   f"steps. Nothing from the data reaches them: the input of {', '.join(owners)} is all zeros (for "
                   "example covariates or features this data does not have) or its output does not affect the loss. "
                   "This is not a vanishing gradient (initialisation, activations or normalisation will not change "
                   "it): feed these inputs, or drop the layers.")
        return [Alert("unused", self._last_step, ", ".join(hit), 0.0, 0.0, message)]

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer, final=True)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A crash (even before the first log step) keeps what was seen: the buffered steps go through the rules,
        the alerts are written, and the record gets the last steps' loss and gradient norm."""
        try:
            self._flush(trainer, final=True)
        except Exception as err:  # the run is already failing: say why the record is short, keep the real error
            warnings.warn(f"bpkit GradientMonitor: could not write the last statistics: {err!r}", RuntimeWarning,
                          stacklevel=2)
        if self._recent:
            steps = sorted(self._recent)
            rows = [self._recent[s] for s in steps]
            _sink.log_record(trainer, "last_steps", steps[-1], {
                "steps": steps, "loss": [r.get("loss") for r in rows],
                "grad_norm_total": [r.get("total") for r in rows],
                "nonfinite": [bool(r.get("nonfinite", False)) for r in rows],
                "exception": f"{type(exception).__name__}: {exception}"})

    def _flush(self, trainer: pl.Trainer, final: bool = False) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for i, plan in self._plans.items():
            if plan.pending is not None:
                tensors.update({f"{i}/{k}": v for k, v in plan.pending.items()})
                if plan.snapshot is not None:
                    upd = update_norms(plan.snapshot_params, plan.snapshot)
                    if plan.grouped:
                        upd = group_norms(upd, plan.snapshot_units, len(plan.units))
                    elif len(plan.snapshot_params) != len(plan.params):
                        upd = upd.new_zeros(len(plan.units)).index_copy_(0, plan.snapshot_units, upd)
                    tensors[f"{i}/update"] = update_ratios(upd, plan.pending["weight"])
        tensors.update(self._pending_rows())
        if not tensors:
            return
        host = Readback(tensors).result()  # the one device->host copy of a log step
        self._replay(host)
        step = self._pending_step if self._pending_step is not None else self._last_step
        self._pending_step = None
        metrics: dict[str, float] = {}
        hists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        found: list[Alert] = []
        for i, plan in self._plans.items():
            if plan.pending is not None:
                self._metrics(plan, i, host, metrics, hists)
                plan.pending, plan.snapshot, plan.snapshot_params = None, None, []
            for det in plan.detectors.values():
                found += det.alerts(plan.units)
            found += self._unused_alerts(plan)
        if self._loss_spike is not None:
            found += self._loss_spike.alerts()
        for alert in found:
            metrics[f"grad/alert/{alert.kind}"] = metrics.get(f"grad/alert/{alert.kind}", 0.0) + 1.0
        if self.skipped_steps:
            metrics["grad/skipped_steps"] = float(self.skipped_steps)
        _sink.log_scalars(trainer, metrics, step)
        _sink.log_histograms(trainer, hists, step)
        self._emit(trainer, found, log_metric=False)

    def _metrics(self, plan: _Plan, i: int, host: dict[str, np.ndarray], metrics: dict[str, float],
                 hists: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        tag = "" if len(self._plans) == 1 else f"opt{i}/"
        metrics[f"grad/{tag}norm_total"] = float(host[f"{i}/total"])
        keep = plan.trainable if plan.trainable is not None else [True] * len(plan.units)
        if self.per_layer:
            columns = [("grad/norm", "norms"), ("grad/max", "max"), ("weight/norm", "weight"),
                       ("update/ratio", "update")]
            for prefix, key in columns:
                if f"{i}/{key}" in host:
                    for unit, v, ok in zip(plan.units, host[f"{i}/{key}"].tolist(), keep):
                        if ok:
                            metrics[f"{prefix}/{tag}{unit}"] = v
        if f"{i}/grad_hist" in host:
            edges = self.hist_spec.edges()
            for kind in ("grad", "weight"):
                for unit, row, ok in zip(plan.units, host[f"{i}/{kind}_hist"], keep):
                    if not ok:
                        continue
                    hists[f"{kind}/hist/{tag}{unit}"] = (LogHistogramSpec.split(row)[0], edges)

    def _emit(self, trainer: pl.Trainer, found: list[Alert], log_metric: bool = True) -> None:
        for alert in found:
            self.alerts.append(alert)
            if log_metric:
                _sink.log_scalars(trainer, {f"grad/alert/{alert.kind}": 1.0}, alert.step)
            # a run that keeps producing NaN would print a warning per step: warn once per kind and ten log
            # intervals; every alert still goes to .alerts, grad/alert/<kind> and the run record
            last = self._warned_at.get(alert.kind)
            warn = last is None or alert.step - last >= 10 * (getattr(self, "_interval", 50) or 50)
            if warn:
                self._warned_at[alert.kind] = alert.step
            _sink.log_alert(trainer, alert, warn=warn)

    # ---------------------------------------------------------------- checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        self._drain()  # a checkpoint holds every step seen so far (one read, at save time)
        plans = {i: {"units": list(p.units), "detectors": {k: d.state_dict() for k, d in p.detectors.items()}}
                 for i, p in self._plans.items()}
        for i, saved in self._loaded.get("plans", {}).items():
            plans.setdefault(i, saved)
        loss = self._loss_spike.state_dict() if self._loss_spike is not None else None
        return {"plans": plans, "loss_spike": loss, "skipped_steps": self.skipped_steps,
                "alerts": [a.to_dict() for a in self.alerts]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        self._plans.clear()
        self._plan_by_opt.clear()
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.alerts = [Alert(**a) for a in state_dict.get("alerts", [])]
        if self._loss_spike is not None and state_dict.get("loss_spike"):
            self._loss_spike.load_state_dict(state_dict["loss_spike"])
