"""Weights whose gradient stays far larger than the weights themselves: a steady explosion.

The exploding rule (:class:`~bpkit.detect.ExplodingDetector`) compares the total norm with its own running
median and early values, so a gradient that is huge from the first step on (a recurrent weight with a
spectral radius above 1 over a long sequence) never looks like a change. This rule needs no history: a
weight tensor whose gradient norm stays above ``rel_weight`` times its own weight norm for ``patience``
checks would, under SGD, be moved further than its own size by every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bpkit.alert import Alert
from bpkit.detect._base import TINY, Detector, as_vector, join_names
from bpkit.errors import check_float, check_int


class SteadyExplosionDetector(Detector):
    """A tensor's gradient explodes steadily when ``||g|| / ||w|| > rel_weight`` for ``patience`` consecutive checks.

    Calibrated (``benchmarks/results/calibration.md``): the largest ``||g|| / ||w||`` of any weight matrix over the
    first 60 steps of healthy nets is 5.5 (a LayerNorm MLP's head, step 2); deep ReLU/tanh MLPs, BatchNorm and
    LayerNorm nets, a ResNet, LSTM/GRU and tanh RNNs at spectral radius <= 1 over 40 steps and a 2-layer transformer
    stay below it, while a tanh RNN over 40 steps with recurrent weights orthogonal x2 reaches 290 and x3 1.5e5.
    Comparing with the median tensor's gradient instead fails there: most of an RNN's tensors explode together (the
    largest is 1.6x the median).

    Args:
        rel_weight: threshold on ``||g|| / ||w||`` (weights with a norm of exactly zero are left out).
        patience: consecutive checks the condition must hold.

    Example::

        >>> d = SteadyExplosionDetector(patience=2)
        >>> for step in (0, 10):
        ...     d.update([5e4, 0.1], [1.0, 1.0], step)
        >>> [(a.kind, a.where, a.step) for a in d.alerts(["rnn.weight_hh_l0", "head.weight"])]
        [('exploding', 'rnn.weight_hh_l0', 10)]
    """

    kind = "exploding"
    _state_names = ("run", "latched", "new_mask", "first_step", "ratio_now")

    def __init__(self, rel_weight: float = 100.0, patience: int = 3) -> None:
        super().__init__()
        self.rel_weight = check_float("rel_weight", rel_weight, 1.0, low_inclusive=False)
        self.patience = check_int("patience", patience, 1)

    def _init_state(self, num: int) -> None:
        self.run = np.zeros(num, dtype=np.int64)
        self.latched = np.zeros(num, dtype=bool)
        self.new_mask = np.zeros(num, dtype=bool)
        self.first_step = -1
        self.ratio_now = np.zeros(num)

    def update(self, norms: Any, weight_norms: Any, step: int, mask: Any = None) -> None:
        """One check over the gradient and weight norms of ``N`` tensors (host values); ``mask``: the tensors the rule
        applies to (GradientMonitor passes weight matrices that got a gradient)."""
        norms, weights = as_vector(norms), as_vector(weight_norms)
        self._ensure(norms.size)
        ok = np.isfinite(norms) & (weights > TINY)
        ratio = np.where(ok, norms / np.maximum(weights, TINY), 0.0)
        high = ok & (ratio > self.rel_weight)
        if mask is not None:
            high &= as_vector(mask, bool)
        self._persist(high, step)
        self.ratio_now = np.where(high, ratio, 0.0)

    def alerts(self, names: Sequence[str]) -> list[Alert]:
        """The tensors whose gradient started exploding steadily since the last call (one alert, or none)."""
        if not self._ready or not self.new_mask.any():
            return []
        mask, step = self._take_new()
        hit = [n for n, m in zip(names, mask) if m]
        worst = float(self.ratio_now[mask].max()) if (self.ratio_now[mask] > 0).any() else float("nan")
        msg = (f"exploding gradients in {len(hit)} of {len(names)} tensors ({join_names(hit)}): their gradient norm "
               f"has stayed above {self.rel_weight:g}x their own weight norm (up to {worst:.3g}x) for "
               f"{self.patience}+ checks, so every SGD step moves them further than their own size. A steady "
               "explosion like this (the same from the first step on, so the relative rule sees no change) is typical "
               "of a recurrent weight with a spectral radius above 1 over long sequences. Try an orthogonal "
               "recurrent init with gain <= 1, an LSTM/GRU, gradient clipping (GradientClipping('norm')) or a lower "
               "learning rate.")
        return [Alert("exploding", step, ", ".join(hit), worst, self.rel_weight, msg)]
