"""RunRecord: what bpkit's monitors do not log (loss, LR, validation metrics, run start/end) into the run
record, so ``bpkit-report`` can draw loss and LR curves and tell whether the run crashed."""

from __future__ import annotations

import datetime as _dt
import math
import os
import warnings
from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from bpkit.alert import Alert
from bpkit.callbacks import _sink
from bpkit.callbacks._base import BpkitCallback
from bpkit.callbacks._checks import check_bool
from bpkit.diagnosis.findings import diagnose
from bpkit.record import (ENTRY_LAST_STEPS, ENTRY_RUN, ENTRY_SCALARS, RETURNED_LOSS_KEY, WHERE_LOSS, alerts_from,
                          read_record, read_run)
from bpkit.stats.readback import readback

_ACTIVATIONS = tuple(v for v in vars(torch.nn.modules.activation).values()
                     if isinstance(v, type) and issubclass(v, torch.nn.Module) and v is not torch.nn.Module)


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


LOSS_KEY = RETURNED_LOSS_KEY
"""Record key of the loss ``training_step`` returned (``outputs["loss"]``), written at the log steps."""
LAST_STEPS = 16
"""How many of the last optimizer steps' returned losses RunRecord keeps on the device for a crash report."""


class RunRecord(BpkitCallback):
    r"""Append the training loss, the learning rate of every parameter group, validation metrics and the
    run's start and end (``finished``, ``crashed`` or ``interrupted``) to the local run record
    (``<log dir>/bpkit_record.jsonl``) that ``bpkit-report`` reads.

    At the log cadence (Lightning's: the batch of step ``s`` logs when ``(s + 1) % log_every_n_steps == 0``,
    at step ``s``, the step of that batch's ``train/loss``) it copies the training values Lightning already
    holds in ``trainer.callback_metrics`` (every name the module logged, e.g. ``train/loss``, ``train_loss``,
    ``d_loss``; one packed device-to-host copy; the record only, since Lightning logs them itself; under DDP
    their mean over the ranks, one packed all-reduce per log step), the loss ``training_step`` returned
    (``loss/train_returned``, so a module that only returns its loss still gets a loss curve) and the
    learning rates, exactly one series per parameter group (``lr/group<j>``, or ``lr/<name>`` for a group with a
    ``name``; ``lr/opt<i>/...`` with several optimizers; to every logger, making a W&B ``lr/`` panel) and, for a
    group with a momentum (SGD's ``momentum`` > 0, Adam's ``beta1``), ``momentum/<group>`` under its own prefix.
    With RunRecord in the callbacks, Lightning's ``LearningRateMonitor`` is not needed (it would log the same
    learning rate a second time). Steps that do not log read nothing from the device: the returned losses stay there
    (the last 16 steps, and their running sum). At each log step, at the end of training and on an exception
    the sum is checked: a non-finite returned loss raises a ``nonfinite`` alert (``where="loss"``), kept in
    :attr:`alerts`, warned and recorded. When training raises, the returned losses of the steps since the last
    log step and the learning rates are written (a ``last_steps`` entry) before the end entry, so the report
    of a run that crashed before its first log step still says what the last steps looked like.

    At the end of fit it draws the gradient-flow heatmap (when a ``GradientMonitor`` logged gradient
    norms), logs it as an image (W&B, TensorBoard) under ``report/gradient_flow``, logs every alert of the run
    (all bpkit callbacks', as written to the run record) as a W&B table ``report/alerts`` (columns ``step, kind,
    where, message``; also when training raised), and sends every finding of the run's diagnosis with
    ``wandb.alert`` when the W&B run is online (never offline). A failing W&B never fails the run.

    Args:
        log_every_n_steps: cadence in optimizer steps (default: the Trainer's ``log_every_n_steps``); 0 logs
            nothing periodically (the start and end entries, alerts and a crash's last steps are still written).
        gradient_flow_image: draw and log the gradient-flow heatmap at the end of fit.
        wandb_alerts: send the findings with ``wandb.alert`` when a W&B logger is online.

    Attributes:
        alerts: the :class:`bpkit.Alert` s this callback raised (a non-finite returned loss); saved in checkpoints.

    Raises:
        BpkitConfigError: for a ``log_every_n_steps`` that is not an integer >= 0.

    Example::

        >>> import lightning.pytorch as pl
        >>> from bpkit.callbacks import GradientMonitor, RunRecord
        >>> trainer = pl.Trainer(callbacks=[GradientMonitor(), RunRecord()], max_steps=1, logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
    """

    who, metric_prefix = "bpkit RunRecord", "loss"

    def __init__(self, log_every_n_steps: int | None = None, gradient_flow_image: bool = True,
                 wandb_alerts: bool = True) -> None:
        super().__init__(log_every_n_steps)
        self.gradient_flow_image = check_bool("gradient_flow_image", gradient_flow_image)
        self.wandb_alerts = check_bool("wandb_alerts", wandb_alerts)
        self.alerts_sent: list[str] = []
        self._last_step = -1
        self._ended = False
        self._started = False
        self._loss_bad = False  # the last drained interval had a non-finite returned loss (alert on the change)
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        self._window: torch.Tensor | None = None  # the returned losses of the current accumulation window, summed
        self._recent: deque[tuple[int, torch.Tensor]] = deque(maxlen=LAST_STEPS)  # (step, loss), on the device
        self._sum: torch.Tensor | None = None  # sum of the returned losses since the last read: non-finite if one was
        self._first_unread = -1  # the first step summed into _sum
        self._read_upto = -1  # the last step whose returned loss was read back

    # ------------------------------------------------------------------ start
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ended = False
        self._started = False
        self.reset_cadence()
        self._reset_buffers()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not in on_fit_start: Lightning 2.x restores a checkpoint (and the global step) after on_fit_start
        self._write_start(trainer, pl_module)

    def _write_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None) -> None:
        if self._started:
            return
        self._started = True
        data: dict[str, Any] = {"event": "start", "status": "running", "start_time": _now(),
                                "log_every_n_steps": self.log_interval(trainer), "resumed_at_step": int(trainer.global_step),
                                "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
                                "versions": {"torch": torch.__version__, "lightning": pl.__version__}}
        try:
            if pl_module is not None:
                model = getattr(pl_module, "model", pl_module)
                data["model"] = type(model).__name__
                data["num_params"] = int(sum(p.numel() for p in pl_module.parameters()))
                classes = getattr(pl_module, "num_classes", None)  # chance level for the report's "not learning"
                if isinstance(classes, int) and not isinstance(classes, bool) and classes > 1:
                    data["num_classes"] = classes
                data["activations"] = sorted({type(m).__name__ for m in pl_module.modules()
                                              if isinstance(m, _ACTIVATIONS)})
            data["optimizers"] = [type(o).__name__ for o in trainer.optimizers]
        except Exception:  # a crash before setup finished: the start entry still goes out
            pass
        _sink.log_record(trainer, ENTRY_RUN, trainer.global_step, data)

    # ------------------------------------------------------------------ the cadence
    @staticmethod
    def _returned(outputs: Any) -> torch.Tensor | None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point():
            return loss.detach().reshape(())
        return None

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = self.batch_step(trainer)
        loss = self._returned(outputs)
        if loss is not None:  # under accumulation each micro-batch returns loss / accumulate_grad_batches
            self._window = loss if self._window is None else self._window + loss
        if not self.ends_window(trainer, pl_module):
            return  # the window's last micro-batch logs (Lightning logs train/* only then too)
        window, self._window = self._window, None
        if window is not None:
            self._recent.append((step, window))
            if self._sum is None:
                self._sum, self._first_unread = window.float(), step
            else:
                self._sum = self._sum + window
        if step == self._last_step or not self.is_log_step(trainer, step):
            return
        self._last_step = step
        train = {}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("val", "test")) or key.endswith("_epoch"):
                continue
            name = key[:-5] if key.endswith("_step") else key
            if name not in train or key.endswith("_step"):
                train[name] = value
        if window is not None:
            train[LOSS_KEY] = window
        if trainer.world_size > 1 and train:
            train = self._mean_over_ranks(trainer, train)
        lrs = self._lrs(trainer)
        host = self._read({**{f"m:{k}": v for k, v in train.items()}, **{f"l:{k}": v for k, v in lrs.items()},
                           **self._pending()})
        metrics = {k[2:]: v for k, v in host.items() if k.startswith("m:")}
        if metrics:
            _sink.log_record(trainer, ENTRY_SCALARS, step, metrics)
        lr_values = {k[2:]: v for k, v in host.items() if k.startswith("l:")}
        if lr_values:
            _sink.log_scalars(trainer, lr_values, step)
        self._check(trainer, host)

    @staticmethod
    def _lrs(trainer: pl.Trainer) -> dict[str, Any]:
        """One ``lr/<group>`` value per parameter group, and ``momentum/<group>`` where the group has a momentum
        (SGD's ``momentum`` when > 0, or Adam's ``beta1``)."""
        out: dict[str, Any] = {}
        multi = len(trainer.optimizers) > 1
        for i, opt in enumerate(trainer.optimizers):
            used: set[str] = set()
            for j, group in enumerate(opt.param_groups):
                name = group_name(group, j)
                if name in used:
                    name = f"{name}_group{j}"  # two groups with the same name: each keeps its own series
                used.add(name)
                key = f"{f'opt{i}/' if multi else ''}{name}"
                out[f"lr/{key}"] = group["lr"]
                momentum = group_momentum(group)
                if momentum is not None:
                    out[f"momentum/{key}"] = momentum
        return out

    @staticmethod
    def _mean_over_ranks(trainer: pl.Trainer, train: dict[str, Any]) -> dict[str, Any]:
        """Each rank holds the loss of its own batch: the record gets their mean (one packed all-reduce on a
        log step, every rank at the same step), i.e. the loss of the global batch as one process would see it."""
        keys = sorted(k for k, v in train.items() if isinstance(v, torch.Tensor) and v.numel() == 1)
        if not keys:
            return train
        packed = torch.stack([train[k].detach().reshape(()).float() for k in keys])
        packed = trainer.strategy.reduce(packed, reduce_op="mean")
        return {**train, **dict(zip(keys, packed.unbind()))}

    @staticmethod
    def _read(values: dict[str, Any]) -> dict[str, float]:
        """Python numbers as they are; tensors in one packed copy."""
        out = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
        tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        if tensors:
            out.update({k: float(v) for k, v in readback(tensors).items()})
        return out

    # ------------------------------------------------------------------ the buffered returned losses
    def _pending(self) -> dict[str, torch.Tensor]:
        """The device values not read yet: the running sum and the recent losses (``s:sum``, ``r:<step>``)."""
        out: dict[str, torch.Tensor] = {}
        if self._sum is not None:
            out["s:sum"] = self._sum
        for s, t in self._recent:
            if s > self._read_upto:
                out[f"r:{s}"] = t
        return out

    def _check(self, trainer: pl.Trainer, host: dict[str, float]) -> dict[int, float]:
        """After a read: alert on a non-finite returned loss (once per bad stretch); returns ``{step: loss}``."""
        recent = {int(k[2:]): v for k, v in host.items() if k.startswith("r:")}
        if "s:sum" in host:
            bad = not math.isfinite(host["s:sum"])
            first, last = self._first_unread, max(recent) if recent else self._first_unread
            if bad and not self._loss_bad:
                at = next((s for s in sorted(recent) if not math.isfinite(recent[s])), None)
                value = recent[at] if at is not None else host["s:sum"]
                when = f"at step {at}" if at is not None else f"between steps {first} and {last}"
                alert = Alert("nonfinite", at if at is not None else first, WHERE_LOSS, float(value), 0.0,
                              f"the loss training_step returned is {value} {when}: NaN/Inf loss. Lower the learning "
                              f"rate, check the loss for log(0) or a division by zero, or clip gradients.")
                self.emit(trainer, [alert])
            self._loss_bad = bad
        self._sum = None
        if recent:
            self._read_upto = max(self._read_upto, max(recent))
        return recent

    def _drain(self, trainer: pl.Trainer) -> dict[int, float]:
        """Read what is buffered (one packed copy), check it, return the unread returned losses by step."""
        pending = self._pending()
        if not pending:
            return {}
        return self._check(trainer, self._read(pending))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drain(trainer)  # a NaN after the last log step (or with log_every_n_steps=0) still alerts

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._log_eval(trainer, ("val",))

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_eval(trainer, ("test",))

    def _log_eval(self, trainer: pl.Trainer, prefixes: tuple[str, ...]) -> None:
        values = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(prefixes)}
        host = self._read(values)
        if host:  # at the step Lightning logs them (the step of the last training batch's train/* metrics)
            _sink.log_record(trainer, ENTRY_SCALARS, self.batch_step(trainer), host)

    # ------------------------------------------------------------------ the end
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, "finished")
        if not trainer.is_global_zero:
            return
        try:
            self._after_fit(trainer)
        except Exception as exc:  # a plot or an alert must never fail a finished run
            warnings.warn(f"bpkit RunRecord: the end-of-fit figure or alerts failed: {exc!r}", RuntimeWarning,
                          stacklevel=2)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "crashed"
        error = f"{type(exception).__name__}: {exception}"
        if not self._ended:
            try:
                self._write_start(trainer, pl_module)  # a crash before on_train_start: the record still has one
                self._write_last_steps(trainer, error)
            except Exception as exc:  # a broken device must not hide the end entry (nor the real exception)
                warnings.warn(f"bpkit RunRecord: could not write the last steps before the crash: {exc!r}",
                              RuntimeWarning, stacklevel=2)
        self._end(trainer, status, error)
        if trainer.is_global_zero:
            try:  # a crashed run's alerts are the ones a user looks for first
                self.log_alert_table(trainer, self._recorded_alerts(trainer))
            except Exception as exc:
                warnings.warn(f"bpkit RunRecord: the alerts table failed: {exc!r}", RuntimeWarning, stacklevel=2)

    @staticmethod
    def _recorded_alerts(trainer: pl.Trainer) -> list[Alert] | None:
        """The run record's alerts (every bpkit callback's), or ``None`` without a record."""
        path = _sink.record_path(trainer)
        return alerts_from(read_record(path)) if os.path.isfile(path) else None

    def _write_last_steps(self, trainer: pl.Trainer, error: str) -> None:
        """The returned losses of the steps since the last log step and the learning rates, as a ``last_steps``
        entry (the format GradientMonitor uses too: ``steps``, ``loss``, ``nonfinite``, ``exception``)."""
        lrs = self._lrs(trainer)
        host = self._read({**{f"l:{k}": v for k, v in lrs.items()}, **self._pending()})
        recent = self._check(trainer, host)
        steps = sorted(s for s in recent if s > self._last_step)
        if not steps and not lrs:
            return
        data: dict[str, Any] = {
            "steps": steps, "loss": [_json_float(recent[s]) for s in steps],
            "nonfinite": [not math.isfinite(recent[s]) for s in steps], "exception": error[:2000],
            "lr": {k[2:]: _json_float(v) for k, v in host.items() if k.startswith("l:lr/")}, "source": "RunRecord"}
        _sink.log_record(trainer, ENTRY_LAST_STEPS, self.batch_step(trainer), data)

    def _end(self, trainer: pl.Trainer, status: str, error: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        data: dict[str, Any] = {"event": "end", "status": status, "end_time": _now(), "end_step": trainer.global_step}
        if error:
            data["error"] = error[:2000]
        _sink.log_record(trainer, ENTRY_RUN, trainer.global_step, data)

    def _after_fit(self, trainer: pl.Trainer) -> None:
        from bpkit.diagnosis import plots  # matplotlib: imported at the end of fit only

        path = _sink.record_path(trainer)
        if not os.path.isfile(path):
            self.log_alert_table(trainer)  # no record: the callbacks' own alerts
            return
        run = read_run(path)
        if self.gradient_flow_image:
            fig = plots.gradient_flow(run)
            if fig is not None:
                png = plots.save(fig, os.path.join(os.path.dirname(path), "bpkit_gradient_flow.png"))
                _sink.log_image(trainer, "report/gradient_flow", str(png), step=trainer.global_step,
                                caption="log10 gradient norm per layer (rows) and logged step (columns)")
        self.log_alert_table(trainer, run.alerts)
        if self.wandb_alerts:
            self.send_alerts(trainer, diagnose(run))

    def log_alert_table(self, trainer: pl.Trainer, alerts: list[Any] | None = None) -> int:
        """Log every alert of the run (of all bpkit callbacks: the run record's ``alert`` entries; without a
        record, the ``.alerts`` of the Trainer's callbacks) as a W&B table ``report/alerts`` with the columns
        ``step, kind, where, message``, in step order. Nothing is logged for a run without alerts or without a
        W&B logger. Returns to how many W&B runs the table went."""
        if not _sink.wandb_loggers(trainer):
            return 0
        if alerts is None:
            alerts = [a.to_dict() for cb in getattr(trainer, "callbacks", []) for a in getattr(cb, "alerts", [])
                      if isinstance(a, Alert)]
        rows = alert_rows(alerts)
        if not rows:
            return 0
        return _sink.log_table(trainer, ALERT_TABLE_KEY, list(ALERT_TABLE_COLUMNS), rows, step=trainer.global_step)

    def send_alerts(self, trainer: pl.Trainer, findings: list[Any]) -> int:
        """Send each finding with ``wandb.alert`` to every online W&B run of the Trainer (never offline); returns
        how many alerts went out. A failing W&B is warned about once and not called again."""
        sent = 0
        for finding in findings:
            got = _sink.wandb_alert(trainer, f"bpkit: {finding.title}", finding.text()[:3000], level="WARN")
            if not got:
                break
            self.alerts_sent.append(finding.title)
            sent += got
        return sent

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_step": self._last_step, "loss_bad": self._loss_bad}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        super().load_state_dict(state_dict)
        self._loss_bad = bool(state_dict.get("loss_bad", False))


ALERT_TABLE_KEY = "report/alerts"
"""The W&B key of the alerts table RunRecord logs at the end of fit."""
ALERT_TABLE_COLUMNS = ("step", "kind", "where", "message")


def alert_rows(alerts: list[Any]) -> list[list[Any]]:
    """``[step, kind, where, message]`` per alert (``Alert`` objects or their dicts), in step order, duplicates
    (the same alert recorded twice) once."""
    rows, seen = [], set()
    for a in alerts:
        d = a.to_dict() if isinstance(a, Alert) else dict(a)
        row = (int(d.get("step", -1)), str(d.get("kind", "")), str(d.get("where", "")), str(d.get("message", "")))
        if row not in seen:
            seen.add(row)
            rows.append(list(row))
    return sorted(rows, key=lambda r: r[0])


def group_name(group: Mapping[str, Any], index: int) -> str:
    """A parameter group's series name: its ``name`` when set (``optimizer.add_param_group({"name": ...})``, as
    Lightning's LearningRateMonitor reads it), else ``group<index>``."""
    name = group.get("name")
    return str(name).replace(" ", "_") if isinstance(name, str) and name.strip() else f"group{index}"


def group_momentum(group: Mapping[str, Any]) -> Any:
    """The group's momentum: SGD/RMSprop ``momentum`` when > 0, Adam-style ``betas[0]``; ``None`` without one."""
    momentum = group.get("momentum")
    if momentum is not None and not isinstance(momentum, bool):
        try:
            if float(momentum) > 0:
                return momentum
        except (TypeError, ValueError, RuntimeError):
            return None
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and betas:
        return betas[0]
    return None


def _json_float(v: Any) -> float | None:
    """A float for the record; ``None`` where there is no number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
