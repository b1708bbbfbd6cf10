"""A scalar series (the loss, the total gradient norm) jumping far above its running average."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bpkit.alert import Alert
from bpkit.detect._base import Detector, as_vector
from bpkit.errors import check_float, check_int


class SpikeDetector(Detector):
    """Flags a value more than ``z`` standard deviations above the exponential moving average of
    its series, in log space (loss and norm changes are multiplicative). A spike enters the
    average clipped to the threshold, so one outlier neither hides the next nor shifts the baseline.
    Several series (the loss and the total gradient norm) are tracked at once, element-wise, for
    the cost of one; NaN, Inf and non-positive values are skipped.

    Args:
        name: the series' name(s) (``loss``, ``grad_norm_total``); used as the alerts' ``where``.
        z: threshold in standard deviations.
        alpha: EMA weight of a new value.
        warmup: values seen before alerts are possible (the average is a plain mean until then).
        min_std: floor on the standard deviation in natural-log units (0.1: a 10% change is never a spike
            on its own).

    Raises:
        BpkitConfigError: on non-positive ``z``/``min_std``, ``alpha`` outside (0, 1) or ``warmup < 1``.

    Example::

        >>> d = SpikeDetector(("loss", "grad_norm_total"), warmup=5)
        >>> for step in range(30):
        ...     _ = d.update([2.0 + 0.1 * (step % 3), 1.0], step)
        >>> _ = d.update([40.0, 1.0], 30)
        >>> [(a.kind, a.where, a.step, a.value) for a in d.alerts()]
        [('spike', 'loss', 30, 40.0)]
    """

    kind = "spike"
    _state_names = ("mean", "var", "seen", "count", "first_step", "first_value", "first_threshold", "peak_z")

    def __init__(self, name: str | Sequence[str] = "loss", z: float = 6.0, alpha: float = 0.05, warmup: int = 20,
                 min_std: float = 0.1) -> None:
        super().__init__()
        self.names = (name,) if isinstance(name, str) else tuple(name)
        self.z = check_float("z", z, 0.0, low_inclusive=False)
        self.alpha = check_float("alpha", alpha, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        self.warmup = check_int("warmup", warmup, 1)
        self.min_std = check_float("min_std", min_std, 0.0, low_inclusive=False)

    def _init_state(self, num: int) -> None:
        k = len(self.names)
        self.mean = np.zeros(k)
        self.var = np.zeros(k)
        self.seen = np.zeros(k, dtype=np.int64)
        self.count = np.zeros(k, dtype=np.int64)
        self.first_step = np.full(k, -1, dtype=np.int64)
        self.first_value = np.zeros(k)
        self.first_threshold = np.zeros(k)
        self.peak_z = np.zeros(k)

    def update(self, value: Any, step: int) -> np.ndarray:
        """One value per series (host values); returns one spike flag per series."""
        self._ensure()
        spikes = np.zeros(len(self.names), dtype=bool)
        for i, x in enumerate(as_vector(value).tolist()):  # a few series: plain float arithmetic is fastest
            if not 0.0 < x < math.inf:  # NaN, Inf and non-positive values are skipped
                continue
            y = math.log(x)
            mean, var, seen = float(self.mean[i]), float(self.var[i]), int(self.seen[i])
            std = max(math.sqrt(var), self.min_std)
            limit = mean + self.z * std
            if seen >= self.warmup and y > limit:
                spikes[i] = True
                if self.first_step[i] < 0:
                    self.first_step[i], self.first_value[i], self.first_threshold[i] = step, x, math.exp(limit)
                self.peak_z[i] = max(float(self.peak_z[i]), (y - mean) / std)
                self.count[i] += 1
            a = max(1.0 / (seen + 1), self.alpha)
            delta = min(y, limit) - mean
            self.mean[i] = mean + a * delta
            self.var[i] = 0.0 if seen == 0 else (1 - a) * (var + a * delta * delta)
            self.seen[i] = seen + 1
        return spikes

    def update_many(self, values: np.ndarray, steps: Sequence[int]) -> np.ndarray:
        """:meth:`update` for many steps at once (``(steps, series)`` values, in step order): the same arithmetic
        in plain floats, the state written back once. Returns the spike flags of the last step."""
        self._ensure()
        k = len(self.names)
        values = np.asarray(values, dtype=np.float64).reshape(len(steps), k)
        spikes = np.zeros(k, dtype=bool)
        z, min_std, alpha, warmup = self.z, self.min_std, self.alpha, self.warmup
        for i in range(k):
            mean, var, seen = float(self.mean[i]), float(self.var[i]), int(self.seen[i])
            count, peak = int(self.count[i]), float(self.peak_z[i])
            first = int(self.first_step[i])
            spiked = False
            for step, x in zip(steps, values[:, i].tolist()):
                spiked = False
                if not 0.0 < x < math.inf:  # NaN, Inf and non-positive values are skipped
                    continue
                y = math.log(x)
                std = max(math.sqrt(var), min_std)
                limit = mean + z * std
                if seen >= warmup and y > limit:
                    spiked = True
                    if first < 0:
                        first = int(step)
                        self.first_value[i], self.first_threshold[i] = x, math.exp(limit)
                    peak = max(peak, (y - mean) / std)
                    count += 1
                a = max(1.0 / (seen + 1), alpha)
                delta = min(y, limit) - mean
                var = 0.0 if seen == 0 else (1 - a) * (var + a * delta * delta)
                mean = mean + a * delta
                seen += 1
            self.mean[i], self.var[i], self.seen[i] = mean, var, seen
            self.count[i], self.peak_z[i], self.first_step[i] = count, peak, first
            spikes[i] = spiked
        return spikes

    def alerts(self, names: Sequence[str] | None = None) -> list[Alert]:
        """One alert per series that spiked since the last call; clears them."""
        if not self._ready or not self.count.any():
            return []
        counts, steps = self.count.copy(), self.first_step.copy()
        values, thresholds, peaks = self.first_value.copy(), self.first_threshold.copy(), self.peak_z.copy()
        self.count[:] = 0
        self.first_step[:] = -1
        self.peak_z[:] = 0.0
        out = []
        for i, name in enumerate(self.names):
            count = int(counts[i])
            if count == 0:
                continue
            value, thr, z = float(values[i]), float(thresholds[i]), float(peaks[i])
            what = "the loss" if name == "loss" else f"the {name.replace('_', ' ')}"
            msg = (f"{what} spiked to {value:.4g} (threshold {thr:.4g}, up to {z:.1f} standard deviations above "
                   f"its running average in log space) on {count} step(s) since the last report. A bad batch, a too "
                   "high learning rate or an unstable layer; consider clipping (GradientClipping('zclip')) or "
                   "warm-up.")
            step = int(steps[i])
            out.append(Alert("spike", step, name, value, thr if math.isfinite(thr) else 0.0, msg))
        return out
