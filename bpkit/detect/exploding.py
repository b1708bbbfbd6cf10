"""A total gradient norm far above its recent history, or above an absolute bound."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from bpkit.alert import Alert
from bpkit.detect._base import Detector, join_names, new_event
from bpkit.errors import check_float, check_int


class ExplodingGradientError(FloatingPointError):
    """Raised by ``GradientMonitor(on_exploding="raise")``."""


class ExplodingDetector(Detector):
    """Flags steps whose total gradient norm stays above ``factor`` x its running median over the last
    ``window`` steps (after ``warmup`` steps), or above ``growth`` x its median over the first
    ``baseline_steps`` steps (an explosion that starts at once), for ``patience`` steps in a row; or
    that exceeds ``max_norm`` when given (at once). The alert names the tensors whose norm grew most against their own
    running average. ``patience`` keeps a single noisy step (that is the spike rule's job) and the
    gradual growth of the norm in healthy training from being called an explosion.

    Args:
        factor: multiple of the running median that counts as exploding (> 1).
        max_norm: absolute bound on the total norm (``None``: none).
        window: number of recent steps in the running median.
        warmup: steps seen before the median rule applies.
        patience: consecutive steps above a relative rule before it fires.
        growth: multiple of the median of the first ``baseline_steps`` total norms that counts as exploding.
        baseline_steps: steps whose median is the baseline of the ``growth`` rule.
        ema: smoothing of the per-tensor norm averages used to name the growing tensors.

    Raises:
        BpkitConfigError: on a factor <= 1, a non-positive bound, a window < 2 or a warmup < 1.

    Example::

        >>> import torch
        >>> from bpkit.stats.readback import readback
        >>> d = ExplodingDetector(warmup=3, patience=1)
        >>> for step, g in enumerate([1.0, 1.1, 0.9, 1.0, 50.0]):
        ...     _ = d.update(torch.tensor(g), torch.tensor([g, 1.0]), torch.tensor(step))
        >>> a = d.alerts(readback(d.pending()), ["w", "b"])[0]
        >>> a.step, a.value, a.where
        (4, 50.0, 'w')
    """

    kind = "exploding"
    _state_names = ("history", "seen", "ema", "count", "first_step", "first_threshold", "first_median", "peak",
                    "growth", "streak", "baseline")

    def __init__(self, factor: float = 10.0, max_norm: float | None = None, window: int = 100, warmup: int = 50,
                 ema: float = 0.9, patience: int = 3, growth: float = 100.0, baseline_steps: int = 10) -> None:
        super().__init__()
        self.factor = check_float("factor", factor, 1.0, low_inclusive=False)
        self.max_norm = None if max_norm is None else check_float("max_norm", max_norm, 0.0, low_inclusive=False)
        self.window = check_int("window", window, 2)
        self.warmup = check_int("warmup", warmup, 1)
        self.beta = check_float("ema", ema, 0.0, 1.0, high_inclusive=False)
        self.patience = check_int("patience", patience, 1)
        self.growth_factor = check_float("growth", growth, 1.0, low_inclusive=False)
        # the baseline is read from the ring buffer before it wraps
        self.baseline_steps = min(check_int("baseline_steps", baseline_steps, 1), self.window)

    def _init_state(self, device: torch.device, num: int) -> None:
        self.history = torch.full((self.window,), float("nan"), device=device)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)
        self.ema = torch.zeros(num, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_threshold = torch.zeros((), device=device)
        self.first_median = torch.zeros((), device=device)
        self.peak = torch.zeros((), device=device)
        self.growth = torch.ones(num, device=device)
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.baseline = torch.full((), float("inf"), device=device)

    @torch.no_grad()
    def update(self, total: torch.Tensor, norms: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """One step; returns the on-device "exploded" flag."""
        self._ensure(norms.device, norms.numel())
        total = total.float()
        median = torch.nanmedian(self.history)
        relative = torch.where(self.seen >= self.warmup, median * self.factor, float("inf"))
        relative = torch.minimum(relative, self.baseline * self.growth_factor)
        finite = torch.isfinite(total)
        self.streak = torch.where(finite & (total > relative), self.streak + 1, 0)
        exploded = self.streak >= self.patience
        threshold = relative
        if self.max_norm is not None:
            exploded = exploded | (finite & (total > self.max_norm))
            threshold = threshold.clamp_max(self.max_norm)
        growth = norms / self.ema.clamp_min(torch.finfo(norms.dtype).tiny)
        new = new_event(self.first_step, exploded)
        self.first_step = torch.where(new, step, self.first_step)
        self.first_threshold = torch.where(new, threshold, self.first_threshold)
        self.first_median = torch.where(new, median, self.first_median)
        self.growth = torch.where(new, growth, self.growth)
        self.peak = torch.where(exploded, torch.maximum(self.peak, total), self.peak)
        self.count += exploded
        self.history.index_copy_(0, (self.seen % self.window).view(1),
                                 torch.where(finite, total, float("nan")).view(1))
        # the growth rule's baseline: the median of the first baseline_steps norms, frozen once known
        first = torch.nanmedian(self.history[: self.baseline_steps])
        self.baseline = torch.where(self.seen == self.baseline_steps - 1, first, self.baseline)
        ok = torch.isfinite(norms)
        ema = torch.where(self.seen == 0, norms, self.beta * self.ema + (1 - self.beta) * norms)
        self.ema = torch.where(ok, ema, self.ema)
        self.seen += 1
        return exploded

    def pending(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "first_step": self.first_step, "first_threshold": self.first_threshold,
                "first_median": self.first_median, "peak": self.peak, "growth": self.growth}

    def alerts(self, host: Mapping[str, np.ndarray], names: Sequence[str]) -> list[Alert]:
        count = self._take_events(host)
        if count == 0:
            return []
        self.peak.zero_()
        growth = np.asarray(host["growth"], dtype=np.float64).reshape(-1)
        order = [i for i in np.argsort(-growth) if growth[i] > 1.0][:3]
        grown = [names[i] for i in order]
        peak, thr, med = float(host["peak"]), float(host["first_threshold"]), float(host["first_median"])
        rule = f"{peak / med:.1f}x its running median {med:.3g}" if med == med and med > 0 else f"above {thr:.3g}"
        growth_txt = ", ".join(f"{names[i]} x{growth[i]:.3g}" for i in order) or "none"
        msg = (f"exploding gradients: the total gradient norm reached {peak:.3g} ({rule}; threshold {thr:.3g}) "
               f"on {count} step(s) since the last report. Fastest-growing tensors against their running average: "
               f"{growth_txt}. Clip gradients (GradientClipping), lower the learning rate or add warm-up.")
        return [Alert("exploding", int(host["first_step"]), join_names(grown) if grown else "total", peak, thr, msg)]
