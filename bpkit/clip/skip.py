"""Skip the whole update when the total gradient norm is an extreme outlier (as OLMo does)."""

from __future__ import annotations

from typing import Any

import torch

from bpkit.clip._base import ClipPolicy, ClipResult
from bpkit.clip._zstats import ZStats
from bpkit.errors import BpkitConfigError, check_float, check_int


class SkipOnSpike(ClipPolicy):
    """Flag a step for skipping when the z-score of its total norm exceeds ``z_thresh``.

    The statistics are ZClip's (EMA mean and variance after ``warmup_steps`` norms, see
    :class:`~bpkit.clip.zclip.ZClip`); a skipped norm is not folded into them. The gradients are not
    changed: the caller drops the update when ``result.skip`` is true (``GradientClipping`` sets every
    ``p.grad = None``, so torch optimizers leave parameters and their state untouched). Deciding needs one
    1-element read of ``skip`` per step, the only host read of any policy.

    Args:
        z_thresh: z-score above which the step is skipped (> 0), default 6.0.
        alpha: EMA smoothing factor in (0, 1), default 0.97.
        warmup_steps: steps whose norms initialise the statistics (>= 1), default 25; nothing is
            skipped during warm-up except non-finite steps.
        skip_nonfinite: also skip steps whose total norm is NaN or inf (default True).
        eps: added to the standard deviation in the z-score.

    Raises:
        BpkitConfigError: on a value out of range.

    Example::

        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> sk = SkipOnSpike(warmup_steps=3)
        >>> for g in [1.0, 1.1, 0.9, 1.0, 50.0]:
        ...     p.grad = torch.tensor([g]); res = sk.clip_([p])
        >>> bool(res.skip), float(p.grad)
        (True, 50.0)
    """

    name = "skip"

    def __init__(self, z_thresh: float = 6.0, alpha: float = 0.97, warmup_steps: int = 25,
                 skip_nonfinite: bool = True, eps: float = 1e-6) -> None:
        self.z_thresh = check_float("z_thresh", z_thresh, 0.0, low_inclusive=False)
        self.alpha = check_float("alpha", alpha, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 1)
        if not isinstance(skip_nonfinite, bool):
            raise BpkitConfigError("skip_nonfinite", skip_nonfinite, "true or false")
        self.skip_nonfinite = skip_nonfinite
        self.eps = check_float("eps", eps, 0.0)
        self.stats = ZStats(self.alpha, self.warmup_steps)

    def apply(self, params: list[torch.Tensor], grads: list[torch.Tensor], total: torch.Tensor | None) -> ClipResult:
        total = total.detach().float()
        bad = ~torch.isfinite(total) if self.skip_nonfinite else torch.zeros_like(total, dtype=torch.bool)
        if not self.stats.ready:
            self.stats.warmup(total)
            threshold = torch.full_like(total, float("inf"))
            return ClipResult(total, torch.where(bad, torch.zeros_like(total), total), threshold, bad, skip=bad)
        std = self.stats.std()
        threshold = self.stats.mean + self.z_thresh * (std + self.eps)
        skip = ((total - self.stats.mean) / (std + self.eps) > self.z_thresh) | bad
        self.stats.update(total, keep=~skip)
        return ClipResult(total, torch.where(skip, torch.zeros_like(total), total), threshold, skip, skip=skip)

    def state_dict(self) -> dict[str, Any]:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state)

    def config(self) -> dict[str, Any]:
        return {"z_thresh": self.z_thresh, "alpha": self.alpha, "warmup_steps": self.warmup_steps,
                "skip_nonfinite": self.skip_nonfinite, "eps": self.eps}
