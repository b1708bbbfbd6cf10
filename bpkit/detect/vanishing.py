"""Layers whose gradients are vanishingly small compared to their weights and to the largest layer's."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bpkit.alert import Alert
from bpkit.detect._base import TINY, Detector, as_vector, join_names
from bpkit.errors import check_float, check_int


class VanishingDetector(Detector):
    """A tensor's gradient vanishes when, for ``patience`` consecutive checks, both

    - ``||g|| / max_layers ||g|| < rel_max`` (tiny compared with the layer that learns most), and
    - ``||g|| / ||w|| < rel_weight`` (too small to move its own weights).

    Args:
        rel_max: threshold on the gradient norm relative to the largest tensor's gradient norm.
        rel_weight: threshold on the gradient norm relative to the tensor's own weight norm.
        patience: consecutive checks the condition must hold.

    Raises:
        BpkitConfigError: if a threshold is not in (0, 1] or ``patience < 1``.

    Example::

        >>> d = VanishingDetector(patience=2)
        >>> for step in range(2):
        ...     d.update([1e-9, 1.0], [1.0, 1.0], step)
        >>> [(a.kind, a.where, a.step) for a in d.alerts(["layer0", "layer1"])]
        [('vanishing', 'layer0', 1)]
    """

    kind = "vanishing"
    _state_names = ("run", "latched", "new_mask", "first_step", "rel_max_now", "rel_weight_now")

    def __init__(self, rel_max: float = 1e-3, rel_weight: float = 1e-5, patience: int = 3) -> None:
        super().__init__()
        self.rel_max = check_float("rel_max", rel_max, 0.0, 1.0, low_inclusive=False)
        self.rel_weight = check_float("rel_weight", rel_weight, 0.0, 1.0, low_inclusive=False)
        self.patience = check_int("patience", patience, 1)

    def _init_state(self, num: int) -> None:
        self.run = np.zeros(num, dtype=np.int64)
        self.latched = np.zeros(num, dtype=bool)
        self.new_mask = np.zeros(num, dtype=bool)
        self.first_step = -1
        self.rel_max_now = np.ones(num)
        self.rel_weight_now = np.ones(num)

    def update(self, norms: Any, weight_norms: Any, step: int, mask: Any = None) -> None:
        """One check over the gradient and weight norms of ``N`` tensors (host values); ``mask``: the tensors
        the rule applies to (GradientMonitor passes weight matrices that got a gradient). The largest norm
        is taken over all."""
        norms = as_vector(norms)
        self._ensure(norms.size)
        finite = np.isfinite(norms)
        g = np.where(finite, norms, 0.0)
        rel_max = g / max(float(g.max(initial=0.0)), TINY)
        rel_weight = g / np.maximum(as_vector(weight_norms), TINY)
        low = (rel_max < self.rel_max) & (rel_weight < self.rel_weight) & finite
        if mask is not None:
            low &= as_vector(mask, bool)
        self._persist(low, step)
        self.rel_max_now, self.rel_weight_now = rel_max, rel_weight

    def alerts(self, names: Sequence[str]) -> list[Alert]:
        """The tensors whose gradient started vanishing since the last call (one alert, or none)."""
        if not self._ready or not self.new_mask.any():
            return []
        mask, step = self._take_new()
        rel, relw = self.rel_max_now, self.rel_weight_now
        hit = [n for n, m in zip(names, mask) if m]
        worst = float(rel[mask].min())
        top = names[int(np.argmax(rel))]
        profile = ", ".join("-inf" if r <= 0 else f"{math.log10(r):.1f}" for r in rel)
        msg = (f"vanishing gradients in {len(hit)} of {len(names)} tensors ({join_names(hit)}): their gradient "
               f"norm is down to {worst:.1e} of the largest ({top}) and {float(relw[mask].min()):.1e} of their "
               f"weight norm for {self.patience}+ checks. Depth profile, log10 of each tensor's gradient norm over "
               f"the largest, in parameter order: [{profile}]. Try ReLU/GELU with He init, normalization "
               "(batch/layer norm) or residual connections; for RNNs an LSTM/GRU.")
        return [Alert("vanishing", step, ", ".join(hit), worst, self.rel_max, msg)]
