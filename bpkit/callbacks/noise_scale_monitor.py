"""NoiseScaleMonitor: the gradient noise scale (McCandlish et al. 2018) and the critical batch size, in training.

A thin Lightning adapter over :mod:`bpkit.stats.noise_scale` (the estimators, the moving averages, the sentence):
this file decides where the two batch sizes come from (gradient accumulation, or one split batch), when (Lightning's
log cadence), keeps training unchanged, and logs through bpkit's sink (every logger and the run record).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from bpkit.callbacks import _sink
from bpkit.callbacks._base import BpkitCallback
from bpkit.errors import BpkitConfigError, check_choice, check_int
from bpkit.record import ENTRY_NOISE_SCALE
from bpkit.stats.noise_scale import NoiseScaleEstimator, batch_size_of, critical_batch_sentence, sq_norm, \
    split_batch_sq_norms

SOURCES = ("auto", "ddp", "accumulation", "split")
RECORD_ENTRY = ENTRY_NOISE_SCALE
"""The run record's entry type of the final estimate (``{"b_simple", "critical_batch", "batch_size", "sentence",
...}``), written at the end of fit for ``bpkit-report``."""


def _mute_logging(pl_module: pl.LightningModule) -> Callable[[], None]:
    """Make ``self.log``/``self.log_dict`` no-ops on this instance; returns the undo."""
    def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    had = {name: name in vars(pl_module) for name in ("log", "log_dict")}
    saved = {name: vars(pl_module).get(name) for name in had}
    pl_module.log = nothing  # type: ignore[method-assign]
    pl_module.log_dict = nothing  # type: ignore[method-assign]

    def undo() -> None:
        for name, present in had.items():
            if present:
                setattr(pl_module, name, saved[name])
            else:
                delattr(pl_module, name)
    return undo


def _is_ddp(strategy: Any) -> bool:
    from lightning.pytorch.strategies import DDPStrategy

    return isinstance(strategy, DDPStrategy)


class NoiseScaleMonitor(BpkitCallback):
    r"""The simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` and the critical batch size, measured while
    training (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

    Two batch sizes give unbiased estimates of ``|G|^2`` (the squared true gradient) and ``tr(Sigma)`` (the
    per-sample gradient variance), which are smoothed separately by exponential moving averages and divided, as in
    the paper's appendix A.1. Where the two batch sizes come from (``source``):

    - ``ddp`` (``auto`` picks it under Lightning's ``DDPStrategy`` with more than one process): no extra pass. A DDP
      communication hook (:meth:`~torch.nn.parallel.DistributedDataParallel.register_comm_hook`, registered at
      ``on_fit_start``) takes the squared norm of each gradient bucket *before* the all-reduce, which it then does
      exactly as DDP's default hook: each rank's own gradient is the small batch (its ``b`` samples, all its
      micro-batches), the all-reduced ``p.grad`` in ``on_before_optimizer_step`` the big batch (``world_size x b``).
      DDP keeps one communication hook per model: when one is already registered (``DDPStrategy(ddp_comm_hook=...)``,
      e.g. PowerSGD or fp16 compression) the monitor does not displace it and falls back to ``split`` (warned).
    - ``accumulation`` (``auto`` picks it with ``Trainer(accumulate_grad_batches=k)``, ``k > 1``, and automatic
      optimization): no extra forward or backward pass. The first micro-batch's gradient (``k x p.grad`` after its
      backward, in ``on_after_backward``: Lightning divides each micro-batch loss by ``k``; divided by the AMP loss
      scale when there is one) is the small batch ``b``, the accumulated gradient in ``on_before_optimizer_step`` the
      big batch ``k b``. Every optimizer step (two fused norms on the device, no host read); a window with fewer than
      ``k`` micro-batches or unequal ones (the end of an epoch) is skipped.
    - ``split`` (``auto`` otherwise): on the steps it estimates (the log steps by default), the batch is cut into
      ``parts`` equal pieces whose gradients are taken with ``torch.autograd.grad`` (one extra forward and backward
      over the batch in all): the pieces give ``b = len(batch) // parts``, their mean the big batch ``parts x b``.
      ``.grad``, the RNG states (CPU and CUDA) and every buffer (BatchNorm's running statistics) are left exactly as
      they were, so training is unchanged. The extra pass runs in ``on_train_batch_start`` in float32 (no autocast),
      on the weights of the step.
    - with several processes the moving averages are averaged across ranks at the log step (one collective of 4
      numbers): under ``split``/``accumulation`` each rank estimates from its own batch.

    The monitor moves itself to the front of ``trainer.callbacks`` at setup, so that its extra pass runs before
    other callbacks attach forward hooks for the batch (:class:`~bpkit.callbacks.ActivationMonitor`) and it sees the
    accumulated gradient before any clipping callback changes it.

    Logs ``noise/b_simple`` (``B_simple``, in samples), ``noise/critical_batch`` (the paper's critical batch
    ``B_crit ~ B_noise``, estimated by ``B_simple``: the batch size beyond which a larger batch stops cutting the
    number of steps proportionally), ``noise/grad_sq`` and ``noise/trace`` (the smoothed estimates),
    ``noise/batch_size`` (samples per optimizer step, all micro-batches and ranks) and ``noise/estimates``.
    ``noise/b_simple`` is left out while the smoothed ``|G|^2`` is not positive (the noise still hides the mean).
    :attr:`sentence` puts it in words; the last one is written to the run record at the end of fit.

    The estimators assume the loss is the *mean* of per-sample losses (``reduction="mean"``); with BatchNorm the
    samples of a batch are not independent and ``B_simple`` is the noise scale of the BatchNorm'd model at that
    batch size.

    Args:
        log_every_n_steps: read back and log on the batches where Lightning logs ``train/*`` metrics with this
            interval (default: the Trainer's ``log_every_n_steps``); ``0``: no periodic logging.
        source: ``auto``, ``ddp``, ``accumulation`` or ``split`` (above).
        ema: decay of the moving averages per estimate, in ``[0, 1)``.
        every_n_steps: the split method's cadence in optimizer steps (on the batches ``(step + 1) % n == 0``);
            default (``None``): the log steps. The ddp and accumulation methods estimate every optimizer step.
        parts: pieces of the split batch (``>= 2``).
        loss_fn: ``loss_fn(pl_module, batch) -> mean loss`` for the split method. Default: ``compute_loss(self(x), y)``
            for a module with a ``compute_loss`` method (:class:`bpkit.task.BackpropTask`) and ``(x, y)`` batches,
            else ``training_step(batch, batch_idx)`` with ``self.log`` muted (its other side effects, e.g. metric
            updates, happen for the pieces too: give ``loss_fn`` to avoid them). Required under manual optimization,
            where ``training_step`` steps the optimizer itself.

    Raises:
        BpkitConfigError: on an unknown source, a bad ``ema``/``every_n_steps``/``parts``, and (at setup)
            ``source="ddp"`` without ``DDPStrategy`` and several processes, ``source="accumulation"`` without ``accumulate_grad_batches > 1`` and automatic optimization, or the split
            method under manual optimization without ``loss_fn``.

    Example::

        >>> import lightning.pytorch as pl
        >>> from bpkit.callbacks import NoiseScaleMonitor
        >>> monitor = NoiseScaleMonitor()
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=1, logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> monitor.source, monitor.ema
        ('auto', 0.95)
    """

    who, metric_prefix = "bpkit NoiseScaleMonitor", "noise"

    def __init__(self, log_every_n_steps: int | None = None, source: str = "auto", ema: float = 0.95,
                 every_n_steps: int | None = None, parts: int = 2,
                 loss_fn: Callable[[pl.LightningModule, Any], torch.Tensor] | None = None) -> None:
        super().__init__(log_every_n_steps)
        self.source = check_choice("source", source, SOURCES)
        self.estimator = NoiseScaleEstimator(ema=ema)
        self.ema = self.estimator.ema
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, 1)
        self.every_n_steps = every_n_steps
        self.parts = check_int("parts", parts, 2)
        if loss_fn is not None and not callable(loss_fn):
            raise BpkitConfigError("loss_fn", loss_fn, "a callable loss_fn(pl_module, batch) -> loss, or null")
        self.loss_fn = loss_fn
        self.mode: str | None = None  # the method in use: accumulation or split (decided at setup)
        self.last: dict[str, float] = {}  # the last numbers logged
        self._accumulate = 1
        self._world_size = 1
        self._step_batch = 0  # samples per optimizer step on this rank (all micro-batches)
        self._window: list[int] = []  # micro-batch sizes of the current accumulation window
        self._first_sq: torch.Tensor | None = None
        self._done_step: int | None = None  # the step whose split estimate is taken
        self._batch_step = 0  # the logging step of the current batch
        self._ddp_sq: torch.Tensor | None = None  # this rank's |g|^2 before the all-reduce, summed over buckets
        self._ddp_armed = False
        self._param_list: list[torch.Tensor] | None = None

    @property
    def sentence(self) -> str:
        """The last estimate in words (:func:`bpkit.stats.noise_scale.critical_batch_sentence`)."""
        return critical_batch_sentence(self.last.get("noise/batch_size", float("nan")), self.last.get("noise/b_simple"))

    # ---------------------------------------------------------------- setup

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.reset_cadence()
        self.log_interval(trainer)
        self._accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        self._world_size = int(getattr(trainer, "world_size", 1) or 1)
        automatic = bool(pl_module.automatic_optimization)
        ddp = self._world_size > 1 and _is_ddp(trainer.strategy)
        if self.source == "ddp" and not ddp:
            raise BpkitConfigError("source", self.source, "auto, accumulation or split: the ddp method needs "
                                   "Lightning's DDPStrategy with more than one process (here "
                                   f"{type(trainer.strategy).__name__}, world_size={self._world_size})")
        if self.source == "accumulation" and not (self._accumulate > 1 and automatic):
            raise BpkitConfigError("source", self.source, "auto or split: the accumulation method needs "
                                   "Trainer(accumulate_grad_batches > 1) and automatic optimization (here "
                                   f"accumulate_grad_batches={self._accumulate}, automatic_optimization={automatic})")
        if self.source in ("ddp", "accumulation", "split"):
            self.mode = self.source
        else:
            self.mode = "ddp" if ddp else "accumulation" if self._accumulate > 1 and automatic else "split"
        self._check_split(automatic)
        # run before the other callbacks' hooks of a batch. Lightning iterates over this very list while it calls
        # `setup`: moving the current element from index i to 0 leaves every later element at its index, so no
        # callback is skipped or called twice
        callbacks = trainer.callbacks
        if self in callbacks and callbacks[0] is not self:
            callbacks.remove(self)
            callbacks.insert(0, self)
        self._window, self._first_sq, self._done_step, self._step_batch = [], None, None, 0
        self._param_list = None

    def _params(self, pl_module: pl.LightningModule) -> list[torch.Tensor]:
        """The module's parameters, listed once per fit (walking a LightningModule's modules every step, torchmetrics
        included, costs more than the norms themselves on a small model)."""
        if self._param_list is None:
            self._param_list = list(pl_module.parameters())
        return self._param_list

    def _check_split(self, automatic: bool) -> None:
        if self.mode == "split" and not automatic and self.loss_fn is None:
            raise BpkitConfigError("loss_fn", None, "a callable loss_fn(pl_module, batch) -> loss: under manual "
                                   "optimization training_step steps the optimizer itself, so it cannot be re-run")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode != "ddp":
            return
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def hook(process_group, bucket):  # type: ignore[no-untyped-def]
            # DDP checks a hook's annotations against the real classes (this module's are strings): none here.
            # This rank's squared gradient norm of the bucket (on the device), then DDP's default all-reduce.
            if self._ddp_armed:
                sq = torch.linalg.vector_norm(bucket.buffer(), dtype=torch.float32).square()
                self._ddp_sq = sq if self._ddp_sq is None else self._ddp_sq + sq
            return default_hooks.allreduce_hook(process_group, bucket)

        model = trainer.strategy.model
        try:
            model.register_comm_hook(getattr(model, "process_group", None), hook)
        except (RuntimeError, ValueError, AttributeError) as err:  # a hook is already there: DDP takes one
            self.mode = "split"
            warnings.warn(f"{self.who}: could not add a DDP communication hook ({err}); another hook (e.g. "
                          "DDPStrategy(ddp_comm_hook=...)) is kept and the noise scale is measured from a split batch "
                          "on the log steps instead (one extra forward/backward there).", UserWarning, stacklevel=2)
            self._check_split(bool(pl_module.automatic_optimization))

    # ---------------------------------------------------------------- the step

    def _due(self, step: int) -> bool:
        if self.every_n_steps is not None:
            return (step + 1) % self.every_n_steps == 0
        return self._is_log(step)

    def _is_log(self, step: int) -> bool:
        interval = self._log_interval or 0
        return interval > 0 and (step + 1) % interval == 0

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = self._batch_step = self.batch_step(trainer)
        size = batch_size_of(batch) or 0
        first = not self._window
        self._window.append(size)
        if self.mode == "ddp" and first:  # every optimizer step: the hook runs on the window's last backward only
            self._ddp_armed, self._ddp_sq = True, None
        if self.mode != "split" or not first or self._done_step == step or not self._due(step):
            return
        self._done_step = step
        self._split_estimate(trainer, pl_module, batch, batch_idx)

    def _loss(self, pl_module: pl.LightningModule, piece: Any, batch_idx: int) -> torch.Tensor:
        if self.loss_fn is not None:
            loss = self.loss_fn(pl_module, piece)
        elif callable(getattr(pl_module, "compute_loss", None)) and isinstance(piece, (list, tuple)) \
                and len(piece) == 2:
            x, y = piece
            loss = pl_module.compute_loss(pl_module(x), y)  # type: ignore[operator]
        else:
            undo = _mute_logging(pl_module)
            try:
                loss = pl_module.training_step(piece, batch_idx)
            finally:
                undo()
        if isinstance(loss, Mapping):
            loss = loss.get("loss")
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise BpkitConfigError("loss_fn", self.loss_fn, "a loss function that returns the batch's mean loss as a "
                                   f"0-dim tensor (got {type(loss).__name__}); give NoiseScaleMonitor(loss_fn=...)")
        return loss

    def _split_estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if not params:
            return
        buffers = list(pl_module.buffers())
        saved = [b.detach().clone() for b in buffers]
        cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        try:
            with torch.random.fork_rng(devices=cuda):  # dropout in the extra pass draws from a forked RNG
                out = split_batch_sq_norms(lambda piece: self._loss(pl_module, piece, batch_idx), params, batch,
                                           self.parts)
        finally:
            with torch.no_grad():
                for buf, old in zip(buffers, saved):
                    buf.copy_(old)
        if out is not None:
            sq_small, sq_big, b_small, b_big = out
            self.estimator.update(sq_small, sq_big, b_small, b_big)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode != "accumulation" or len(self._window) != 1 or self._first_sq is not None:
            return
        grads = [p.grad for p in self._params(pl_module) if p.grad is not None]
        if not grads:
            return
        scale: float | torch.Tensor = float(self._accumulate)
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
            # the gradients are still multiplied by the AMP loss scale here (unscaled only before the optimizer
            # step); read the scale as a device tensor, no host read
            scale = scale / scaler._get_scale_async()
        self._first_sq = sq_norm(grads, scale)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        window, first_sq = self._window, self._first_sq
        if not window:  # a second optimizer of the same step: the window is already counted
            return
        self._window, self._first_sq = [], None
        self._step_batch = max(self._step_batch, sum(window))  # the nominal size, not an epoch's short last batch
        if self.mode == "ddp":
            self._ddp_step(trainer, pl_module, window)
            return
        if self.mode != "accumulation" or first_sq is None:
            return
        if len(window) != self._accumulate or len(set(window)) != 1 or window[0] < 1:
            return  # a short or uneven window (end of an epoch): the two sizes are not b and k*b
        grads = [p.grad for p in self._params(pl_module) if p.grad is not None]
        if grads:
            self.estimator.update(first_sq, sq_norm(grads), window[0], window[0] * self._accumulate)

    def _ddp_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, window: list[int]) -> None:
        local_sq, self._ddp_sq, self._ddp_armed = self._ddp_sq, None, False
        if local_sq is None or len(set(window)) != 1 or (self._accumulate > 1 and len(window) != self._accumulate):
            return  # no all-reduce seen, or a short/uneven window
        grads = [p.grad for p in self._params(pl_module) if p.grad is not None]
        if not grads:
            return
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
            local_sq = local_sq / scaler._get_scale_async().float().square()  # the hook saw scaled gradients
        # each rank folds in its own |g_rank|^2 with the common |g_all|^2; the estimates are linear in both, so the
        # ranks' averages, averaged at the log step, are the estimates from the mean of the ranks' |g_rank|^2
        local = sum(window)
        self.estimator.update(local_sq, sq_norm(grads), local, local * self._world_size)

    # ---------------------------------------------------------------- logging

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.ends_window(trainer, pl_module):
            return  # inside an accumulation window
        if self._window:  # manual optimization: Lightning's on_before_optimizer_step may not have run
            self._step_batch = max(self._step_batch, sum(self._window))
            self._window, self._first_sq = [], None
        if self._is_log(self._batch_step):
            self._log(trainer, self._batch_step)

    def _read(self, trainer: pl.Trainer) -> dict[str, float]:
        state = self.estimator.device_state
        if self._world_size > 1:
            device = state.device if state is not None else trainer.strategy.root_device
            local = state if state is not None else torch.zeros(4, dtype=torch.float64, device=device)
            state = trainer.strategy.reduce(local.clone(), reduce_op="mean")
        return self.estimator.read(state)

    def _log(self, trainer: pl.Trainer, step: int) -> None:
        out = self._read(trainer)
        batch = float(self._step_batch * self._world_size)
        metrics = {"noise/batch_size": batch, "noise/estimates": float(out.get("estimates", 0))}
        if "grad_sq" in out:
            metrics["noise/grad_sq"], metrics["noise/trace"] = out["grad_sq"], out["trace"]
            b_simple = out["b_simple"]
            if b_simple == b_simple:  # not nan
                metrics["noise/b_simple"] = metrics["noise/critical_batch"] = b_simple
        self.last = metrics
        _sink.log_scalars(trainer, metrics, step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.last:
            self._log(trainer, self.batch_step(trainer))
        entry = {"b_simple": self.last.get("noise/b_simple"), "critical_batch": self.last.get("noise/critical_batch"),
                 "batch_size": self.last.get("noise/batch_size"), "grad_sq": self.last.get("noise/grad_sq"),
                 "trace": self.last.get("noise/trace"), "estimates": self.last.get("noise/estimates"),
                 "method": self.mode, "sentence": self.sentence}
        _sink.log_record(trainer, RECORD_ENTRY, self.batch_step(trainer), entry)

    # ---------------------------------------------------------------- checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "estimator": self.estimator.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "estimator" in state_dict:
            self.estimator.load_state_dict(state_dict["estimator"])
