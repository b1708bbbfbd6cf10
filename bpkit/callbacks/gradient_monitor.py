"""GradientMonitor: every layer's gradient at every step, nearly free, with pathology detection.

A thin Lightning adapter over :class:`bpkit.GradientProbe` (the statistics, buffers, rules and metric names):
this file decides when (Lightning's log cadence, the optimizer), acts on a skipped step (the module's buffers,
``trainer.should_stop``) and logs (bpkit's sink: every logger and the run record).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from bpkit.callbacks import _buffers, _sink
from bpkit.callbacks._base import BpkitCallback, muted_logging
from bpkit.detect import ExplodingGradientError, NonFiniteGradientError
from bpkit.errors import BpkitConfigError, check_bool
from bpkit.probe.gradient import GradientProbe, StepNorms
from bpkit.record import ENTRY_LAST_STEPS

def _run_length(trainer: pl.Trainer) -> float | None:
    """The run's optimizer steps when Lightning knows them (``estimated_stepping_batches``, else ``max_steps``)."""
    try:
        total = float(trainer.estimated_stepping_batches)
    except Exception:  # no dataloader length (an iterable dataset) and no max_steps
        total = float("inf")
    if not math.isfinite(total) and getattr(trainer, "max_steps", -1) and trainer.max_steps > 0:
        total = float(trainer.max_steps)
    return total if math.isfinite(total) else None



_SKIPS = ("skip", "stop")  # the actions that drop a step (its forward pass moved BatchNorm's running statistics)


