"""Shared plumbing of the detectors: their small host-side state, its checkpoint form, name formatting.

The statistics a detector reads are computed on the device and buffered there (one row per step);
GradientMonitor copies the buffer to the host once per log interval and replays it through the
detectors step by step. A rule is a few float operations per step in Python/numpy, which costs
nothing on the training step itself: running the same rules as tiny device kernels every step
would cost ~100 kernel launches per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

TINY = float(np.finfo(np.float32).tiny)  # the statistics are float32 on the device


def as_vector(values: Any, dtype: Any = np.float64) -> np.ndarray:
    """A 1-D numpy copy of a host array, a list or a (CPU) tensor."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.array(values, dtype=dtype).reshape(-1)


class Detector:
    """A rule over a stream of per-step statistics, fed in step order with host values.

    ``update(...)`` processes one step and returns whether the rule fired on it; ``alerts(names)``
    turns the events collected since the last call into ``Alert``s and clears them. Subclasses
    list their state in ``_state_names`` and create it in ``_init_state(num)`` (``num``: the
    length of the per-tensor vectors, known at the first update).
    """

    kind = ""
    _state_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._ready = False
        self._loaded: dict[str, Any] | None = None

    def _init_state(self, num: int) -> None:
        raise NotImplementedError

    def _ensure(self, num: int = 0) -> None:
        if self._ready:
            return
        self._init_state(num)
        if self._loaded is not None:
            for name in self._state_names:
                if name in self._loaded:
                    setattr(self, name, self._restore(name, getattr(self, name), self._loaded[name]))
            self._loaded = None
        self._ready = True

    def _restore(self, name: str, current: Any, saved: Any) -> Any:
        if isinstance(current, np.ndarray):
            value = np.array(saved.detach().cpu().numpy() if isinstance(saved, torch.Tensor) else saved,
                             dtype=current.dtype)
            if value.shape != current.shape:
                raise ValueError(f"{type(self).__name__}: checkpointed {name} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(current.shape)} (did the monitored parameters change?)")
            return value
        value = saved.item() if isinstance(saved, torch.Tensor) else saved
        return type(current)(value)

    def state_dict(self) -> dict[str, Any]:
        """The state as CPU tensors (loadable with ``torch.load(weights_only=True)``)."""
        if not self._ready:
            return dict(self._loaded or {})
        return {name: torch.tensor(np.copy(getattr(self, name))) for name in self._state_names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        self._ready = False

    def _persist(self, condition: np.ndarray, step: int) -> None:
        """Per-tensor patience: count the consecutive checks ``condition`` held (``run``), and mark a tensor newly
        over ``patience`` in ``new_mask`` (the step of the first such tensor in ``first_step``) until :meth:`_take_new`.
        The subclass keeps ``run``, ``latched``, ``new_mask`` and ``first_step`` in its state."""
        self.run = np.where(condition, self.run + 1, 0)
        hit = self.run >= self.patience
        fresh = hit & ~self.latched
        if fresh.any() and self.first_step < 0:
            self.first_step = int(step)
        self.new_mask |= fresh
        self.latched = hit

    def _take_new(self) -> tuple[np.ndarray, int]:
        """The tensors newly over ``patience`` since the last call and the first step of them; cleared."""
        mask, step = self.new_mask, self.first_step
        self.new_mask = np.zeros_like(mask)
        self.first_step = -1
        return mask, step

    def _take_events(self) -> int:
        """Events counted since the last report (0 if none); clears ``count`` and ``first_step``."""
        if not self._ready or self.count == 0:
            return 0
        count = int(self.count)
        self.count, self.first_step = 0, -1
        return count


def join_names(names: Sequence[str], limit: int = 6) -> str:
    """``a, b, c`` or ``a, b, c, ... z (12 in all)`` for long lists."""
    names = list(names)
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit - 1]) + f", ... {names[-1]} ({len(names)} in all)"


def median_low(values: np.ndarray) -> float:
    """The lower middle of the finite values (``torch.nanmedian``'s convention); NaN when there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan")
    return float(np.partition(finite, (finite.size - 1) // 2)[(finite.size - 1) // 2])
