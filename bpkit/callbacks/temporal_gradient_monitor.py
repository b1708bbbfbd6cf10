"""TemporalGradientMonitor: gradient flow through time in recurrent and other sequence modules.

A thin Lightning adapter over :class:`bpkit.probe.temporal.TemporalProbe`, which owns the module selection, the
hooks, the profiles, the memory horizon and the rules; this file decides when (Lightning's log cadence), logs what
the probe returns (scalars, the ``time/grad/<m>`` image, the run record's ``temporal`` entry) and emits alerts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from typing_extensions import override

import lightning.pytorch as pl
from bpkit.callbacks import _sink
from bpkit.callbacks._base import HooksOnLogSteps
from bpkit.errors import BpkitConfigError, check_int
from bpkit.probe.temporal import RECORD_ENTRY, TemporalProbe


class TemporalGradientMonitor(HooksOnLogSteps):
    r"""Watch the gradient flow through time of sequence modules on training steps at the logging cadence: the
    norm of the loss's gradient with respect to the module's input at every time step, its profile from the last
    step back, the memory horizon, and ``vanishing``/``exploding`` alerts through time.

    Hooks are attached in ``on_train_batch_start`` only when the step logs and removed in ``on_train_batch_end``:
    other steps, validation, test and predict run with no hook at all (no extra kernel, no host read). An input
    that does not require grad gets a detached leaf copy that requires grad, on those steps only; the parameters'
    gradients, and so the training result, are the same as without the monitor. The measuring is done by a
    :class:`bpkit.probe.temporal.TemporalProbe` (:attr:`probe`), which a plain PyTorch loop can drive too.

    Logged per module (name as in ``named_modules()``): ``time/horizon/<m>`` (how many steps back, counting the
    last, the gradient stays at or above ``horizon_fraction`` = 0.1 of its value at the last step),
    ``time/grad_ratio/<m>`` (the first step's gradient over the last's), ``time/grad_max_ratio/<m>`` (the largest
    going back over the last's), ``time/boundary/<m>`` under truncated BPTT (the gradient reaching the detached
    state a chunk starts from, over the chunk's last-step gradient: what the truncation cuts off), the image
    ``time/grad/<m>`` (a line plot of the profile, every ``image_every`` log steps; W&B and TensorBoard) and a
    run-record entry of type ``"temporal"`` with the whole profile (the report's heatmap). Alerts ``vanishing``
    (the first step's gradient below ``vanishing`` = 1e-5 of the last's) and ``exploding`` (above ``exploding`` =
    1e3 times it going back), ``where`` naming the module, after ``patience`` consecutive log steps spanning at
    least ``min_steps`` training steps.

    Under :class:`bpkit.tbptt.TBPTTModule` the chunks of a batch are the forward calls of one logged batch: chunks
    re-run over ``k2`` steps are joined into one profile, chunks that start afresh are measured per chunk (their
    squared norms summed), and the boundary gradient is measured at each chunk's detached initial state.

    Args:
        modules: ``"auto"`` (every ``nn.RNN``/``nn.LSTM``/``nn.GRU``) or a module name glob or list of globs; a
            matched module's first argument is the input sequence.
        log_every_n_steps: cadence in batches; ``None`` follows ``Trainer(log_every_n_steps)``, ``0`` measures
            nothing. A measured batch is one whose ``train/*`` metrics Lightning logs.
        time_dim: time dimension of the input of a module named by a glob that is not an ``nn.RNNBase`` (those
            follow ``batch_first``).
        horizon_fraction: the fraction of the last step's gradient that defines the memory horizon (0 < f <= 1).
        vanishing: ``vanishing`` alert threshold on first/last (0 < v < 1).
        exploding: ``exploding`` alert threshold on max/last (> 1).
        patience: consecutive log steps a condition must hold before its alert.
        min_steps: training steps a condition must have held (from the first of those log steps) before its alert:
            a freshly initialised RNN often starts with a vanishing profile and learns its way out.
        boundary: measure the gradient at the truncation boundary (a detached initial state given to an RNN).
        images: log the ``time/grad/<m>`` image: ``"auto"`` (when a W&B or TensorBoard logger is there),
            ``True`` or ``False``.
        image_every: make that image on every ``image_every``-th measured log step (the first one included): a
            matplotlib plot costs 0.1-0.5 s on a CPU, more than the measuring itself (the scalars and the run
            record's profile are logged at every log step).

    Raises:
        BpkitConfigError: for a bad argument here, or at the start of fit for a glob matching no module.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from bpkit.callbacks import TemporalGradientMonitor
        >>> monitor = TemporalGradientMonitor(modules="auto", log_every_n_steps=50)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
        >>> monitor.probe.horizon_fraction, monitor.alerts
        (0.1, [])
    """

    who = "bpkit TemporalGradientMonitor"
    metric_prefix = "time"

    def __init__(self, modules: str | Sequence[str] = "auto", log_every_n_steps: int | None = None,
                 time_dim: int = 1, horizon_fraction: float = 0.1, vanishing: float = 1e-5, exploding: float = 1e3,
                 patience: int = 3, min_steps: int = 0, boundary: bool = True, images: bool | str = "auto",
                 image_every: int = 10) -> None:
        probe = TemporalProbe(None, modules=modules, time_dim=time_dim, horizon_fraction=horizon_fraction,
                              vanishing=vanishing, exploding=exploding, patience=patience, min_steps=min_steps,
                              boundary=boundary,
                              who=self.who)
        if not (isinstance(images, bool) or images == "auto"):
            raise BpkitConfigError("images", images, "one of auto, true, false")
        check_int("image_every", image_every, 1)
        super().__init__(log_every_n_steps)
        self.probe = probe
        self.images = images
        self.image_every = image_every
        self._logs = 0  # log steps with a profile in this fit (the image cadence)

    @property
    def modules(self) -> str | list[str]:
        """``"auto"`` or the list of module name globs."""
        return self.probe.modules

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules)

    # ----------------------------------------------------------------- setup and cadence
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._logs = 0

    def _flush(self, trainer: "pl.Trainer") -> None:
        step = self.probe.pending_step
        assert step is not None
        scalars = self.read_probe(trainer)
        if not self.probe.profiles:
            return
        _sink.log_scalars(trainer, scalars, step)
        _sink.log_record(trainer, RECORD_ENTRY, step, self.probe.record())
        if self._logs % self.image_every == 0 and self._want_images(trainer):
            self._log_images(trainer, step)
        self._logs += 1
        self.emit(trainer, self.probe.new_alerts)

    def _want_images(self, trainer: "pl.Trainer") -> bool:
        if self.images == "auto":
            return trainer.is_global_zero and any(_sink.is_wandb(lg) or _sink.is_tensorboard(lg)
                                                  for lg in getattr(trainer, "loggers", None) or [])
        return bool(self.images) and trainer.is_global_zero

    def _log_images(self, trainer: "pl.Trainer", step: int) -> None:
        from bpkit.probe.temporal import plot_profile  # matplotlib: on log steps with an image logger only

        folder = os.path.join(os.path.dirname(_sink.record_path(trainer)), "bpkit_temporal")
        os.makedirs(folder, exist_ok=True)
        for name, profile in self.probe.profiles.items():
            fig = plot_profile(profile, name, step, self.probe.horizon_fraction)
            path = os.path.join(folder, f"{(name or 'model').replace('/', '_')}_step{step}.png")
            fig.savefig(path)
            _sink.log_image(trainer, f"time/grad/{name}", path, step=step,
                            caption=f"log10 |dL/dx_t| relative to the last step; horizon {profile.horizon}")
