"""What every bpkit callback shares, decided once: the log cadence (Lightning's rule), the optimizer index,
alert emission (a throttled Python warning, the ``<prefix>/alert/<kind>`` metric, the run record) and
``.alerts`` saved in and restored from checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from lightning.pytorch.callbacks.callback import Callback
from typing_extensions import override

from bpkit.alert import Alert
from bpkit.callbacks import _cadence, _sink
from bpkit.errors import check_int

WARN_EVERY_LOG_INTERVALS = 10
"""A kind of alert is warned (as a Python warning) at most once per this many log intervals; every alert still goes
to ``.alerts``, the ``<prefix>/alert/<kind>`` metric and the run record."""


class BpkitCallback(Callback):
    """The base of bpkit's callbacks.

    Subclasses set :attr:`who` (the name in warnings) and :attr:`metric_prefix` (``grad``, ``act``, ``clip``, ...),
    call ``super().__init__(log_every_n_steps)``, and extend ``state_dict``/``load_state_dict`` with
    ``{**super().state_dict(), ...}`` and ``super().load_state_dict(state_dict)``.

    Example::

        >>> class Counter(BpkitCallback):
        ...     who, metric_prefix = "bpkit Counter", "count"
        >>> c = Counter(log_every_n_steps=10)
        >>> c.log_every_n_steps, c.alerts, c.state_dict()
        (10, [], {'alerts': []})
    """

    who = "bpkit"
    metric_prefix = "bpkit"

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__()
        if log_every_n_steps is not None:
            check_int("log_every_n_steps", log_every_n_steps, 0)
        self.log_every_n_steps = log_every_n_steps
        self.alerts: list[Alert] = []
        self._log_interval: int | None = None
        self._warned_at: dict[str, int] = {}

    # ---------------------------------------------------------------- cadence

    def log_interval(self, trainer: Any) -> int:
        """This callback's log interval in batches (its own ``log_every_n_steps``, else the Trainer's; ``0``: no
        periodic logging, warned once per Trainer). Decided once per fit (:meth:`reset_cadence` in ``setup``)."""
        if self._log_interval is None:
            self._log_interval = _cadence.interval(trainer, self.log_every_n_steps, self.who)
        return self._log_interval

    def reset_cadence(self) -> None:
        """Forget the interval decided for the previous fit (a new Trainer may log at another interval)."""
        self._log_interval = None

    @staticmethod
    def batch_step(trainer: Any) -> int:
        """The step at which Lightning logs the current training batch's metrics."""
        return _cadence.batch_step(trainer)

    def is_log_step(self, trainer: Any, step: int | None = None) -> bool:
        """Does the batch with this logging step (default: the current one) log, by Lightning's rule?"""
        return _cadence.is_log_step(self.batch_step(trainer) if step is None else step, self.log_interval(trainer))

    @staticmethod
    def ends_window(trainer: Any, pl_module: Any) -> bool:
        """Is the current batch the last micro-batch of its optimizer window (in ``on_train_batch_end``)?"""
        return _cadence.ends_window(trainer, pl_module)

    @staticmethod
    def optimizer_index(trainer: Any, optimizer: Any) -> int:
        """The position of ``optimizer`` in ``trainer.optimizers`` (0 when it is not there: an optimizer the
        LightningModule made by itself). Lightning's ``LightningOptimizer`` wrappers count as their optimizer."""
        inner = getattr(optimizer, "_optimizer", optimizer)
        for i, opt in enumerate(getattr(trainer, "optimizers", None) or []):
            if opt is optimizer or opt is inner:
                return i
        return 0

    @staticmethod
    def several_optimizers(trainer: Any) -> bool:
        """Does the Trainer step more than one optimizer (metric keys then name the optimizer)?"""
        return len(getattr(trainer, "optimizers", None) or []) > 1

    # ---------------------------------------------------------------- alerts

    def emit(self, trainer: Any, alerts: Iterable[Alert], log_metric: bool = True) -> list[Alert]:
        """Keep, warn, log and record alerts: each goes to ``.alerts`` and the run record, and (``log_metric``) a
        ``<prefix>/alert/<kind>`` = 1 metric at its step; a kind is warned at most once per
        :data:`WARN_EVERY_LOG_INTERVALS` log intervals, so a run that keeps producing NaN does not print a warning
        per step. Returns the alerts."""
        alerts = list(alerts)
        every = WARN_EVERY_LOG_INTERVALS * (self._log_interval or 50)
        for alert in alerts:
            self.alerts.append(alert)
            if log_metric:
                _sink.log_scalars(trainer, {f"{self.metric_prefix}/alert/{alert.kind}": 1.0}, alert.step)
            last = self._warned_at.get(alert.kind)
            warn = last is None or alert.step - last >= every or alert.step < last
            if warn:
                self._warned_at[alert.kind] = alert.step
            _sink.log_alert(trainer, alert, warn=warn)
        return alerts

    @staticmethod
    def alert_counts(alerts: Iterable[Alert], prefix: str) -> dict[str, float]:
        """``{<prefix>/alert/<kind>: count}`` of these alerts, to log with a log step's other scalars."""
        out: dict[str, float] = {}
        for alert in alerts:
            key = f"{prefix}/alert/{alert.kind}"
            out[key] = out.get(key, 0.0) + 1.0
        return out

    # ---------------------------------------------------------------- checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        """The engine's state (``self.probe.state_dict()`` when the callback drives a probe) and ``alerts``."""
        probe = getattr(self, "probe", None)
        state = dict(probe.state_dict()) if probe is not None else {}
        state["alerts"] = [a.to_dict() for a in self.alerts]
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        probe = getattr(self, "probe", None)
        if probe is not None:
            probe.load_state_dict(state_dict)
        self.alerts = [Alert.from_dict(a) for a in state_dict.get("alerts", [])]


