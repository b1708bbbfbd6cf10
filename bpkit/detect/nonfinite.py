"""NaN or Inf in any gradient."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from bpkit.alert import Alert
from bpkit.detect._base import Detector, join_names, new_event


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``GradientMonitor(on_nonfinite="raise")``; the message names the parameters."""


class NonFiniteDetector(Detector):
    """Flags steps whose gradients hold NaN or Inf, and remembers which tensors held them first.

    Example::

        >>> import torch
        >>> from bpkit.stats.readback import readback
        >>> d = NonFiniteDetector()
        >>> _ = d.update(torch.tensor([False, True]), torch.tensor(7))
        >>> [a.where for a in d.alerts(readback(d.pending()), ["w", "b"])]
        ['b']
    """

    kind = "nonfinite"
    _state_names = ("count", "first_step", "first_mask", "total_steps")

    def _init_state(self, device: torch.device, num: int) -> None:
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_mask = torch.zeros(num, dtype=torch.bool, device=device)
        self.total_steps = torch.zeros((), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, nonfinite: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Record one step; ``nonfinite`` is ``(N,)`` bool. Returns the on-device "any" flag."""
        self._ensure(nonfinite.device, nonfinite.numel())
        any_ = nonfinite.any()
        new = new_event(self.first_step, any_)
        self.first_step = torch.where(new, step, self.first_step)
        self.first_mask = torch.where(new, nonfinite, self.first_mask)
        self.count += any_
        self.total_steps += any_
        return any_

    def pending(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "first_step": self.first_step, "first_mask": self.first_mask}

    def alerts(self, host: Mapping[str, np.ndarray], names: Sequence[str]) -> list[Alert]:
        count = self._take_events(host)
        if count == 0:
            return []
        bad = [n for n, m in zip(names, np.asarray(host["first_mask"]).reshape(-1)) if m]
        step = int(host["first_step"])
        return [Alert("nonfinite", step, ", ".join(bad), float(count), 0.0, nonfinite_message(bad, step, count))]


def nonfinite_message(bad: Sequence[str], step: int, count: int = 1) -> str:
    more = f" ({count} steps with NaN/Inf gradients since the last report)" if count > 1 else ""
    first = bad[0] if bad else "?"
    return (f"NaN/Inf gradient at step {step} in {len(bad)} tensor(s), first {first}: {join_names(bad)}{more}. "
            "Look for a log/sqrt/division of zero or an overflow in the forward pass; lower the learning rate, "
            "clip gradients or use bf16 instead of fp16.")
