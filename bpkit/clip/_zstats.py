"""Running mean and variance of the total gradient norm, kept on the device (shared by zclip and skip).

The statistics follow ZClip (Kumar et al. 2025): the first ``warmup_steps`` norms are collected and
their mean and (population) variance start the EMA; afterwards
``mean <- alpha * mean + (1 - alpha) * x`` and ``var <- alpha * var + (1 - alpha) * (x - mean)^2`` with
the *updated* mean. Non-finite norms are never folded into the statistics.
"""

from __future__ import annotations

from typing import Any

import torch


class ZStats:
    def __init__(self, alpha: float, warmup_steps: int) -> None:
        self.alpha = alpha
        self.warmup_steps = warmup_steps
        self.steps = 0  # norms offered so far (host-side count: no device read needed)
        self.buffer: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.steps >= self.warmup_steps

    def _on(self, like: torch.Tensor) -> None:
        if self.buffer is None:
            self.buffer = torch.full((self.warmup_steps,), float("nan"), device=like.device)
            self.mean = torch.zeros((), device=like.device)
            self.var = torch.zeros((), device=like.device)
        elif self.buffer.device != like.device:
            self.buffer, self.mean, self.var = (t.to(like.device) for t in (self.buffer, self.mean, self.var))

    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def warmup(self, total: torch.Tensor) -> None:
        """Record one norm of the warm-up; the last one initialises mean and variance."""
        self._on(total)
        x = total.detach().float()
        self.buffer[self.steps].copy_(torch.where(torch.isfinite(x), x, torch.full_like(x, float("nan"))))
        self.steps += 1
        if self.steps == self.warmup_steps:
            mean = torch.nanmean(self.buffer)
            self.mean.copy_(mean)
            self.var.copy_(torch.nanmean((self.buffer - mean).square()))

    def update(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Fold ``x`` into the EMA unless it is non-finite or ``keep`` is False."""
        self._on(x)
        x = x.detach().float()
        mean = self.alpha * self.mean + (1 - self.alpha) * x
        var = self.alpha * self.var + (1 - self.alpha) * (x - mean).square()
        ok = torch.isfinite(x) if keep is None else torch.isfinite(x) & keep
        self.mean.copy_(torch.where(ok, mean, self.mean))
        self.var.copy_(torch.where(ok, var, self.var))
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().clone()

        return {"steps": self.steps, "buffer": copy(self.buffer), "mean": copy(self.mean), "var": copy(self.var)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.buffer, self.mean, self.var = state["buffer"], state["mean"], state["var"]
