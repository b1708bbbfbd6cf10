"""GradientCheck: finite differences against autograd on the module's own training_step, at train start."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from bpkit.alert import Alert
from bpkit.callbacks import _sink
from bpkit.callbacks._checks import check_bool
from bpkit.errors import BpkitConfigError, check_choice, check_int
from bpkit.gradcheck import MODES, GradcheckError, GradcheckReport, check_gradients
from bpkit.gradcheck.check import validate_options

ON_FAILURE = ("warn", "raise")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class GradientCheck(Callback):
    r"""Check the gradient of the whole LightningModule numerically when training starts.

    When the first training batch arrives (already on the device, before the first optimizer step)
    and, with ``every_n_steps``, at every multiple of it, the callback runs
    :func:`bpkit.gradcheck.check_gradients` on a float64 copy of the module, with the loss of the
    module's own ``training_step`` on that batch. The module, its RNG streams and the training run
    are unchanged: a run with the callback trains bit for bit like one without it.

    Each check logs its table to the run record (``type: "gradcheck"``), prints it at INFO level,
    and logs the scalars ``gradcheck/max_rel_error``, ``gradcheck/failed_tensors`` and
    ``gradcheck/seconds``. A failure becomes an :class:`~bpkit.Alert` of kind ``gradcheck`` naming
    the failing tensors (kept in ``.alerts``, warned and recorded), or raises
    :class:`~bpkit.gradcheck.GradcheckError` with ``on_failure="raise"``. Steps without a check do
    no work and read nothing from the device.

    Args:
        mode: ``directional`` (a few forward passes per tensor, any size) or ``full`` (per element).
        every_n_steps: also check at every multiple of this many optimizer steps; ``None``: only at start.
        params: glob(s) over parameter names to check (``"model.blocks.0.*"``); default: all trainable.
        n_directions: directions per tensor (directional mode).
        max_elements: elements per tensor (full mode).
        eps: finite-difference step (default 1e-6 in float64).
        rtol: relative tolerance (default 1e-3 in float64).
        atol: absolute tolerance (default 1e-8 in float64).
        dtype: ``float64`` (default) or ``float32`` for devices without float64; a string or torch dtype.
        on_failure: ``warn`` (alert and keep training) or ``raise``.
        batch_independence: also check that no sample's output depends on another sample's input.
        train: check in training mode (dropout with a fixed mask, BatchNorm on batch statistics).
        seed: seed of the evaluations and of the random directions.
        progress: show a progress bar: ``True``, ``False`` or ``"auto"`` (when more than 20 tensors
            are checked and the Trainer shows a progress bar).

    Raises:
        BpkitConfigError: on a bad argument.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from bpkit.callbacks import GradientCheck
        >>> check = GradientCheck(every_n_steps=1000, on_failure="raise")
        >>> trainer = Trainer(callbacks=[check], max_steps=10, logger=False)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> check.reports[0][1].passed  # doctest: +SKIP
        True
    """

    def __init__(self, mode: str = "directional", every_n_steps: int | None = None,
                 params: str | Sequence[str] | None = None, n_directions: int = 3, max_elements: int = 32,
                 eps: float | None = None, rtol: float | None = None, atol: float | None = None,
                 dtype: str | torch.dtype = "float64", on_failure: str = "warn", batch_independence: bool = False,
                 train: bool = True, seed: int = 0, progress: bool | str = "auto") -> None:
        self.mode = check_choice("mode", mode, MODES)
        self.every_n_steps = None if every_n_steps is None else check_int("every_n_steps", every_n_steps)
        if params is not None and not isinstance(params, str):
            params = list(params)
        self.params = params
        self.on_failure = check_choice("on_failure", on_failure, ON_FAILURE)
        if isinstance(dtype, str):
            dtype = _DTYPES[check_choice("dtype", dtype, _DTYPES)]
        if progress not in (True, False, "auto"):
            raise BpkitConfigError("progress", progress, "true, false or 'auto'")
        self.progress = progress
        self.batch_independence = check_bool("batch_independence", batch_independence)
        check_bool("train", train)
        self._kwargs: dict[str, Any] = dict(mode=mode, params=params, n_directions=n_directions,
                                            max_elements=max_elements, eps=eps, rtol=rtol, atol=atol, dtype=dtype,
                                            train=train, seed=seed, batch_independence=self.batch_independence)
        validate_options(mode=mode, n_directions=n_directions, max_elements=max_elements, eps=eps, rtol=rtol,
                         atol=atol, dtype=dtype, seed=seed)
        self.alerts: list[Alert] = []
        self.reports: list[tuple[int, GradcheckReport]] = []
        self._last_step: int | None = None
        self._checked_this_fit = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, every_n_steps=self.every_n_steps, params=self.params)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checked_this_fit = False

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        due = not self._checked_this_fit or (
            self.every_n_steps is not None and step % self.every_n_steps == 0 and step != self._last_step)
        if not due:
            return
        self._checked_this_fit = True
        self._last_step = step
        report = self.check(trainer, pl_module, batch, batch_idx)
        self._handle(trainer, report, step)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
              batch_idx: int = 0) -> GradcheckReport:
        """Run one check of ``pl_module`` on ``batch`` now (the hook calls this)."""
        bar = _ProgressBar(self.progress, trainer)
        try:
            return check_gradients(pl_module, batch, batch_idx=batch_idx, progress=bar, **self._kwargs)
        finally:
            bar.close()

    def _handle(self, trainer: pl.Trainer, report: GradcheckReport, step: int) -> None:
        self.reports.append((step, report))
        _sink.log_record(trainer, "gradcheck", step, report.to_dict())
        _sink.log_scalars(trainer, {"gradcheck/max_rel_error": report.max_rel_error,
                                    "gradcheck/failed_tensors": float(len(report.failed)),
                                    "gradcheck/seconds": report.seconds}, step)
        rank_zero_info(str(report))
        failed = not report.passed
        if failed:
            alert = _alert(report, step)
            self.alerts.append(alert)
            _sink.log_alert(trainer, alert)
        any_failed = trainer.strategy.reduce_boolean_decision(failed, all=False)
        if any_failed and self.on_failure == "raise":
            raise GradcheckError(f"bpkit GradientCheck failed at step {step}"
                                 + (" on another rank" if not failed else f":\n{report}"))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "alerts": [a.to_dict() for a in self.alerts]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
        self.alerts = [Alert(**a) for a in state_dict.get("alerts", [])]


def _alert(report: GradcheckReport, step: int) -> Alert:
    failed = report.failed
    if failed:
        row = {p.name: p for p in report.params}[report.suspect]
        message = (f"gradient check failed for {len(failed)} of {len(report.params)} tensors; look first at "
                   f"{report.suspect}: {row.reason}")
        where, value = ", ".join(failed), report.max_rel_error
    else:
        bi = report.batch_independence
        leaks = [s for s in bi.samples if s["leaking"]]
        message = (f"batch independence failed: the output of sample {leaks[0]['sample']} depends on the input of "
                   f"{leaks[0]['leaking']} other sample(s); a view/reshape or a batch-wide reduction mixes samples")
        where, value = "batch", max(s["max_leak"] for s in bi.samples)
    return Alert("gradcheck", step, where, float(value), float(report.rtol), message)


class _ProgressBar:
    """``progress(done, total, name)`` for check_gradients: a tqdm bar, opened lazily when worth it."""

    def __init__(self, setting: bool | str, trainer: pl.Trainer) -> None:
        self.setting = setting
        self.enabled = trainer.is_global_zero and (
            setting is True or (setting == "auto" and trainer.progress_bar_callback is not None))
        self.bar = None

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.enabled or (self.setting == "auto" and total <= 20):
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="Gradient check", unit="tensor", leave=False, dynamic_ncols=True)
        self.bar.set_postfix_str(name, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
