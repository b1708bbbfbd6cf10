"""CurvatureMonitor: the Hessian's top and most negative eigenvalues, its trace and the sharpness against the
learning rate, every N steps on a fixed probe batch, with ``sharpness`` and ``saddle`` alerts.

A thin Lightning adapter over :class:`bpkit.curvature.CurvatureProbe` (Lanczos, Hutchinson, the rules): this file
decides when (every ``every_n_steps`` optimizer steps), on what (the first training batch, or a given one), how the
loss is obtained (``training_step`` with logging silenced, in eval mode, float32, RNG and buffers preserved), where
it runs under DDP (rank 0, numbers broadcast), and logs through bpkit's sink.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from typing_extensions import override

from bpkit.callbacks import _sink
from bpkit.callbacks._base import BpkitCallback, muted_logging
from bpkit.curvature.probe import DEFAULT_EVERY_N_STEPS, CurvatureProbe
from bpkit.curvature.state import preserved_module, preserved_rng
from bpkit.errors import BpkitConfigError, check_bool




class CurvatureMonitor(BpkitCallback):
    r"""Curvature of the loss surface every ``every_n_steps`` steps: ``curvature/lambda_max`` (top Hessian
    eigenvalue), ``curvature/lambda_min`` (most negative), ``curvature/trace`` (Hutchinson), and
    ``curvature/sharpness_x_lr`` against the gradient-descent stability limit 2 (Cohen et al. 2021), with
    ``sharpness`` and ``saddle`` alerts.

    How it measures (details in :class:`bpkit.curvature.CurvatureProbe`): on a fixed probe batch (the first training
    batch, cloned, unless ``probe_batch`` is given) it computes the loss, its gradient with a graph, and
    Hessian-vector products by double backward: Lanczos with full reorthogonalization (at most ``max_iter``
    products; stops when both extreme Ritz values have a relative residual under ``tol``, each then within
    ``tol x max|lambda|`` of a true eigenvalue) and Hutchinson's estimator with ``trace_samples`` Rademacher probes
    deflated by the Lanczos basis. Also logged: ``curvature/trace_stderr``, ``curvature/residual`` (the Lanczos
    residual relative to ``max|lambda|``), ``curvature/hvps``, ``curvature/grad_norm``, ``curvature/loss`` (on the
    probe batch) and ``curvature/lr_limit`` (the learning rate at which ``sharpness_x_lr`` would be 2).

    ``sharpness_x_lr`` is ``lr x lambda_max`` for SGD; with momentum ``beta`` it is ``lr x lambda_max / (1 + beta)``
    (so the limit ``(2 + 2 beta) / lr`` maps to 2); for Adam/AdamW it is the *preconditioned* sharpness of Cohen et
    al. 2022, ``lambda_max(P^-1 H)`` with ``P = sqrt(v_hat) + eps`` read from the optimizer's state, times
    ``lr (1 - beta1) / (1 + beta1)`` (their limit ``(2 + 2 beta1) / ((1 - beta1) lr)`` maps to 2; absent until
    Adam's first step); RMSprop and Adagrad likewise; other optimizers get the raw ``lr x lambda_max``. With several
    optimizers, the first one's parameter groups are used.

    The loss contract: the probe calls ``pl_module.training_step(batch, 0)`` and takes the loss from a tensor or a
    mapping's ``"loss"``, with ``self.log``/``self.log_dict`` silenced and the module's torchmetrics states put back
    afterwards (the epoch's ``train/*`` metrics do not see the probe). A module that cannot be probed this way
    (manual optimization, a ``training_step`` that needs a real ``batch_idx`` or returns ``None``, an operation
    without double backward such as a fused attention kernel or cuDNN RNN) gets one clear warning and the monitor
    stops probing; pass ``loss_fn(pl_module, batch) -> loss`` to give the loss yourself.

    A monitor leaves training unchanged: the probe runs with the module in eval mode (``eval_mode``: BatchNorm uses
    its running statistics, dropout is off, so the Hessian is of a deterministic function), then puts back every
    submodule's training flag and every buffer (BatchNorm's running statistics); it uses ``torch.autograd.grad``
    (``.grad`` untouched); it saves and restores the RNG states of Python, numpy, torch's CPU and CUDA generators;
    its own Rademacher vectors come from a private generator. Under AMP the probe runs with autocast off (float32,
    for parameters stored in float32). Under DDP the probe runs on rank 0 on rank 0's probe batch and the numbers are
    broadcast, so every rank keeps the same ``.alerts``.

    Args:
        every_n_steps: probe at optimizer steps ``0, N, 2N, ...`` (Lightning's logging step of the batch). The
            default (2000) keeps the amortised cost under 5% of a training step on the recipes' models (a probe
            costs 63-73 of their steps on CPU, 3.1-3.7% amortised: ``benchmarks/results/curvature_cost.md``); 0: never.
        probe_batch: the batch to probe on (as the dataloader yields it; moved to the device); default: the first
            training batch, cloned.
        max_iter: Lanczos iterations (Hessian-vector products) at most.
        tol: Lanczos relative residual tolerance.
        trace_samples: Hutchinson probes; 0: no trace.
        sharpness: the ``sharpness`` rule: ``True``, ``False`` or ``{"limit": 2.0}``.
        saddle: the ``saddle`` rule: ``True``, ``False`` or ``{"neg_ratio": 0.1, "grad_ratio": 0.01}``.
        preconditioned: for adaptive optimizers, the preconditioned sharpness (default; a second, top-only Lanczos
            run) or the raw ``lr x lambda_max`` (``False``).
        eval_mode: probe with the module in eval mode (default) or in train mode (dropout then draws one fixed mask
            per probe; BatchNorm uses the probe batch's statistics; buffers are restored either way).
        loss_fn: optional ``loss_fn(pl_module, batch) -> scalar tensor`` used instead of ``training_step``.
        seed: seed of the probe's Rademacher vectors.

    Raises:
        BpkitConfigError: on bad counts, tolerances or rule options, or a ``loss_fn`` that is not callable.

    Example::

        >>> import lightning.pytorch as pl
        >>> from bpkit.callbacks import CurvatureMonitor
        >>> monitor = CurvatureMonitor(every_n_steps=100, trace_samples=10)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=1, logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
    """

    who, metric_prefix = "bpkit CurvatureMonitor", "curvature"

    def __init__(self, every_n_steps: int = DEFAULT_EVERY_N_STEPS, probe_batch: Any = None, max_iter: int = 20,
                 tol: float = 1e-3, trace_samples: int = 30, sharpness: bool | Mapping[str, Any] = True,
                 saddle: bool | Mapping[str, Any] = True, preconditioned: bool = True, eval_mode: bool = True,
                 loss_fn: Callable[[pl.LightningModule, Any], torch.Tensor] | None = None, seed: int = 0) -> None:
        super().__init__(None)
        self.probe = CurvatureProbe(every_n_steps=every_n_steps, max_iter=max_iter, tol=tol,
                                    trace_samples=trace_samples, sharpness=sharpness, saddle=saddle,
                                    preconditioned=preconditioned, seed=seed)
        self.every_n_steps = self.probe.every_n_steps
        self.eval_mode = check_bool("eval_mode", eval_mode)
        if loss_fn is not None and not callable(loss_fn):
            raise BpkitConfigError("loss_fn", loss_fn, "a callable loss_fn(pl_module, batch) -> scalar tensor")
        self.loss_fn = loss_fn
        self.probe_batch = probe_batch
        self._batch: Any = None
        self._last_step: int | None = None
        self._disabled: str | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    @property
    def history(self) -> list[dict[str, float]]:
        """One dict per probe: ``step`` and the ``curvature/*`` metrics."""
        return self.probe.history

    # ---------------------------------------------------------------- setup

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.reset_cadence()
        self._batch, self._last_step, self._disabled = None, None, None
        if not pl_module.automatic_optimization and self.loss_fn is None:
            self._disable(f"{type(pl_module).__name__} uses manual optimization, so its training_step steps the "
                          "optimizer itself and cannot be called for a probe")

    def _disable(self, why: str) -> None:
        self._disabled = why
        warnings.warn(f"{self.who}: not probing the curvature: {why}. Pass "
                      "CurvatureMonitor(loss_fn=lambda module, batch: <scalar loss>) to give the probe's loss "
                      "yourself.", UserWarning, stacklevel=3)

    # ---------------------------------------------------------------- the probe

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._disabled is not None:
            return
        if self._batch is None:
            if self.probe_batch is not None:
                self._batch = trainer.strategy.batch_to_device(self.probe_batch)
            else:  # the first training batch, cloned (a dataloader may reuse its memory)
                self._batch = apply_to_collection(batch, torch.Tensor, lambda t: t.detach().clone())
        step = self.batch_step(trainer)
        if step == self._last_step or not self.probe.due(step):
            return  # a later micro-batch of the same optimizer step, or not a probe step
        self._last_step = step
        metrics: dict[str, float] | None = None
        why: str | None = None
        if trainer.is_global_zero:
            try:
                metrics = self._measure(trainer, pl_module, step)
            except BpkitConfigError as err:
                why = str(err)
            except RuntimeError as err:
                why = (f"the Hessian-vector product failed ({type(err).__name__}: {err}); every operation of the loss "
                       "needs a double backward")
        if trainer.world_size > 1:  # rank 0's numbers to every rank, which applies the same rules to them
            metrics, rule, why = trainer.strategy.broadcast((metrics, self.probe.last_rule, why), src=0)
            if not trainer.is_global_zero and metrics is not None:
                self.probe.observe(step, metrics, rule)
        if why is not None:
            self._disable(why)
            return
        if metrics is None:
            return
        _sink.log_scalars(trainer, metrics, step)
        self.emit(trainer, self.probe.take_new_alerts())

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, float] | None:
        batch = self._batch
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if not params:
            raise BpkitConfigError("pl_module", type(pl_module).__name__, "a module with trainable parameters")
        optimizer = trainer.optimizers[0] if trainer.optimizers else None

        def loss_fn() -> torch.Tensor:
            if self.loss_fn is not None:
                out = self.loss_fn(pl_module, batch)
            else:
                out = pl_module.training_step(batch, 0)
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise BpkitConfigError("training_step", type(out).__name__,
                                       "a scalar loss tensor with a graph, or a dict with one under 'loss'")
            return loss.float()

        device_type = params[0].device.type if params[0].device.type in ("cpu", "cuda", "xpu", "mps") else "cpu"
        # the probe's loss is not the epoch's: training_step's logging is muted
        with muted_logging(pl_module), preserved_rng(), preserved_module(pl_module, eval_mode=self.eval_mode), \
                torch.autocast(device_type=device_type, enabled=False):
            return self.probe.measure(loss_fn, params, step, optimizer)

    # ---------------------------------------------------------------- checkpointing

