"""GradientCheck: finite differences against autograd on the module's own training_step, at train start."""

from __future__ import annotations

import glob
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from bpkit.alert import Alert
from bpkit.callbacks import _sink
from bpkit.callbacks._base import BpkitCallback
from bpkit.record import ENTRY_GRADCHECK, WHERE_BATCH
from bpkit.callbacks._checks import check_bool
from bpkit.errors import BpkitConfigError, check_choice, check_float, check_int
from bpkit.gradcheck import MODES, GradcheckError, GradcheckReport, GradcheckUnsupported, check_gradients
from bpkit.gradcheck.check import validate_options

ON_FAILURE = ("warn", "raise")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class GradientCheck(BpkitCallback):
    r"""Check the gradient of the whole LightningModule numerically when training starts.

    When the first training batch arrives (already on the device, before the first optimizer step)
    and, with ``every_n_steps``, at every multiple of it, the callback runs
    :func:`bpkit.gradcheck.check_gradients` on a float64 copy of the module, with the loss of the
    module's own ``training_step`` on that batch (``training_step(batch)`` when it takes one argument;
    the first chunk with a loss for a ``bpkit.tbptt.TBPTTModule``). By default it checks the tensors the
    optimizers update. The module, its state (BatchNorm statistics, replay buffers, environments), the
    torch/Python/NumPy RNG streams and the training run are unchanged: the step runs only on the copy,
    and a run with the callback trains bit for bit like one without it.

    Each check logs its table to the run record (``type: "gradcheck"``), prints it at INFO level,
    and logs the scalars ``gradcheck/max_rel_error``, ``gradcheck/failed_tensors``,
    ``gradcheck/checked_tensors``, ``gradcheck/total_tensors`` and ``gradcheck/seconds``. A failure
    becomes an :class:`~bpkit.Alert` of kind ``gradcheck`` naming the failing tensors (kept in
    ``.alerts``, warned and recorded), or raises :class:`~bpkit.gradcheck.GradcheckError` with
    ``on_failure="raise"``. Steps without a check do no work and read nothing from the device.

    The check never stops training otherwise. What it cannot check it skips with one warning
    (``bpkit GradientCheck: skipped at step N: <why>. To check by hand: ...``) and a record entry
    ``{"skipped": why, "hint": ...}``: a manual-optimization ``training_step`` (it steps the optimizers),
    a model without trainable parameters, a loss that is not a deterministic function of the weights
    (randomness the check cannot re-seed, an environment, a replay buffer or a target network that changes
    with each call), a module that cannot be copied, a step that fails on the copy. When the float64 copy
    cannot run (a cast such as ``x.float()``, a float32 tensor created inside ``forward``), the check runs
    in float32 with a warning; there, tensors whose finite differences disagree only within round-off are
    reported as inconclusive, not failed. Only ``params`` matching no tensor raises (a wrong argument).

    ``max_seconds`` bounds the check's time: tensors are checked most informative first (the first, the
    last, then spread across depth), and when time runs out the report, a warning and the record say what
    was covered (``checked 12 of 89 tensors (3.1 M of 25 M elements) in 5.0 s; the rest were not checked``).

    Args:
        mode: ``directional`` (a few forward passes per tensor, any size) or ``full`` (per element).
        every_n_steps: also check at every multiple of this many optimizer steps; ``None``: only at start.
        params: glob(s) over parameter names to check (``"model.blocks.0.*"``); default: the trainable
            tensors the optimizers update (all trainable ones when the optimizers hold none of them).
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
        max_seconds: time budget of each check in seconds (``None``: no limit, check every tensor).

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

    who, metric_prefix = "bpkit GradientCheck", "gradcheck"

    def __init__(self, mode: str = "directional", every_n_steps: int | None = None,
                 params: str | Sequence[str] | None = None, n_directions: int = 3, max_elements: int = 32,
                 eps: float | None = None, rtol: float | None = None, atol: float | None = None,
                 dtype: str | torch.dtype = "float64", on_failure: str = "warn", batch_independence: bool = False,
                 train: bool = True, seed: int = 0, progress: bool | str = "auto",
                 max_seconds: float | None = 5.0) -> None:
        super().__init__()
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
        self.max_seconds = None if max_seconds is None else check_float("max_seconds", max_seconds, 0.0,
                                                                         low_inclusive=False)
        self.dtype = dtype
        self.batch_independence = check_bool("batch_independence", batch_independence)
        check_bool("train", train)
        self._kwargs: dict[str, Any] = dict(mode=mode, params=params, n_directions=n_directions,
                                            max_elements=max_elements, eps=eps, rtol=rtol, atol=atol, dtype=dtype,
                                            train=train, seed=seed, batch_independence=self.batch_independence,
                                            max_seconds=self.max_seconds)
        validate_options(mode=mode, n_directions=n_directions, max_elements=max_elements, eps=eps, rtol=rtol,
                         atol=atol, dtype=dtype, seed=seed)
        self.reports: list[tuple[int, GradcheckReport]] = []
        #: ``(step, why)`` for every check that could not run
        self.skipped: list[tuple[int, str]] = []
        self._warned: set[str] = set()
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
        try:
            report = self.check(trainer, pl_module, batch, batch_idx)
        except BpkitConfigError as exc:
            if exc.key == "params":  # the callback's own argument matches nothing: a configuration error
                raise
            self._skip(trainer, step, exc)
            return
        except Exception as exc:  # the check must never stop the run
            self._skip(trainer, step, exc)
            return
        self._handle(trainer, report, step)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
              batch_idx: int = 0) -> GradcheckReport:
        """Run one check of ``pl_module`` on ``batch`` now (the hook calls this).

        Raises what :func:`~bpkit.gradcheck.check_gradients` raises (the hook turns it into a skip), after
        a float32 retry when the float64 copy cannot evaluate the step.
        """
        kwargs = dict(self._kwargs)
        if kwargs["params"] is None:
            kwargs["params"] = _optimized(trainer, pl_module)
        bar = _ProgressBar(self.progress, trainer)
        try:
            try:
                return check_gradients(pl_module, batch, batch_idx=batch_idx, progress=bar, **kwargs)
            except BpkitConfigError as exc:
                if not (exc.key == "batch" and exc.__cause__ is not None and kwargs["dtype"] == torch.float64):
                    raise
                first_error = exc.__cause__
            bar.close()
            bar = _ProgressBar(self.progress, trainer)
            kwargs.update(dtype=torch.float32, eps=None, rtol=None, atol=None)
            try:
                report = check_gradients(pl_module, batch, batch_idx=batch_idx, progress=bar, **kwargs)
            except BpkitConfigError as exc:
                if exc.key == "batch":
                    raise GradcheckUnsupported(
                        f"training_step fails on the float64 copy ({type(first_error).__name__}: {first_error}) "
                        f"and on a float32 copy ({exc.expected})",
                        "bpkit.gradcheck.check_gradients(model.net, (x, y), loss_fn=...) on the network itself, "
                        "with a batch it accepts") from exc
                raise
            report.notes.insert(0, f"ran in float32: the float64 copy cannot run the step "
                                   f"({type(first_error).__name__}: {_short(first_error)}; a cast such as x.float() "
                                   f"or a float32 tensor created in forward?). Float32 finite differences are "
                                   f"unreliable: tensors that disagree only within round-off are reported as "
                                   f"inconclusive, not failed")
            return report
        finally:
            bar.close()

    def _skip(self, trainer: pl.Trainer, step: int, exc: BaseException) -> None:
        """One warning and a record entry saying why the check was skipped; training goes on."""
        if isinstance(exc, GradcheckUnsupported):
            reason, hint = exc.reason, exc.hint
        else:
            reason = f"{type(exc).__name__}: {exc}"
            hint = ("bpkit.gradcheck.check_gradients(model, batch) outside the Trainer, or on the network itself: "
                    "bpkit.gradcheck.check_gradients(model.net, (x, y), loss_fn=torch.nn.functional.cross_entropy)")
        message = f"bpkit GradientCheck: skipped at step {step}: {reason}. To check by hand: {hint}"
        self.skipped.append((step, reason))
        if trainer.is_global_zero and reason not in self._warned:  # once per reason: every_n_steps would repeat it
            self._warned.add(reason)
            warnings.warn(message, UserWarning, stacklevel=2)
        _sink.log_record(trainer, ENTRY_GRADCHECK, step, {"skipped": reason, "hint": hint})
        trainer.strategy.reduce_boolean_decision(False, all=False)  # the same collectives as a check on every rank

    def _handle(self, trainer: pl.Trainer, report: GradcheckReport, step: int) -> None:
        self.reports.append((step, report))
        _sink.log_record(trainer, ENTRY_GRADCHECK, step, report.to_dict())
        _sink.log_scalars(trainer, {"gradcheck/max_rel_error": report.max_rel_error,
                                    "gradcheck/failed_tensors": float(len(report.failed)),
                                    "gradcheck/inconclusive_tensors": float(len(report.inconclusive)),
                                    "gradcheck/checked_tensors": float(report.checked_tensors),
                                    "gradcheck/total_tensors": float(report.total_tensors),
                                    "gradcheck/seconds": report.seconds}, step)
        rank_zero_info(str(report))
        if trainer.is_global_zero:
            for note in report.notes:
                if note.startswith("ran in float32"):
                    warnings.warn(f"bpkit GradientCheck at step {step}: {note}", UserWarning, stacklevel=2)
            if report.unchecked:
                warnings.warn(f"bpkit GradientCheck at step {step}: {report.coverage}. Raise max_seconds (None: no "
                              f"limit) or narrow params=... to check more", UserWarning, stacklevel=2)
        failed = not report.passed
        if failed:
            self.emit(trainer, [_alert(report, step)])
        any_failed = trainer.strategy.reduce_boolean_decision(failed, all=False)
        if any_failed and self.on_failure == "raise":
            raise GradcheckError(f"bpkit GradientCheck failed at step {step}"
                                 + (" on another rank" if not failed else f":\n{report}"))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
        super().load_state_dict(state_dict)


def _optimized(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str] | None:
    """Exact-name globs of the trainable tensors the optimizers update; ``None`` (all trainable) when none match.

    A tensor no optimizer updates (a target network, a frozen teacher read through ``detach``) has no
    gradient to check, and finite differences would see a dependence that autograd is told to ignore.
    """
    held = {id(p) for opt in getattr(trainer, "optimizers", []) or [] for g in opt.param_groups for p in g["params"]}
    trainable = [n for n, p in pl_module.named_parameters() if p.requires_grad]
    names = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) in held]
    if not names or len(names) == len(trainable):
        return None
    return [glob.escape(n) for n in names]


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
        if bi.origin:
            message += f". It happens {bi.origin}"
        where, value = WHERE_BATCH, max(s["max_leak"] for s in bi.samples)
        return Alert("gradcheck", step, where, float(value), float(report.rtol), message, origin=bi.origin)
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
