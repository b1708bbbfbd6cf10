"""A scalar series (the loss, the total gradient norm) jumping far above its running average."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from bpkit.alert import Alert
from bpkit.detect._base import Detector, new_event
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

        >>> import torch
        >>> from bpkit.stats.readback import readback
        >>> d = SpikeDetector(("loss", "grad_norm_total"), warmup=5)
        >>> for step in range(30):
        ...     _ = d.update(torch.tensor([2.0 + 0.1 * (step % 3), 1.0]), torch.tensor(step))
        >>> _ = d.update(torch.tensor([40.0, 1.0]), torch.tensor(30))
        >>> [(a.kind, a.where, a.step, a.value) for a in d.alerts(readback(d.pending()))]
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

    def _init_state(self, device: torch.device, num: int) -> None:
        k = len(self.names)
        self.mean = torch.zeros(k, device=device)
        self.var = torch.zeros(k, device=device)
        self.seen = torch.zeros(k, dtype=torch.int64, device=device)
        self.count = torch.zeros(k, dtype=torch.int64, device=device)
        self.first_step = torch.full((k,), -1, dtype=torch.int64, device=device)
        self.first_value = torch.zeros(k, device=device)
        self.first_threshold = torch.zeros(k, device=device)
        self.peak_z = torch.zeros(k, device=device)

    @torch.no_grad()
    def update(self, value: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """One value per series (``(k,)``, or a 0-d tensor for one series); returns the ``(k,)`` spike flags."""
        self._ensure(value.device)
        x = value.detach().reshape(-1).float()
        finite = x > 0  # False for NaN too
        finite &= x < float("inf")
        y = torch.log(torch.where(finite, x, 1.0))
        std = torch.sqrt(self.var).clamp_min(self.min_std)
        limit = self.mean + self.z * std
        spike = finite & (self.seen >= self.warmup) & (y > limit)
        new = new_event(self.first_step, spike)
        self.first_step = torch.where(new, step, self.first_step)
        self.first_value = torch.where(new, x, self.first_value)
        self.first_threshold = torch.where(new, torch.exp(limit), self.first_threshold)
        self.peak_z = torch.where(spike, torch.maximum(self.peak_z, (y - self.mean) / std), self.peak_z)
        self.count += spike
        a = torch.clamp_min(1.0 / (self.seen + 1), self.alpha)
        delta = torch.where(finite, torch.minimum(y, limit) - self.mean, 0.0)
        self.mean = self.mean + a * delta
        self.var = torch.where(self.seen == 0, 0.0, (1 - a) * (self.var + a * delta * delta))
        self.seen += finite
        return spike

    def pending(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "first_step": self.first_step, "first_value": self.first_value,
                "first_threshold": self.first_threshold, "peak_z": self.peak_z}

    def alerts(self, host: Mapping[str, np.ndarray], names=None) -> list[Alert]:
        counts = np.asarray(host["count"]).reshape(-1)
        if not self._ready or not counts.any():
            return []
        self.count.zero_()
        self.first_step.fill_(-1)
        self.peak_z.zero_()
        out = []
        for i, name in enumerate(self.names):
            count = int(counts[i])
            if count == 0:
                continue
            value = float(np.asarray(host["first_value"]).reshape(-1)[i])
            thr = float(np.asarray(host["first_threshold"]).reshape(-1)[i])
            z = float(np.asarray(host["peak_z"]).reshape(-1)[i])
            what = "the loss" if name == "loss" else f"the {name.replace('_', ' ')}"
            msg = (f"{what} spiked to {value:.4g} (threshold {thr:.4g}, up to {z:.1f} standard deviations above "
                   f"its running average in log space) on {count} step(s) since the last report. A bad batch, a too "
                   "high learning rate or an unstable layer; consider clipping (GradientClipping('zclip')) or "
                   "warm-up.")
            step = int(np.asarray(host["first_step"]).reshape(-1)[i])
            out.append(Alert("spike", step, name, value, thr if math.isfinite(thr) else 0.0, msg))
        return out
