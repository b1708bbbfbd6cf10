"""One generic LightningModule for every reference model, loss and optimizer."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from bpkit.errors import BpkitConfigError, check_choice

LOSSES = ("mse", "mae", "bce", "cross_entropy", "multilabel_bce")
METRICS = ("acc", "f1", "mse", "mae")
# which losses fit which kind of target (see TensorDataModule.target_kind)
LOSSES_FOR_TARGET = {
    "regression": ("mse", "mae"),
    "binary": ("bce",),
    "multiclass": ("cross_entropy",),
    "sequence_multiclass": ("cross_entropy",),
    "multilabel": ("multilabel_bce", "bce"),
}


def check_loss_fits(loss: str, target_kind: str, num_classes: int | None = None) -> None:
    """Fail early when a loss cannot fit the data's targets (e.g. bce on 10-class targets)."""
    check_choice("task.loss", loss, LOSSES)
    allowed = LOSSES_FOR_TARGET[target_kind]
    if loss not in allowed:
        what = f"{target_kind} targets" + (f" with {num_classes} classes" if num_classes else "")
        raise BpkitConfigError("task.loss", loss, f"a loss that fits {what}: {', '.join(allowed)}")


class BackpropTask(pl.LightningModule):
    """Train any reference model on any bpkit dataset.

    Args:
        model: an ``nn.Module``; models returning ``(output, hidden)`` (``bpkit.models.RNN``) are handled.
        loss: mse, mae, bce (binary), cross_entropy (multi-class, also per time step) or multilabel_bce.
        optimizer: a callable taking the parameters (``functools.partial(torch.optim.SGD, lr=0.1)``,
            or a Hydra ``_partial_`` config); default Adam(lr=1e-3).
        scheduler: a schedule by name (``"warmup_cosine"``), a dict ``{"name": ..., "interval": "step"|"epoch",
            "monitor": ..., **options}`` for :func:`bpkit.schedules.build_scheduler` (total steps come from
            the Trainer), or any callable taking the optimizer; default constant. The LR is logged per param
            group as ``lr/group<i>`` (momentum as ``momentum/group<i>``) by :class:`bpkit.callbacks.RunRecord`.
        metrics: names from acc, f1, mse, mae, computed with torchmetrics on train and val.
        num_classes: classes for multi-class metrics (labels for multi-label ones).

    Example::

        >>> import functools, torch
        >>> from bpkit.models import MLP
        >>> task = BackpropTask(MLP(64, 10, depth=2, width=16), "cross_entropy",
        ...                     functools.partial(torch.optim.SGD, lr=0.1), num_classes=10)
        >>> task.training_step((torch.randn(4, 64), torch.tensor([0, 1, 2, 3])), 0).shape
        torch.Size([])
    """

    def __init__(self, model: nn.Module, loss: str = "cross_entropy",
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: str | dict[str, Any] | Callable[[torch.optim.Optimizer], Any] | None = None,
                 metrics: Sequence[str] = ("acc",), num_classes: int | None = None,
                 scheduler_interval: str = "step", scheduler_monitor: str = "val/loss") -> None:
        super().__init__()
        self.model = model
        self.loss_name = check_choice("loss", loss, LOSSES)
        self.optimizer_factory = optimizer or functools.partial(torch.optim.Adam, lr=1e-3)
        self.scheduler_factory = scheduler
        self.scheduler_interval = check_choice("scheduler_interval", scheduler_interval, ("step", "epoch"))
        self.scheduler_monitor = scheduler_monitor
        self.num_classes = num_classes
        for name in metrics:
            check_choice("metrics", name, METRICS)
        self.train_metrics = self._make_metrics(metrics, "train/")
        self.val_metrics = self._make_metrics(metrics, "val/")
        self.test_metrics = self._make_metrics(metrics, "test/")

    def _make_metrics(self, names: Sequence[str], prefix: str) -> torchmetrics.MetricCollection:
        made: dict[str, torchmetrics.Metric] = {}
        for name in names:
            if name in ("mse", "mae"):
                made[name] = torchmetrics.MeanSquaredError() if name == "mse" else torchmetrics.MeanAbsoluteError()
            elif self.loss_name in ("bce",):
                made[name] = (torchmetrics.classification.BinaryAccuracy() if name == "acc"
                              else torchmetrics.classification.BinaryF1Score())
            elif self.loss_name == "multilabel_bce":
                if not self.num_classes:
                    raise BpkitConfigError("num_classes", self.num_classes, "the number of labels for multi-label metrics")
                made[name] = (torchmetrics.classification.MultilabelAccuracy(self.num_classes) if name == "acc"
                              else torchmetrics.classification.MultilabelF1Score(self.num_classes))
            elif self.loss_name == "cross_entropy":
                if not self.num_classes:
                    raise BpkitConfigError("num_classes", self.num_classes, "the number of classes for classification metrics")
                made[name] = (torchmetrics.classification.MulticlassAccuracy(self.num_classes, average="micro")
                              if name == "acc" else
                              torchmetrics.classification.MulticlassF1Score(self.num_classes, average="macro"))
            else:
                raise BpkitConfigError("metrics", name, f"a metric that fits loss={self.loss_name}: mse, mae")
        return torchmetrics.MetricCollection(made, prefix=prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, tuple) else out

    def compute_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "cross_entropy":
            if logits.dim() == 3:  # (B, T, C) per-step classification
                return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            return F.cross_entropy(logits, y)
        if self.loss_name in ("bce", "multilabel_bce"):
            return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype).reshape(logits.shape))
        y = y.to(logits.dtype).reshape(logits.shape)
        return F.mse_loss(logits, y) if self.loss_name == "mse" else F.l1_loss(logits, y)

    def _metric_inputs(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.detach()
        if self.loss_name == "cross_entropy":
            return (logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) if logits.dim() == 3 else (logits, y)
        if self.loss_name in ("bce", "multilabel_bce"):
            return logits.reshape(y.shape) if logits.numel() == y.numel() else logits, y.long()
        return logits.reshape(y.shape), y.to(logits.dtype)

    def _shared_step(self, batch: Any, metrics: torchmetrics.MetricCollection, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.compute_loss(logits, y)
        metrics.update(*self._metric_inputs(logits, y))
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, self.train_metrics, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, self.test_metrics, "test")

    def configure_optimizers(self) -> Any:
        from bpkit.schedules import NEEDS_TOTAL, build_scheduler

        optimizer = self.optimizer_factory(self.parameters())
        spec = self.scheduler_factory
        interval, monitor = self.scheduler_interval, self.scheduler_monitor
        if spec is None or isinstance(spec, (str, dict)):
            spec = {"name": spec} if isinstance(spec, str) else dict(spec or {"name": "constant"})
            name = spec.pop("name", "constant")
            interval = spec.pop("interval", interval)
            monitor = spec.pop("monitor", monitor)
            if name in NEEDS_TOTAL and spec.get("total_steps") is None:
                spec["total_steps"] = total_scheduler_steps(self.trainer, interval)
            scheduler = build_scheduler(optimizer, name, **spec)
        else:
            scheduler = spec(optimizer)
        config = {"scheduler": scheduler, "interval": interval, "name": f"lr/{type(optimizer).__name__.lower()}"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = monitor
        return {"optimizer": optimizer, "lr_scheduler": config}


def total_scheduler_steps(trainer: Any, interval: str) -> int:
    """How many times the scheduler will step: optimizer steps (``estimated_stepping_batches``) or epochs."""
    if interval == "epoch":
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            raise BpkitConfigError("trainer.max_epochs", trainer.max_epochs, "a positive number of epochs for an "
                                   "epoch-interval schedule that needs the run's length (or set scheduler.total_steps)")
        return int(trainer.max_epochs)
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise BpkitConfigError("trainer.max_steps", trainer.max_steps, "a finite run (max_steps or max_epochs) for a "
                               "schedule that needs the run's length (or set scheduler.total_steps)")
    return int(total)
