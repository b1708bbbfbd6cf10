"""A total gradient norm far above its recent history, or above an absolute bound."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bpkit.alert import Alert
from bpkit.record import WHERE_TOTAL_NORM
from bpkit.detect._base import TINY, Detector, as_vector, join_names, median_low
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

    The defaults (``factor=100``, ``growth=1000``, ``patience=3``, ``warmup=50``) are calibrated in
    ``benchmarks/calibration.py`` (``benchmarks/results/calibration.md``): on 112 healthy runs (ReLU MLPs of depth
    2-24 on digits with every optimizer config of ``conf/optimizer``, two seeds) none alerts, although a deep ReLU
    MLP's norm grows up to ~60x its running median (and a few hundred times its first steps) while it starts
    learning; the exploding tanh RNN of ``recipes/exploding_rnn.yaml`` (~10x per step) is flagged 10 steps before
    its first NaN. The smallest silent settings were ``factor=50`` and ``growth=300``.

    Args:
        factor: multiple of the running median that counts as exploding (> 1; default 100).
        max_norm: absolute bound on the total norm (``None``: none).
        window: number of recent steps in the running median.
        warmup: steps seen before the median rule applies.
        patience: consecutive steps above a relative rule before it fires.
        growth: multiple of the median of the first ``baseline_steps`` total norms that counts as exploding
            (default 1000).
        baseline_steps: steps whose median is the baseline of the ``growth`` rule.
        ema: smoothing of the per-tensor norm averages used to name the growing tensors.

    Raises:
        BpkitConfigError: on a factor <= 1, a non-positive bound, a window < 2 or a warmup < 1.

    Example::

        >>> d = ExplodingDetector(warmup=3, patience=1)
        >>> for step, g in enumerate([1.0, 1.1, 0.9, 1.0, 500.0]):
        ...     _ = d.update(g, [g, 1.0], step)
        >>> a = d.alerts(["w", "b"])[0]
        >>> a.step, a.value, a.where
        (4, 500.0, 'w')
    """

    kind = "exploding"
    _state_names = ("history", "seen", "ema", "count", "first_step", "first_threshold", "first_median", "peak",
                    "growth", "streak", "baseline")

    def __init__(self, factor: float = 100.0, max_norm: float | None = None, window: int = 100, warmup: int = 50,
                 ema: float = 0.9, patience: int = 3, growth: float = 1000.0, baseline_steps: int = 10) -> None:
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

    def _init_state(self, num: int) -> None:
        self.history = np.full(self.window, np.nan)  # a ring of the last `window` totals (NaN: non-finite)
        self.seen = 0
        self.ema = np.zeros(num)
        self.count = 0
        self.first_step = -1
        self.first_threshold = 0.0
        self.first_median = 0.0
        self.peak = 0.0
        self.growth = np.ones(num)
        self.streak = 0
        self.baseline = float("inf")

    def update(self, total: float, norms: Any, step: int) -> bool:
        """One step: the total norm and the per-tensor norms (host values); returns whether it exploded."""
        norms = as_vector(norms)
        total, step = float(total), int(step)
        self._ensure(norms.size)
        median = median_low(self.history)
        relative = median * self.factor if self.seen >= self.warmup and median == median else math.inf
        relative = min(relative, self.baseline * self.growth_factor)
        finite = math.isfinite(total)
        self.streak = self.streak + 1 if finite and total > relative else 0
        exploded = self.streak >= self.patience
        threshold = relative
        if self.max_norm is not None:
            exploded = exploded or (finite and total > self.max_norm)
            threshold = min(threshold, self.max_norm)
        if exploded:
            if self.first_step < 0:
                self.first_step, self.first_threshold, self.first_median = step, threshold, median
                self.growth = norms / np.maximum(self.ema, TINY)
            self.peak = max(self.peak, total)
            self.count += 1
        self.history[self.seen % self.window] = total if finite else np.nan
        if self.seen == self.baseline_steps - 1:  # the growth rule's baseline, frozen once known
            first = median_low(self.history[: self.baseline_steps])
            self.baseline = first if first == first else math.inf
        ok = np.isfinite(norms)
        ema = norms if self.seen == 0 else self.beta * self.ema + (1 - self.beta) * norms
        self.ema = np.where(ok, ema, self.ema)
        self.seen += 1
        return exploded

    def update_many(self, totals: np.ndarray, norms: np.ndarray, steps: Sequence[int]) -> bool:
        """:meth:`update` for many steps at once (``(steps,)`` totals and ``(steps, tensors)`` norms, in step order),
        the same state. The running medians of all the steps come from one sort; the common case (every total finite
        and below its threshold, the growth baseline already known) then updates the state in bulk; any other batch
        goes step by step. Returns whether the last step exploded."""
        totals = np.asarray(totals, dtype=np.float64).reshape(-1)
        n = totals.size
        norms = np.asarray(norms, dtype=np.float64).reshape(n, -1)
        if n == 0:
            return False
        self._ensure(norms.shape[1])
        if (self.seen < self.baseline_steps or not np.isfinite(totals).all() or not np.isfinite(norms).all()
                or (self.max_norm is not None and (totals > self.max_norm).any())):
            return self._update_each(totals, norms, steps)
        window = self.window
        # the ring in time order (oldest first; never-filled slots, NaN, first), then this batch: step i's
        # running median is over the `window` values before it
        timeline = np.concatenate([np.roll(self.history, -(self.seen % window)), totals])
        frames = np.sort(np.lib.stride_tricks.sliding_window_view(timeline, window)[:n], axis=1)  # NaN sorts last
        finite = np.isfinite(frames).sum(axis=1)
        medians = np.where(finite > 0, frames[np.arange(n), np.maximum(finite - 1, 0) // 2], np.nan)
        seen = self.seen + np.arange(n)
        relative = np.where((seen >= self.warmup) & ~np.isnan(medians), medians * self.factor, np.inf)
        relative = np.minimum(relative, self.baseline * self.growth_factor)
        if (totals > relative).any():
            return self._update_each(totals, norms, steps)
        last = totals[-window:]
        self.history[(self.seen + n - last.size + np.arange(last.size)) % window] = last
        self.streak = 0
        # the per-tensor averages that name the growing tensors when a rule fires: n steps of the average at once
        weights = (1 - self.beta) * self.beta ** np.arange(n - 1, -1, -1, dtype=np.float64)
        self.ema = self.beta ** n * self.ema + weights @ norms
        self.seen += n
        return False

    def _update_each(self, totals: np.ndarray, norms: np.ndarray, steps: Sequence[int]) -> bool:
        exploded = False
        for total, row, step in zip(totals.tolist(), norms, steps):
            exploded = self.update(total, row, step)
        return exploded

    def alerts(self, names: Sequence[str]) -> list[Alert]:
        """The explosion seen since the last call (one alert, or none); clears it."""
        if not self._ready or self.count == 0:
            return []
        peak, thr, med, growth, first = self.peak, self.first_threshold, self.first_median, self.growth, self.first_step
        count = self._take_events()
        self.peak = 0.0
        order = [i for i in np.argsort(-growth) if growth[i] > 1.0][:3]
        grown = [names[i] for i in order]
        rule = f"{peak / med:.1f}x its running median {med:.3g}" if med == med and med > 0 else f"above {thr:.3g}"
        growth_txt = ", ".join(f"{names[i]} x{growth[i]:.3g}" for i in order) or "none"
        msg = (f"exploding gradients: the total gradient norm reached {peak:.3g} ({rule}; threshold {thr:.3g}) "
               f"on {count} step(s) since the last report. Fastest-growing tensors against their running average: "
               f"{growth_txt}. Clip gradients (GradientClipping), lower the learning rate or add warm-up.")
        return [Alert("exploding", first, join_names(grown) if grown else WHERE_TOTAL_NORM, peak, thr, msg)]
