"""Share this step's gradient norms between bpkit callbacks so the norm is computed once.

GradientMonitor publishes the norms it computed in ``on_before_optimizer_step``; a callback
that runs later in the same hook (GradientClipping) looks them up instead of recomputing.
The entry is valid only for the same optimizer, the same optimizer step and the same set of
parameters; anything else is a miss and the caller computes the norms itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import torch

# keyed by the LightningModule, held weakly: nothing is stored on the user's model
_CACHE: "WeakKeyDictionary[Any, StepNorms]" = WeakKeyDictionary()


@dataclass
class StepNorms:
    key: tuple
    param_ids: tuple[int, ...]
    norm_type: float
    per_tensor: torch.Tensor  # (N,) on device, in the order of ``param_ids``
    total: torch.Tensor  # () on device
    total_host: float | None = None  # the same number on the host, when the publisher read it anyway


def note_host_total(pl_module: Any, total: float) -> None:
    """The publisher read this step's total norm to the host (for its own decision): later callbacks may
    use it instead of reading again."""
    entry = _CACHE.get(pl_module)
    if entry is not None:
        entry.total_host = float(total)


def _key(trainer: Any, optimizer: Any) -> tuple:
    # the batch counter tells apart several optimizer steps taken within one global step
    # (manual optimization where global_step is advanced by the step itself)
    loop = getattr(trainer, "fit_loop", None)
    batch_idx = getattr(getattr(loop, "epoch_loop", None), "batch_progress", None)
    ready = getattr(getattr(batch_idx, "current", None), "ready", None)
    return (id(optimizer), int(trainer.global_step), ready)


def publish(pl_module: Any, trainer: Any, optimizer: Any, params: list[torch.Tensor], per_tensor: torch.Tensor,
            total: torch.Tensor, norm_type: float = 2.0, param_ids: tuple[int, ...] | None = None) -> None:
    """``param_ids``: ``tuple(id(p) for p in params)`` when the caller keeps it (saves a loop per step)."""
    ids = param_ids if param_ids is not None else tuple(id(p) for p in params)
    _CACHE[pl_module] = StepNorms(_key(trainer, optimizer), ids, float(norm_type), per_tensor, total)


def lookup(pl_module: Any, trainer: Any, optimizer: Any, params: list[torch.Tensor],
           norm_type: float = 2.0) -> StepNorms | None:
    entry = _CACHE.get(pl_module)
    if entry is None or entry.key != _key(trainer, optimizer) or entry.norm_type != float(norm_type):
        return None
    if entry.param_ids != tuple(id(p) for p in params):
        return None
    return entry


def clear(pl_module: Any) -> None:
    _CACHE.pop(pl_module, None)