@contextlib.contextmanager
def muted_logging(pl_module: Any) -> Iterator[None]:
    """Run ``training_step`` again (a replay, a probe's loss) without its ``self.log``/``self.log_dict`` calls reaching
    the epoch's metrics; an instance attribute the user set is put back as it was."""
    own = {k: pl_module.__dict__[k] for k in ("log", "log_dict") if k in pl_module.__dict__}
    pl_module.__dict__["log"] = pl_module.__dict__["log_dict"] = _no_log
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            if k in own:
                pl_module.__dict__[k] = own[k]
            else:
                pl_module.__dict__.pop(k, None)


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


class HooksOnLogSteps(BpkitCallback):
    """A callback whose probe puts hooks on the model only for the batches that log (ActivationMonitor,
    TemporalGradientMonitor): ``self.probe`` has ``attach(step)``, ``detach()`` and ``pending_step``; the subclass
    implements ``_flush(trainer)`` (read the probe once and log). Other batches, validation, test and predict run with
    no hook at all; with gradient accumulation the micro-batches of one optimizer step add up until it steps."""

    probe: Any

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.reset_cadence()
        self.log_interval(trainer)  # decided (and a Trainer's log_every_n_steps=0 warned) now
        self.probe.world_size = trainer.world_size
        self.probe.bind(pl_module)

    def read_probe(self, trainer: Any) -> dict[str, float]:
        """The probe's one read of this log step, summed over the processes when there are several."""
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
        return self.probe.flush(reduce=reduce)

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.probe.detach()

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.probe.reset()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.probe.reset()

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = self.batch_step(trainer)
        pending = self.probe.pending_step
        if pending is not None and pending != step:
            self._flush(trainer)
        if self.is_log_step(trainer, step):
            self.probe.attach(step)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.probe.detach()
        if self.probe.pending_step is not None and self.ends_window(trainer, pl_module):
            self._flush(trainer)

    def _flush(self, trainer: Any) -> None:
        raise NotImplementedError
