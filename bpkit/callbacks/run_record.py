"""RunRecord: what bpkit's monitors do not log (loss, LR, validation metrics, run start/end) into the run
record, so ``bpkit-report`` can draw loss and LR curves and tell whether the run crashed."""

from __future__ import annotations

import datetime as _dt
import os
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from typing_extensions import override

from bpkit.callbacks import _sink
from bpkit.callbacks._checks import check_bool
from bpkit.errors import check_int
from bpkit.stats.readback import readback

_ACTIVATIONS = tuple(v for v in vars(torch.nn.modules.activation).values()
                     if isinstance(v, type) and issubclass(v, torch.nn.Module) and v is not torch.nn.Module)


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


class RunRecord(Callback):
    r"""Append the training loss, the learning rate of every parameter group, validation metrics and the
    run's start and end (``finished``, ``crashed`` or ``interrupted``) to the local run record
    (``<log dir>/bpkit_record.jsonl``) that ``bpkit-report`` reads.

    At the log cadence it copies the ``train/*`` values Lightning already holds in
    ``trainer.callback_metrics`` (one packed device-to-host copy; the record only, since Lightning logs
    them itself; under DDP their mean over the ranks, one packed all-reduce per log step) and the learning rates (``lr/group<j>``, ``lr/opt<i>/group<j>`` with several optimizers;
    to every logger, making a W&B ``lr/`` panel). Steps that do not log read nothing from the device.
    At the end of fit it draws the gradient-flow heatmap (when a ``GradientMonitor`` logged gradient
    norms), logs it as an image (W&B, TensorBoard) under ``report/gradient_flow``, and sends every
    finding of the run's diagnosis with ``wandb.alert`` when the W&B run is online (never offline).

    Args:
        log_every_n_steps: cadence in optimizer steps (default: the Trainer's ``log_every_n_steps``).
        gradient_flow_image: draw and log the gradient-flow heatmap at the end of fit.
        wandb_alerts: send the findings with ``wandb.alert`` when a W&B logger is online.

    Raises:
        BpkitConfigError: for a ``log_every_n_steps`` below 1.

    Example::

        >>> import lightning.pytorch as pl
        >>> from bpkit.callbacks import GradientMonitor, RunRecord
        >>> trainer = pl.Trainer(callbacks=[GradientMonitor(), RunRecord()], max_steps=1, logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
    """

    def __init__(self, log_every_n_steps: int | None = None, gradient_flow_image: bool = True,
                 wandb_alerts: bool = True) -> None:
        super().__init__()
        if log_every_n_steps is not None:
            check_int("log_every_n_steps", log_every_n_steps, 1)
        self.log_every_n_steps = log_every_n_steps
        self.gradient_flow_image = check_bool("gradient_flow_image", gradient_flow_image)
        self.wandb_alerts = check_bool("wandb_alerts", wandb_alerts)
        self.alerts_sent: list[str] = []
        self._last_step = -1
        self._ended = False

    # ------------------------------------------------------------------ start
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ended = False
        model = getattr(pl_module, "model", pl_module)
        acts = sorted({type(m).__name__ for m in pl_module.modules() if isinstance(m, _ACTIVATIONS)})
        optimizers = [type(o).__name__ for o in trainer.optimizers]
        _sink.log_record(trainer, "run", trainer.global_step, {
            "event": "start", "status": "running", "start_time": _now(), "model": type(model).__name__,
            "num_params": int(sum(p.numel() for p in pl_module.parameters())), "activations": acts,
            "optimizers": optimizers, "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
            "log_every_n_steps": self._every(trainer), "resumed_at_step": trainer.global_step,
            "versions": {"torch": torch.__version__, "lightning": pl.__version__}})

    def _every(self, trainer: pl.Trainer) -> int:
        return self.log_every_n_steps or int(trainer.log_every_n_steps) or 50

    # ------------------------------------------------------------------ the cadence
    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or step == 0 or step % self._every(trainer):
            return
        self._last_step = step
        train = {}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("val", "test")) or key.endswith("_epoch"):
                continue
            name = key[:-5] if key.endswith("_step") else key
            if name not in train or key.endswith("_step"):
                train[name] = value
        if trainer.world_size > 1 and train:
            train = self._mean_over_ranks(trainer, train)
        lrs: dict[str, Any] = {}
        multi = len(trainer.optimizers) > 1
        for i, opt in enumerate(trainer.optimizers):
            for j, group in enumerate(opt.param_groups):
                lrs[f"lr/{f'opt{i}/' if multi else ''}group{j}"] = group["lr"]
        host = self._read({**{f"m:{k}": v for k, v in train.items()}, **{f"l:{k}": v for k, v in lrs.items()}})
        metrics = {k[2:]: v for k, v in host.items() if k.startswith("m:")}
        if metrics:
            _sink.log_record(trainer, "scalars", step, metrics)
        lr_values = {k[2:]: v for k, v in host.items() if k.startswith("l:")}
        if lr_values:
            _sink.log_scalars(trainer, lr_values, step)

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
        if host:
            _sink.log_record(trainer, "scalars", trainer.global_step, host)

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
        self._end(trainer, status, f"{type(exception).__name__}: {exception}")

    def _end(self, trainer: pl.Trainer, status: str, error: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        data: dict[str, Any] = {"event": "end", "status": status, "end_time": _now(), "end_step": trainer.global_step}
        if error:
            data["error"] = error[:2000]
        _sink.log_record(trainer, "run", trainer.global_step, data)

    def _after_fit(self, trainer: pl.Trainer) -> None:
        # the report package draws and diagnoses; imported here, at the end, as an entry point would
        from bpkit.report import plots
        from bpkit.report.findings import diagnose
        from bpkit.report.record import read_run

        path = _sink.record_path(trainer)
        if not os.path.isfile(path):
            return
        run = read_run(path)
        if self.gradient_flow_image:
            fig = plots.gradient_flow(run)
            if fig is not None:
                png = plots.save(fig, os.path.join(os.path.dirname(path), "bpkit_gradient_flow.png"))
                _sink.log_image(trainer, "report/gradient_flow", str(png), step=trainer.global_step,
                                caption="log10 gradient norm per layer (rows) and logged step (columns)")
        if self.wandb_alerts:
            self.send_alerts(trainer, diagnose(run))

    def send_alerts(self, trainer: pl.Trainer, findings: list[Any]) -> int:
        """Send each finding with ``wandb.alert`` to every online W&B run of the Trainer; returns how many."""
        sent = 0
        for logger in getattr(trainer, "loggers", []):
            if type(logger).__name__ != "WandbLogger":
                continue
            run = logger.experiment
            settings = getattr(run, "settings", None)
            if getattr(run, "offline", True) or getattr(settings, "mode", None) in ("offline", "disabled", "dryrun"):
                continue
            for finding in findings:
                try:
                    run.alert(title=f"bpkit: {finding.title}", text=finding.text()[:3000], level="WARN")
                except Exception as exc:  # W&B unreachable: the run's result stands
                    warnings.warn(f"bpkit RunRecord: wandb.alert failed: {exc!r}", RuntimeWarning, stacklevel=2)
                    return sent
                self.alerts_sent.append(finding.title)
                sent += 1
        return sent

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
