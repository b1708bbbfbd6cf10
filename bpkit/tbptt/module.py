"""Truncated backpropagation through time for Lightning 2.x: Lightning 1.x's contract restored.

Lightning 2.0 removed ``truncated_bptt_steps``, ``tbptt_split_batch`` and the ``hiddens`` argument of
``training_step``. :class:`TBPTTModule` brings them back on top of manual optimization, so a 1.x module
ports by changing its base class, and every chunk is a real optimizer step that Lightning's precision
plugin (AMP scaling/unscaling) and callbacks (bpkit's ``GradientClipping``/``GradientMonitor``) see.

How the user hook and the loop coexist: the user writes ``training_step(self, batch, batch_idx, hiddens)``
on the class, as in 1.x. :class:`TBPTTModule` binds, per instance, a ``training_step(batch, batch_idx)``
that Lightning calls once per batch; it splits the batch, calls the class's 3-argument ``training_step`` on
each chunk, and runs ``manual_backward``/``optimizer.step``/``zero_grad``. Calling
``module.training_step(chunk, batch_idx, hiddens)`` yourself runs just your step.

The chunking and carry loop itself is :class:`bpkit.tbptt.engine.TruncatedBPTT` (pure torch, no Lightning
import); this module adds only the Lightning 1.x contract around it: the options as attributes, the user's
3-argument ``training_step``, ``tbptt_split_batch``, manual optimization through Lightning's optimizer
wrappers and ``manual_backward``, LR schedulers, logging, carried state across batches and checkpoints.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from bpkit.errors import BpkitConfigError, check_choice, check_int
from bpkit.task import BackpropTask
from bpkit.tbptt.engine import TruncatedBPTT, _batch_size, backprop_multiple, split_batch

SCHEDULER_PER = ("chunk", "batch")


class TBPTTModule(pl.LightningModule):
    r"""A LightningModule (base class or mixin) with Lightning 1.x's truncated BPTT contract.

    Subclass it instead of ``LightningModule``, set ``self.truncated_bptt_steps = k`` and write
    ``training_step(self, batch, batch_idx, hiddens)`` returning ``{"loss": loss, "hiddens": hiddens}`` (or a
    ``(loss, hiddens)`` pair). Each batch is split by :meth:`tbptt_split_batch` into chunks of ``k`` steps;
    ``hiddens`` is ``None`` for the first chunk and then the previous chunk's returned state, detached. Per
    chunk the module runs ``manual_backward(loss)`` and ``step()`` + ``zero_grad()`` on every optimizer of
    ``configure_optimizers`` through Lightning's optimizer wrapper, so AMP scaling and the callbacks'
    ``on_before_optimizer_step`` (bpkit's ``GradientClipping``, ``GradientMonitor``) act on every chunk.
    ``trainer.global_step`` counts optimizer steps, i.e. chunks. Validation and test steps see whole sequences.

    A chunk whose step returns ``{"loss": None, "hiddens": h}`` only advances the state (no backward): useful
    for sequence-level targets, where only the last chunk (``self.tbptt_split_idx == self.tbptt_num_splits - 1``)
    has a loss.

    With ``tbptt_backprop_steps = k2`` (a multiple ``m * k1`` of ``k1 = truncated_bptt_steps``) the update
    for chunk ``n`` backpropagates the loss of chunk ``n`` (its last ``k1`` steps) through ``k2`` steps: the
    module re-runs chunks ``n-m+1 .. n`` from the detached state at the start of chunk ``n-m+1`` with the
    current parameters (those re-runs see ``self.tbptt_recomputing = True``, and their losses are ignored),
    then backpropagates. Every time step's loss is used once; its gradient reaches ``k2 - k1`` to ``k2``
    steps back. ``k2 = k1`` is plain TBPTT(k).

    Options are attributes, set in ``__init__`` like ``truncated_bptt_steps`` (validated on assignment). The
    chunking and carry loop is :class:`bpkit.tbptt.engine.TruncatedBPTT`, built from these options per batch.

    Attributes:
        truncated_bptt_steps: ``k1``, time steps per chunk (>= 1); ``None`` trains on whole sequences.
        tbptt_backprop_steps: ``k2``, time steps each update backpropagates through; ``None`` means ``k1``.
        tbptt_accumulate_chunks: chunks whose gradients are summed (each loss divided by their count) before
            one optimizer step; the last group of a batch may be smaller.
        tbptt_carry_hiddens: carry the last detached state of a batch into the next batch (streaming data whose
            batch ``i+1`` continues the rows of batch ``i``); reset at each epoch and by :meth:`reset_hiddens`.
        tbptt_scheduler_per: ``chunk`` (every optimizer step) or ``batch``: when ``interval="step"`` LR
            schedulers step; ``interval="epoch"`` ones step at the end of each training epoch.
        tbptt_time_dim: the time dimension of the batch's tensors for the default split (1: batch first).
        tbptt_log_loss: log ``tbptt/loss_chunk`` (each chunk; on_step and epoch mean) and ``tbptt/loss_seq``
            (the batch's chunk losses averaged, weighted by chunk length).

    Raises:
        BpkitConfigError: on a bad option (``truncated_bptt_steps <= 0``, ``k2`` not a multiple of ``k1``), a
            batch without a time dimension, a ``training_step`` without a ``hiddens`` argument, or one whose
            return value carries no hiddens.

    Example::

        import torch, lightning.pytorch as pl
        from bpkit.tbptt import TBPTTModule

        class LitLSTM(TBPTTModule):
            def __init__(self):
                super().__init__()
                self.truncated_bptt_steps = 20
                self.lstm, self.head = torch.nn.LSTM(1, 32, batch_first=True), torch.nn.Linear(32, 1)

            def training_step(self, batch, batch_idx, hiddens):
                x, y = batch
                out, hiddens = self.lstm(x, hiddens)
                loss = torch.nn.functional.mse_loss(self.head(out), y)
                return {"loss": loss, "hiddens": hiddens}

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters(), 1e-3)

        x = torch.randn(64, 200, 1)
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.cumsum(1) / 10), batch_size=16)
        pl.Trainer(max_epochs=1, logger=False).fit(LitLSTM(), data)  # 10 optimizer steps per batch
    """

    tbptt_chunk_loss_key = "tbptt/loss_chunk"
    tbptt_seq_loss_key = "tbptt/loss_seq"
    #: the metric ReduceLROnPlateau schedulers read (manual optimization drops the config's ``monitor``)
    tbptt_scheduler_monitor: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self._truncated_bptt_steps: int | None = None
        self._tbptt_backprop_steps: int | None = None
        self._tbptt_accumulate_chunks = 1
        self._tbptt_scheduler_per = "chunk"
        self._tbptt_time_dim = 1
        self.tbptt_carry_hiddens = False
        self.tbptt_log_loss = True
        #: index of the chunk being run, the number of chunks of this batch, and whether the chunk is a re-run
        self.tbptt_split_idx = 0
        self.tbptt_num_splits = 0
        self.tbptt_recomputing = False
        self._tbptt_hiddens: Any = None
        self._tbptt_epoch: int | None = None
        self._tbptt_sched_steps = 0
        self._tbptt_warned: set[str] = set()
        self._tbptt_checked = False
        # Lightning calls this instance attribute with (batch, batch_idx); the class keeps the user's 1.x hook
        self.training_step = self._tbptt_training_step

    # -- options ------------------------------------------------------------------------------
    @property
    def truncated_bptt_steps(self) -> int | None:
        return self._truncated_bptt_steps

    @truncated_bptt_steps.setter
    def truncated_bptt_steps(self, value: int | None) -> None:
        self._truncated_bptt_steps = None if value is None else check_int("truncated_bptt_steps", value)

    @property
    def tbptt_backprop_steps(self) -> int | None:
        return self._tbptt_backprop_steps

    @tbptt_backprop_steps.setter
    def tbptt_backprop_steps(self, value: int | None) -> None:
        self._tbptt_backprop_steps = None if value is None else check_int("tbptt_backprop_steps", value)

    @property
    def tbptt_accumulate_chunks(self) -> int:
        return self._tbptt_accumulate_chunks

    @tbptt_accumulate_chunks.setter
    def tbptt_accumulate_chunks(self, value: int) -> None:
        self._tbptt_accumulate_chunks = check_int("tbptt_accumulate_chunks", value)

    @property
    def tbptt_scheduler_per(self) -> str:
        return self._tbptt_scheduler_per

    @tbptt_scheduler_per.setter
    def tbptt_scheduler_per(self, value: str) -> None:
        self._tbptt_scheduler_per = check_choice("tbptt_scheduler_per", value, SCHEDULER_PER)

    @property
    def tbptt_time_dim(self) -> int:
        return self._tbptt_time_dim

    @tbptt_time_dim.setter
    def tbptt_time_dim(self, value: int) -> None:
        self._tbptt_time_dim = check_int("tbptt_time_dim", value, minimum=0)

    def _backprop_multiple(self) -> int:
        return backprop_multiple(self.truncated_bptt_steps, self.tbptt_backprop_steps,
                                 "truncated_bptt_steps", "tbptt_backprop_steps")

    def _tbptt_engine(self) -> TruncatedBPTT:
        """The framework-free loop, built from the options as they are now (they are plain attributes)."""
        self._backprop_multiple()  # a k2 that is not a multiple of k1 fails with this module's option names
        return TruncatedBPTT(self.truncated_bptt_steps, self.tbptt_backprop_steps, self.tbptt_accumulate_chunks,
                             self.tbptt_time_dim)

    # -- user-overridable hooks --------------------------------------------------------------
    def tbptt_split_batch(self, batch: Any, split_size: int) -> Sequence[Any]:
        """Split ``batch`` into chunks of ``split_size`` time steps (see :func:`split_batch`); override for others."""
        return split_batch(batch, split_size, self.tbptt_time_dim)

    def reset_hiddens(self) -> None:
        """Forget the state carried across batches (``tbptt_carry_hiddens``): the next batch starts from ``None``."""
        self._tbptt_hiddens = None

    # -- the loop ------------------------------------------------------------------------------
    def _tbptt_training_step(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:  # called with hiddens: run the user's step on one chunk
            return type(self).training_step(self, batch, batch_idx, *args, **kwargs)
        return self._tbptt_run(batch, batch_idx)

    def _check_user_step(self) -> None:
        if self._tbptt_checked:
            return
        step = type(self).training_step
        params = [p for p in inspect.signature(step).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        if len(params) < 4 and not any(p.kind == p.VAR_POSITIONAL for p in params):
            raise BpkitConfigError(f"{type(self).__name__}.training_step", str(inspect.signature(step)),
                                   "the truncated-BPTT signature training_step(self, batch, batch_idx, hiddens)")
        self._tbptt_checked = True

    def _tbptt_run(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        self._check_user_step()
        engine = self._tbptt_engine()
        k1 = self.truncated_bptt_steps
        splits = list(self.tbptt_split_batch(batch, k1)) if k1 is not None else [batch]
        if not splits:
            raise BpkitConfigError("tbptt_split_batch", "[]", "at least one chunk")
        self.tbptt_num_splits = len(splits)
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]

        epoch = self.trainer.current_epoch
        if self._tbptt_epoch != epoch:
            self._tbptt_epoch = epoch
            self._tbptt_hiddens = None
        start = self._tbptt_hiddens if self.tbptt_carry_hiddens else None
        bsz = _batch_size(batch)
        user_step = type(self).training_step

        def step(chunk: Any, hiddens: Any) -> Any:
            self.tbptt_split_idx, self.tbptt_recomputing = engine.index, engine.recomputing
            return user_step(self, chunk, batch_idx, hiddens)

        def log_chunk(loss: torch.Tensor, index: int) -> None:
            if self.tbptt_log_loss:
                self.log(self.tbptt_chunk_loss_key, loss, on_step=True, on_epoch=True, batch_size=bsz)

        per_chunk = self.tbptt_scheduler_per == "chunk"
        try:
            result = engine.run(batch, step, optimizers, hiddens=start, chunks=splits, backward=self.manual_backward,
                                on_update=(lambda: self._step_schedulers("step")) if per_chunk else None,
                                on_chunk_loss=log_chunk, owner=f"{type(self).__name__}.training_step")
        finally:
            self.tbptt_recomputing = False
        if self.tbptt_carry_hiddens:
            self._tbptt_hiddens = result.hiddens
        if not per_chunk and result.loss is not None:
            self._step_schedulers("step")
        if result.loss is not None and self.tbptt_log_loss:
            self.log(self.tbptt_seq_loss_key, result.loss, on_step=True, on_epoch=True, prog_bar=True,
                     batch_size=bsz)
        return {"loss": result.loss, "hiddens": result.hiddens}

    # -- schedulers ----------------------------------------------------------------------------
    def _step_schedulers(self, interval: str) -> None:
        configs = [c for c in self.trainer.lr_scheduler_configs if c.interval == interval]
        if not configs:
            return
        if interval == "step":
            self._tbptt_sched_steps += 1
        count = self._tbptt_sched_steps if interval == "step" else self.trainer.current_epoch + 1
        for config in configs:
            if count % config.frequency:
                continue
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                key = config.monitor or self.tbptt_scheduler_monitor
                value = self.trainer.callback_metrics.get(key) if key else None
                if value is None:
                    self._warn_once(f"plateau:{key}", f"bpkit TBPTT: ReduceLROnPlateau not stepped: metric {key!r} is "
                                    "not logged (set tbptt_scheduler_monitor to a logged metric)")
                    continue
                scheduler.step(value)
            else:
                scheduler.step()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._tbptt_warned:
            self._tbptt_warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    @override
    def on_train_epoch_end(self) -> None:
        """Step ``interval="epoch"`` LR schedulers (manual optimization leaves them to the module)."""
        self._step_schedulers("epoch")

    # -- checkpointing -------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the carried state and counters; call ``super()`` when you override this hook."""
        checkpoint["bpkit_tbptt"] = {"hiddens": self._tbptt_hiddens, "epoch": self._tbptt_epoch,
                                     "scheduler_steps": self._tbptt_sched_steps}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`on_save_checkpoint` saved; call ``super()`` when you override this hook."""
        state = checkpoint.get("bpkit_tbptt", {})
        self._tbptt_hiddens = state.get("hiddens")
        self._tbptt_epoch = state.get("epoch")
        self._tbptt_sched_steps = state.get("scheduler_steps", 0)


class TBPTTTask(TBPTTModule, BackpropTask):
    """:class:`~bpkit.task.BackpropTask` trained with truncated BPTT: bpkit's RNN on bpkit's sequence data.

    The same constructor as ``BackpropTask`` plus the TBPTT options. Per-step targets (``(B, T)`` class ids
    or ``(B, T, ...)`` values, e.g. character LM or copy task, with ``RNN(output="all")``) are split with the
    inputs and every chunk has a loss. Sequence-level targets (the adding problem's ``(B, 1)``, with
    ``RNN(output="last")``) are handed whole to every chunk and only the last chunk has a loss, so the
    gradient reaches the last ``backprop_steps`` steps only: the truncation bias made visible.

    Logs ``train/loss`` (the sequence loss), ``tbptt/loss_chunk`` and the train metrics; validation and
    test run whole sequences from a zero state, as ``BackpropTask`` does.

    Args:
        model: a model returning ``(output, hidden)`` and taking ``model(x, hidden)`` (``bpkit.models.RNN``).
        loss: as in :class:`~bpkit.task.BackpropTask`.
        optimizer: as in :class:`~bpkit.task.BackpropTask`.
        scheduler: as in :class:`~bpkit.task.BackpropTask`.
        metrics: as in :class:`~bpkit.task.BackpropTask`.
        num_classes: as in :class:`~bpkit.task.BackpropTask`.
        scheduler_interval: as in :class:`~bpkit.task.BackpropTask`.
        scheduler_monitor: as in :class:`~bpkit.task.BackpropTask`; also the metric ReduceLROnPlateau reads
            (``tbptt_scheduler_monitor``).
        truncated_bptt_steps: ``k1`` (see :class:`TBPTTModule`); ``None`` trains on whole sequences.
        backprop_steps: ``k2``, a multiple of ``k1``; ``None`` means ``k1``.
        accumulate_chunks: chunks per optimizer step.
        carry_hiddens: carry the state across batches (streaming data, see :mod:`bpkit.data.streaming`).
        scheduler_per: ``chunk`` or ``batch``: when step-interval LR schedulers step.
        time_dim: time dimension of the inputs.

    Raises:
        BpkitConfigError: on a bad option, as :class:`TBPTTModule` and ``BackpropTask`` do.

    Example::

        >>> from bpkit.models import RNN
        >>> task = TBPTTTask(RNN("lstm", input_size=2, hidden_size=8, out_features=1), "mse",
        ...                  metrics=(), truncated_bptt_steps=10)
        >>> task.truncated_bptt_steps, task.automatic_optimization
        (10, False)
    """

    tbptt_seq_loss_key = "train/loss"

    def __init__(self, model: torch.nn.Module, loss: str = "cross_entropy", optimizer: Any = None,
                 scheduler: Any = None, metrics: Sequence[str] = ("acc",), num_classes: int | None = None,
                 scheduler_interval: str = "step", scheduler_monitor: str = "val/loss",
                 truncated_bptt_steps: int | None = 50, backprop_steps: int | None = None,
                 accumulate_chunks: int = 1, carry_hiddens: bool = False, scheduler_per: str = "chunk",
                 time_dim: int = 1) -> None:
        super().__init__(model, loss, optimizer, scheduler, metrics, num_classes, scheduler_interval,
                         scheduler_monitor)
        self.truncated_bptt_steps = truncated_bptt_steps
        self.tbptt_backprop_steps = backprop_steps
        self._backprop_multiple()  # fail now when k2 is not a multiple of k1
        self.tbptt_accumulate_chunks = accumulate_chunks
        self.tbptt_carry_hiddens = bool(carry_hiddens)
        self.tbptt_scheduler_per = scheduler_per
        self.tbptt_time_dim = time_dim
        self.tbptt_scheduler_monitor = scheduler_monitor
        self._sequence_target = False

    @override
    def tbptt_split_batch(self, batch: Any, split_size: int) -> Sequence[Any]:
        x, y = batch
        d = self.tbptt_time_dim
        if x.dim() <= d:
            raise BpkitConfigError("batch", f"inputs of shape {tuple(x.shape)}",
                                   f"inputs with a time dimension at dim {d} (batch, time, ...)")
        per_step = y.dim() > d and y.shape[d] == x.shape[d]
        self._sequence_target = not per_step
        if per_step:
            return split_batch((x, y), split_size, d)
        return [(xs, y) for xs in x.split(split_size, dim=d)]

    @override
    def training_step(self, batch: Any, batch_idx: int, hiddens: Any = None) -> dict[str, Any]:
        x, y = batch
        out, hiddens = self.model(x, hiddens)
        if self._sequence_target and self.tbptt_split_idx < self.tbptt_num_splits - 1:
            return {"loss": None, "hiddens": hiddens}
        loss = self.compute_loss(out, y)
        if not self.tbptt_recomputing:
            self.train_metrics.update(*self._metric_inputs(out, y))
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return {"loss": loss, "hiddens": hiddens}

    def steps_per_batch(self) -> int | None:
        """Optimizer steps per batch, from the datamodule's ``seq_len`` (or ``window``); ``None`` if unknown."""
        if self.truncated_bptt_steps is None:
            return 1
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        length = getattr(dm, "seq_len", None) or getattr(dm, "window", None)
        if not isinstance(length, int):
            return None
        if getattr(dm, "target_kind", "sequence_multiclass") != "sequence_multiclass":
            return 1  # one target per sequence: only the last chunk has a loss
        chunks = -(-length // self.truncated_bptt_steps)
        return -(-chunks // self.tbptt_accumulate_chunks)

    @override
    def configure_optimizers(self) -> Any:
        from bpkit.schedules import NEEDS_TOTAL
        from bpkit.task import total_scheduler_steps

        original = spec = self.scheduler_factory
        if isinstance(spec, (str, dict)) and self.tbptt_scheduler_per == "chunk":
            spec = {"name": spec} if isinstance(spec, str) else dict(spec)
            interval = spec.get("interval", self.scheduler_interval)
            if spec.get("name") in NEEDS_TOTAL and spec.get("total_steps") is None and interval == "step":
                # Lightning counts batches; this schedule steps once per optimizer step, i.e. per chunk
                per_batch = self.steps_per_batch()
                if per_batch is None:
                    raise BpkitConfigError("scheduler.total_steps", None,
                                           f"a number of steps for schedule '{spec['name']}' stepped per chunk: the "
                                           "datamodule has no seq_len/window to count chunks "
                                           "(or use scheduler_per=batch)")
                spec["total_steps"] = total_scheduler_steps(self.trainer, "step") * per_batch
                self.scheduler_factory = spec
        try:
            config = super().configure_optimizers()
        finally:
            self.scheduler_factory = original
        if isinstance(config, dict):  # manual optimization ignores "monitor": tbptt_scheduler_monitor says it
            config["lr_scheduler"].pop("monitor", None)
        return config
