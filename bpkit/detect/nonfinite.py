"""NaN or Inf in any gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bpkit.alert import Alert
from bpkit.detect._base import Detector, as_vector, join_names


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``GradientMonitor(on_nonfinite="raise")``; the message names the parameters."""


class NonFiniteDetector(Detector):
    """Flags steps whose gradients hold NaN or Inf, and remembers which tensors held them first.

    Example::

        >>> d = NonFiniteDetector()
        >>> d.update([False, True], 7)
        True
        >>> [a.where for a in d.alerts(["w", "b"])]
        ['b']
    """

    kind = "nonfinite"
    _state_names = ("count", "first_step", "first_mask", "total_steps")

    def _init_state(self, num: int) -> None:
        self.count = 0
        self.first_step = -1
        self.first_mask = np.zeros(num, dtype=bool)
        self.total_steps = 0

    def update(self, nonfinite: Any, step: int) -> bool:
        """Record one step; ``nonfinite`` is one flag per tensor (host values). Returns "any"."""
        mask = as_vector(nonfinite, bool)
        self._ensure(mask.size)
        happened = bool(mask.any())
        if happened:
            if self.first_step < 0:
                self.first_step, self.first_mask = int(step), mask
            self.count += 1
            self.total_steps += 1
        return happened

    def update_many(self, nonfinite: np.ndarray, steps: Sequence[int]) -> bool:
        """:meth:`update` for many steps at once (``(steps, tensors)`` flags, in step order), the same state.
        Returns "any" for the last step."""
        masks = np.asarray(nonfinite, dtype=bool).reshape(len(steps), -1)
        if not len(steps):
            return False
        self._ensure(masks.shape[1])
        hit = masks.any(axis=1)
        rows = np.flatnonzero(hit)
        if rows.size:
            if self.first_step < 0:
                self.first_step, self.first_mask = int(steps[rows[0]]), masks[rows[0]].copy()
            self.count += int(rows.size)
            self.total_steps += int(rows.size)
        return bool(hit[-1])

    def alerts(self, names: Sequence[str]) -> list[Alert]:
        """The non-finite steps seen since the last call (one alert, or none); clears them."""
        if not self._ready:
            return []
        step, mask = self.first_step, self.first_mask
        count = self._take_events()
        if count == 0:
            return []
        bad = [n for n, m in zip(names, mask) if m] or ["(the total norm overflowed)"]
        return [Alert("nonfinite", step, ", ".join(bad), float(count), 0.0, nonfinite_message(bad, step, count))]


def nonfinite_message(bad: Sequence[str], step: int, count: int = 1) -> str:
    more = f" ({count} steps with NaN/Inf gradients since the last report)" if count > 1 else ""
    first = bad[0] if bad else "?"
    return (f"NaN/Inf gradient at step {step} in {len(bad)} tensor(s), first {first}: {join_names(bad)}{more}. "
            "Look for a log/sqrt/division of zero or an overflow in the forward pass; lower the learning rate, "
            "clip gradients or use bf16 instead of fp16.")
