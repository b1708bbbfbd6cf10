"""When a bpkit callback logs: Lightning's own rule, decided in one place for every callback.

Lightning logs a training batch's metrics at the step ``fit_loop.epoch_loop._batches_that_stepped``
(it moves once per batch that stepped, whatever the number of optimizers, and not between the
micro-batches of an accumulation window), on batches where ``(step + 1) % log_every_n_steps == 0``,
and never when ``log_every_n_steps == 0``. bpkit's callbacks use the same step and the same rule, so
``grad/*``, ``act/*`` and ``clip/*`` of a batch land at the step of that batch's ``train/loss``.
"""

from __future__ import annotations

import warnings
from typing import Any
from weakref import WeakSet

# Trainers already told that log_every_n_steps=0 turns bpkit's statistics off (one warning, not one per callback)
_WARNED: "WeakSet[Any]" = WeakSet()


def batch_step(trainer: Any) -> int:
    """The step at which Lightning logs the current training batch's metrics."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    return int(step) if isinstance(step, int) else int(trainer.global_step)


def interval(trainer: Any, own: int | None, who: str = "bpkit") -> int:
    """The callback's own ``log_every_n_steps``, else the Trainer's; 0 means no periodic logging."""
    every = int(own) if own is not None else int(getattr(trainer, "log_every_n_steps", 50) or 0)
    if every == 0 and own is None:
        _warn_off(trainer, who)
    return every


def is_log_step(step: int, every: int) -> bool:
    """Does the batch with this logging step log (Lightning's rule for ``train/*`` metrics)?"""
    return every > 0 and (step + 1) % every == 0


def is_log_batch(trainer: Any, every: int) -> bool:
    """Does the current batch log? :func:`is_log_step` of :func:`batch_step`."""
    return is_log_step(batch_step(trainer), every)


def ends_window(trainer: Any, pl_module: Any) -> bool:
    """Is the current batch the last micro-batch of its optimizer window (checked in ``on_train_batch_end``)?
    Always under manual optimization, where Lightning does not accumulate."""
    should_accumulate = getattr(getattr(trainer, "fit_loop", None), "_should_accumulate", None)
    return not (pl_module.automatic_optimization and callable(should_accumulate) and should_accumulate())


def _warn_off(trainer: Any, who: str) -> None:
    try:
        if trainer in _WARNED:
            return
        _WARNED.add(trainer)
    except TypeError:  # a test double that cannot be weakly referenced
        pass
    warnings.warn(f"{who}: Trainer(log_every_n_steps=0) logs no training metrics, so bpkit logs no statistics either; "
                  "the rules still see every step and alerts are still warned and recorded. Give the callback "
                  "log_every_n_steps=N to log its statistics anyway.", UserWarning, stacklevel=3)
