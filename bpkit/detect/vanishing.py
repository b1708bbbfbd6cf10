"""Layers whose gradients are vanishingly small compared to their weights and to the largest layer's."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from bpkit.alert import Alert
from bpkit.detect._base import Detector, join_names, new_event
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

        >>> import torch
        >>> from bpkit.stats.readback import readback
        >>> d = VanishingDetector(patience=2)
        >>> for step in range(2):
        ...     d.update(torch.tensor([1e-9, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor(step))
        >>> [(a.kind, a.where, a.step) for a in d.alerts(readback(d.pending()), ["layer0", "layer1"])]
        [('vanishing', 'layer0', 1)]
    """

    kind = "vanishing"
    _state_names = ("run", "latched", "new_mask", "first_step", "rel_max_now", "rel_weight_now")

    def __init__(self, rel_max: float = 1e-3, rel_weight: float = 1e-5, patience: int = 3) -> None:
        super().__init__()
        self.rel_max = check_float("rel_max", rel_max, 0.0, 1.0, low_inclusive=False)
        self.rel_weight = check_float("rel_weight", rel_weight, 0.0, 1.0, low_inclusive=False)
        self.patience = check_int("patience", patience, 1)

    def _init_state(self, device: torch.device, num: int) -> None:
        self.run = torch.zeros(num, dtype=torch.int64, device=device)
        self.latched = torch.zeros(num, dtype=torch.bool, device=device)
        self.new_mask = torch.zeros(num, dtype=torch.bool, device=device)
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.rel_max_now = torch.ones(num, device=device)
        self.rel_weight_now = torch.ones(num, device=device)

    @torch.no_grad()
    def update(self, norms: torch.Tensor, weight_norms: torch.Tensor, step: torch.Tensor,
               mask: torch.Tensor | None = None) -> None:
        """One check over ``(N,)`` gradient and weight norms; ``mask``: the tensors the rule applies to
        (GradientMonitor passes weight matrices that got a gradient). The largest norm is taken over all."""
        self._ensure(norms.device, norms.numel())
        finite = torch.isfinite(norms)
        g = torch.where(finite, norms, 0.0)
        rel_max = g / g.max().clamp_min(torch.finfo(g.dtype).tiny)
        rel_weight = g / weight_norms.clamp_min(torch.finfo(g.dtype).tiny)
        low = (rel_max < self.rel_max) & (rel_weight < self.rel_weight) & finite
        if mask is not None:
            low = low & mask
        self.run = torch.where(low, self.run + 1, 0)
        hit = self.run >= self.patience
        fresh = hit & ~self.latched
        self.first_step = torch.where(new_event(self.first_step, fresh.any()), step, self.first_step)
        self.new_mask |= fresh
        self.latched = hit
        self.rel_max_now, self.rel_weight_now = rel_max, rel_weight

    def pending(self) -> dict[str, torch.Tensor]:
        return {"new_mask": self.new_mask, "first_step": self.first_step, "rel_max": self.rel_max_now,
                "rel_weight": self.rel_weight_now}

    def alerts(self, host: Mapping[str, np.ndarray], names: Sequence[str]) -> list[Alert]:
        mask = np.asarray(host["new_mask"]).reshape(-1).astype(bool)
        if not self._ready or not mask.any():
            return []
        self.new_mask.zero_()
        self.first_step.fill_(-1)
        rel = np.asarray(host["rel_max"], dtype=np.float64).reshape(-1)
        relw = np.asarray(host["rel_weight"], dtype=np.float64).reshape(-1)
        hit = [n for n, m in zip(names, mask) if m]
        worst = float(rel[mask].min())
        top = names[int(np.argmax(rel))]
        profile = ", ".join("-inf" if r <= 0 else f"{math.log10(r):.1f}" for r in rel)
        msg = (f"vanishing gradients in {len(hit)} of {len(names)} tensors ({join_names(hit)}): their gradient "
               f"norm is down to {worst:.1e} of the largest ({top}) and {float(relw[mask].min()):.1e} of their "
               f"weight norm for {self.patience}+ checks. Depth profile, log10 of each tensor's gradient norm over "
               f"the largest, in parameter order: [{profile}]. Try ReLU/GELU with He init, normalization "
               "(batch/layer norm) or residual connections; for RNNs an LSTM/GRU.")
        return [Alert("vanishing", int(host["first_step"]), ", ".join(hit), worst, self.rel_max, msg)]