class GradientMonitor(BpkitCallback):
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
    statistics). On such a step (one process, automatic optimization) the monitor replays the batch's
    ``training_step`` once with hooks on every module and names where the first NaN/Inf appears, in the alert's
    ``origin`` and message: the module whose output is first non-finite (forward), else the one whose input gradient
    is non-finite from a finite output gradient (backward), and the samples of the batch involved. Healthy steps
    never pay for it. A run that crashes writes its buffered steps and alerts, and the last steps' loss and
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
        check_every_n_steps: the vanishing and steady-explosion rules see every this many steps and the logging
            steps (with the weight norms of the last logging step); the non-finite, exploding and spike rules see
            every step.
        histogram_range: ``(low, high)`` in log10 units of the histogram bins.
        bins_per_decade: histogram bins per power of ten.
        steady: ``True``, ``False`` or options of :class:`bpkit.detect.SteadyExplosionDetector` (``rel_weight`` 100,
            ``patience`` 3): a weight tensor whose gradient norm stays above 100x its own weight norm is
            ``exploding`` even when it was so from the first step (which the relative ``exploding`` rule cannot
            see: a recurrent weight with a spectral radius above 1). Warned and recorded; ``on_exploding`` acts on
            the relative rule only.
        locate_nonfinite: on a step skipped (or stopped, raised on) for a non-finite gradient, replay the batch's
            ``training_step`` once with hooks on every module to name where the first NaN/Inf appears (the alert's
            ``origin``). Its ``self.log`` calls are muted and the model's gradients, buffers, torchmetrics states
            and RNG streams are put back; other side effects of your ``training_step`` (a counter, a list) see the
            extra call: ``False`` turns the replay off.
        histogram_samples: count at most about this many elements of each tensor for its histograms (every
            ``stride``-th element, a prime stride, from an offset that moves at each histogram, so ``stride``
            histograms in a row cover every element once) and scale the counts to the tensor's size: the histograms
            are then estimates (rounded counts; a few hundred elements in a bin are within a few percent), at a cost
            that no longer grows with the model. ``None`` (default): every element, exact counts. The norms, maxima,
            update ratios and every rule stay exact either way. ``4096`` makes histograms at every step affordable
            (``benchmarks/README.md``).

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

    who, metric_prefix = "bpkit GradientMonitor", "grad"

    def __init__(self, log_every_n_steps: int | None = None, per_layer: bool = True, histograms: bool = True,
                 update_ratio: bool = True, histogram_every_n_steps: int | None = None, include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None, group_by: str = "parameter",
                 on_nonfinite: str = "skip", on_exploding: str = "warn",
                 vanishing: bool | Mapping[str, Any] = True, exploding: bool | Mapping[str, Any] = True,
                 spike: bool | Mapping[str, Any] = True, check_every_n_steps: int = 10,
                 histogram_range: Sequence[float] = (-12.0, 4.0), bins_per_decade: int = 2,
                 steady: bool | Mapping[str, Any] = True, locate_nonfinite: bool = True,
                 histogram_samples: int | None = None) -> None:
        super().__init__(log_every_n_steps)
        # the engine validates every option now (a bad config fails at construction, not at the first step)
        self.probe = GradientProbe(
            None, log_every_n_steps=50 if log_every_n_steps is None else log_every_n_steps, per_layer=per_layer,
            histograms=histograms, update_ratio=update_ratio, histogram_every_n_steps=histogram_every_n_steps,
            include=include, exclude=exclude, group_by=group_by, on_nonfinite=on_nonfinite,
            on_exploding=on_exploding, vanishing=vanishing, exploding=exploding, spike=spike,
            check_every_n_steps=check_every_n_steps, histogram_range=histogram_range, bins_per_decade=bins_per_decade,
            steady=steady, histogram_samples=histogram_samples)
        self.locate_nonfinite = check_bool("locate_nonfinite", locate_nonfinite)
        self.include, self.exclude, self.group_by = self.probe.include, self.probe.exclude, self.probe.group_by
        self.on_nonfinite, self.on_exploding = self.probe.on_nonfinite, self.probe.on_exploding
        self._inactive = False
        self._batch: tuple[Any, int] | None = None
        self._backwards = 0  # backward passes seen: with the global step, tells one optimizer step from the next
        self._done: dict[int, tuple[int, int]] = {}  # per optimizer: the step whose statistics are computed
        self._norms: dict[int, StepNorms | None] = {}  # per optimizer: that step's norms, for GradientClipping
        self._replay_fn: Callable[[], Any] | bool | None = None  # None: not made yet this fit; False: none

    @property
    def state_key(self) -> str:
        # Lightning reads it for every hook it calls (its profiler's action names): made once per selection
        selection = (repr(self.include), repr(self.exclude), self.group_by)
        cached = self.__dict__.get("_state_key_cache")
        if cached is None or cached[0] != selection:
            cached = (selection, self._generate_state_key(include=self.include, exclude=self.exclude,
                                                          group_by=self.group_by))
            self.__dict__["_state_key_cache"] = cached
        return cached[1]

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps this monitor dropped (``on_nonfinite``/``on_exploding`` = ``skip`` or ``stop``)."""
        return self.probe.skipped_steps

    # ---------------------------------------------------------------- setup

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.reset_cadence()
        self._replay_fn = None
        interval = self.log_interval(trainer)
        self.probe.bind(pl_module)
        self.probe.configure(interval, accumulate=int(trainer.accumulate_grad_batches or 1))
        self.probe.reduce_any = lambda flag: trainer.strategy.reduce_boolean_decision(flag, all=False)
        self.probe.reduce_sum = lambda t: trainer.strategy.reduce(t, reduce_op="sum")
        self.probe.world_size = trainer.world_size
        self._inactive = not self.probe.has_trainable()
        if self._inactive:
            if self.include or self.exclude:
                raise BpkitConfigError("include" if self.include else "exclude", list(self.include or self.exclude),
                                       "no include/exclude: this model has no trainable parameters")
            warnings.warn(f"{self.who}: {type(pl_module).__name__} has no trainable parameters; "
                          "there are no gradients to monitor and nothing is logged.", UserWarning, stacklevel=2)
            return
        self.probe.check_selection()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probe.configure(total_steps=_run_length(trainer))

    # ---------------------------------------------------------------- the step

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.on_nonfinite in _SKIPS or self.on_exploding in _SKIPS:
            _buffers.save_for_skip(trainer, pl_module)  # a skipped step puts BatchNorm's running stats back
        self._batch = (batch, batch_idx)  # replayed on a non-finite step to find where the NaN starts

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._backwards += 1

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._ensure_step(trainer, pl_module, optimizer)

    def step_norms(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> StepNorms | None:
        """This optimizer step's gradient norms, for :class:`~bpkit.callbacks.GradientClipping`: computed now if
        this monitor has not seen the step yet (so it always sees the gradients before any clipping, whatever the
        order of the callbacks), else the ones it computed. ``None`` when they do not cover every gradient (an
        include/exclude selection) or the step was skipped."""
        self._ensure_step(trainer, pl_module, optimizer)
        return self._norms.get(id(optimizer))

    def _ensure_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._inactive:
            return
        token = (self._backwards, int(trainer.global_step))
        if self._done.get(id(optimizer)) == token:
            return
        self._done[id(optimizer)] = token
        optimizers = trainer.optimizers
        if len(optimizers) != len(self.probe.optimizers) or any(a is not b for a, b in zip(optimizers,
                                                                                          self.probe.optimizers)):
            self.probe.optimizers = list(optimizers)
        try:
            if self._replay_fn is None:  # made once per fit: the batch it replays is read when it is called
                self._replay_fn = self._replay(trainer, pl_module) or False
            ok = self.probe.step(self.batch_step(trainer), optimizer=optimizer, replay=self._replay_fn or None)
        except (NonFiniteGradientError, ExplodingGradientError):
            self.emit(trainer, self.probe.take_new_alerts())  # the run ends here: the metric now
            raise
        self._norms[id(optimizer)] = self.probe.last_norms
        # an action's alert is warned and recorded now; its grad/alert/<kind> count comes with the next log step's
        if self.probe.has_new_alerts:
            self.emit(trainer, self.probe.take_new_alerts(), log_metric=False)
        if not ok:
            _buffers.restore_after_skip(pl_module)  # the forward of this step moved BatchNorm's running stats
            if self.probe.should_stop:
                trainer.should_stop = True

    def _replay(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[], Any] | None:
        """This batch's ``training_step`` again (its logging switched off), for the probe to find where a NaN starts;
        ``None`` where a replay would change training: manual optimization (the step steps the optimizer) or several
        processes (a backward on one rank only would hang DDP's all-reduce)."""
        if not self.locate_nonfinite or self.on_nonfinite == "warn" or self._batch is None \
                or not pl_module.automatic_optimization \
                or trainer.world_size > 1:
            return None

        def replay() -> Any:
            batch, batch_idx = self._batch
            with muted_logging(pl_module), trainer.precision_plugin.train_step_context():  # no second train/loss
                return pl_module.training_step(batch, batch_idx)

        return replay

    # ---------------------------------------------------------------- logging

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, (dict, Mapping)) else outputs  # a dict: no ABC check
        # the loss of a batch belongs to the optimizer step it fed
        self.probe.observe_loss(self.batch_step(trainer), loss if isinstance(loss, torch.Tensor) else None)
        if self.probe.pending:
            self._flush(trainer)

    def _flush(self, trainer: pl.Trainer) -> None:
        metrics = self.probe.flush()
        step = self.probe.flushed_step if self.probe.flushed_step is not None else self.batch_step(trainer)
        _sink.log_scalars(trainer, metrics, step)
        _sink.log_histograms(trainer, self.probe.last_histograms, step)
        self.emit(trainer, self.probe.take_new_alerts(), log_metric=False)  # counted in `metrics` already

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A crash (even before the first log step) keeps what was seen: the buffered steps go through the rules,
        the alerts are written, and the record gets the last steps' loss and gradient norm."""
        try:
            self._flush(trainer)
        except Exception as err:  # the run is already failing: say why the record is short, keep the real error
            warnings.warn(f"{self.who}: could not write the last statistics: {err!r}", RuntimeWarning, stacklevel=2)
        recent = self.probe.recent_steps()
        if recent:
            recent["exception"] = f"{type(exception).__name__}: {exception}"
            _sink.log_record(trainer, ENTRY_LAST_STEPS, recent["steps"][-1], recent)

    # ---------------------------------------------------------------- checkpointing

