"""ActivationMonitor: per-layer activation statistics and histograms, dead and saturated units.

A thin Lightning adapter over :class:`bpkit.ActivationProbe`, which owns the module selection, the hooks, the
statistics, the rules and the metric names; this file decides when (Lightning's log cadence), logs what the probe
returns and emits its alerts.
"""

from __future__ import annotations

from collections.abc import Sequence

from typing_extensions import override

import lightning.pytorch as pl
from bpkit.callbacks import _sink
from bpkit.callbacks._base import HooksOnLogSteps
from bpkit.probe.activation import ActivationProbe


class ActivationMonitor(HooksOnLogSteps):
    r"""Watch the outputs of chosen modules (and optionally their gradients) on training steps at the
    logging cadence: mean, std, fraction of exact zeros, dead units, saturation of tanh/sigmoid, and a
    fixed-range histogram per module, all computed on the device and read back once per log step.

    Forward hooks are attached in ``on_train_batch_start`` only when the step logs and removed in
    ``on_train_batch_end``: other training steps, validation, test and predict run with no hook at all
    (no extra kernel, no host read). Nothing is left on the model after fit. The measuring is done by a
    :class:`bpkit.ActivationProbe` (:attr:`probe`), the same engine a plain PyTorch loop can drive.

    Logged (through bpkit's sink, to every logger and the run record), per module name as in
    ``named_modules()``: ``act/mean/<m>``, ``act/std/<m>``, ``act/zero_frac/<m>``, ``act/dead_frac/<m>``,
    ``act/saturated_frac/<m>`` (tanh/sigmoid only) and the histogram ``act/hist/<m>``; with
    ``gradients=True`` the same for the gradient w.r.t. the module output under ``act_grad/``
    (its histogram is of ``log10|g|``). Alerts ``dead``, ``saturated`` and ``unused`` are kept in ``.alerts``
    (saved in checkpoints), logged as ``act/alert/<kind>`` = 1 at their step and warned (throttled). Under DDP
    the statistics are summed over the ranks (one all-reduce per log step) and equal one process's on the global
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
        histogram_samples: histogram a strided sample of about this many elements of each module output larger than
            that (a new offset at each step), counts scaled to the whole output: estimates, at a fraction of a
            histogram's cost. ``None`` (the default) counts every element. Mean, std, zeros, dead units and
            saturation are always exact.

    Raises:
        BpkitConfigError: for a bad argument here, or at the start of fit for a glob matching no module.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from bpkit.callbacks import ActivationMonitor
        >>> monitor = ActivationMonitor(modules="auto", gradients=True, log_every_n_steps=50)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
        >>> monitor.probe.gradients, monitor.alerts
        (True, [])
    """

    who = "bpkit ActivationMonitor"
    metric_prefix = "act"

    def __init__(self, modules: str | Sequence[str] = "auto", log_every_n_steps: int | None = None,
                 histograms: bool = True, bins: int = 64, hist_range: tuple[float, float] = (-4.0, 4.0),
                 dead_threshold: float = 0.5, saturation_threshold: float = 0.99, saturated_fraction: float = 0.5,
                 patience: int = 3, gradients: bool = False, histogram_samples: int | None = None) -> None:
        probe = ActivationProbe(None, modules=modules, histograms=histograms, bins=bins, hist_range=hist_range,
                                dead_threshold=dead_threshold, saturation_threshold=saturation_threshold,
                                saturated_fraction=saturated_fraction, patience=patience, gradients=gradients,
                                histogram_samples=histogram_samples, who=self.who)
        super().__init__(log_every_n_steps)
        self.probe = probe

    @property
    def modules(self) -> str | list[str]:
        """``"auto"`` or the list of module name globs."""
        return self.probe.modules

    @property
    def gradients(self) -> bool:
        return self.probe.gradients

    @property
    def hook_calls(self) -> int:
        """Forward-hook invocations that did work (a test and debugging aid)."""
        return self.probe.hook_calls

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules, gradients=self.gradients)

    # ----------------------------------------------------------------- the log step
    def _flush(self, trainer: "pl.Trainer") -> None:
        step = self.probe.pending_step
        assert step is not None
        _sink.log_scalars(trainer, self.read_probe(trainer), step)
        if self.probe.last_histograms:
            _sink.log_histograms(trainer, self.probe.last_histograms, step)
        self.emit(trainer, self.probe.take_new_alerts())

