"""ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"): clip the total
gradient norm when its z-score against an EMA of past norms is an outlier."""

from __future__ import annotations

from typing import Any

import torch

from bpkit.clip._base import ClipPolicy, ClipResult, as_device_tensor, scale_grads_
from bpkit.clip._zstats import ZStats
from bpkit.errors import check_choice, check_float, check_int

MODES = ("zscore", "percentile")
CLIP_OPTIONS = ("adaptive_scaling", "mean")


class ZClip(ClipPolicy):
    """Z-score based adaptive clipping of the total gradient norm, as published.

    With ``g`` the total norm, ``mu``/``sigma`` the EMA mean and standard deviation and
    ``z = (g - mu) / (sigma + eps)``:

    - ``mode="zscore"``, ``clip_option="adaptive_scaling"`` (the paper's default): when ``z > z_thresh``
      the norm is clipped to ``mu + z_thresh * sigma / (z / z_thresh)`` (the larger the outlier, the harder
      it is pulled back);
    - ``clip_option="mean"``: clipped to ``mu``;
    - ``mode="percentile"``: clipped to ``mu + z_thresh * sigma`` whenever ``g`` exceeds it.

    The EMA (``alpha``) is then updated with the clipped norm, so a spike does not inflate the statistics.
    The first ``warmup_steps`` norms only initialise the mean and variance: nothing is clipped during warm-up
    (there is no statistic to compare with yet). bpkit's default is the adaptive rule alone
    (``max_norm=None``): calm steps are left exactly as they are (a factor of exactly 1), only outliers are
    pulled back. ``max_norm`` adds a fixed cap on the total norm (also during warm-up), as in the official
    code's default of 1.0; choose it from the norms you observe (``clip/norm_pre``): a cap below the typical
    norm rescales every update, not only spikes. The adaptive rule follows a steadily rising norm (the EMA
    moves with it): pair it with a cap or a GradientMonitor alert if a slow blow-up is the concern. A
    non-finite norm leaves the gradients and the statistics untouched (pair with a GradientMonitor action or
    ``skip`` to handle it).

    Args:
        alpha: EMA smoothing factor in (0, 1), default 0.97.
        z_thresh: z-score above which a norm is a spike (> 0), default 2.5.
        warmup_steps: steps whose norms initialise the statistics (>= 1), default 25.
        mode: ``zscore`` or ``percentile``.
        clip_option: ``adaptive_scaling`` or ``mean`` (``zscore`` mode only).
        max_norm: fixed upper bound on the total norm (> 0), also applied during warm-up; default ``None``: no
            cap, only the z-score rule acts (the official code uses 1.0).
        eps: added to the standard deviation in the z-score.

    Raises:
        BpkitConfigError: on a value out of range or an unknown mode/clip option.

    Example::

        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> zc = ZClip(warmup_steps=3)
        >>> for g in [1.0, 1.1, 0.9, 1.0, 50.0]:
        ...     p.grad = torch.tensor([g])
        ...     res = zc.clip_([p])
        >>> bool(res.clipped), round(float(p.grad), 3)
        (True, 1.001)
    """

    name = "zclip"

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25, mode: str = "zscore",
                 clip_option: str = "adaptive_scaling", max_norm: float | None = None, eps: float = 1e-6) -> None:
        self.alpha = check_float("alpha", alpha, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        self.z_thresh = check_float("z_thresh", z_thresh, 0.0, low_inclusive=False)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 1)
        self.mode = check_choice("mode", mode, MODES)
        self.clip_option = check_choice("clip_option", clip_option, CLIP_OPTIONS)
        self.max_norm = None if max_norm is None else check_float("max_norm", max_norm, 0.0, low_inclusive=False)
        self.eps = check_float("eps", eps, 0.0)
        self.stats = ZStats(self.alpha, self.warmup_steps)

    def apply(self, params: list[torch.Tensor], grads: list[torch.Tensor], total: torch.Tensor | None) -> ClipResult:
        total = total.detach().float()
        cap = None if self.max_norm is None else as_device_tensor(self.max_norm, total)
        if not self.stats.ready:
            self.stats.warmup(total)
            if cap is None:  # no statistics yet and no cap: nothing to clip to, the gradients are left alone
                return ClipResult(total, total, torch.full_like(total, float("inf")),
                                  torch.zeros_like(total, dtype=torch.bool))
            coef = scale_grads_(grads, total, cap)  # plain clip_grad_norm_ to max_norm, as published
            return ClipResult(total, total * coef, cap, coef < 1.0)
        mean, std = self.stats.mean, self.stats.std()
        if self.mode == "percentile":
            limit = mean + self.z_thresh * std
            spike = total > limit
            target = limit
        else:
            z = (total - mean) / (std + self.eps)
            spike = z > self.z_thresh
            target = mean + (self.z_thresh * std) / (z / self.z_thresh) if self.clip_option == "adaptive_scaling" \
                else mean
            limit = mean + self.z_thresh * (std + self.eps)  # where z crosses z_thresh: logged as the threshold
        clip_val = torch.where(spike, target, total)
        bound = clip_val if cap is None else torch.minimum(clip_val, cap)
        coef = scale_grads_(grads, total, bound, strict=True)
        self.stats.update(clip_val, keep=torch.isfinite(total))
        return ClipResult(total, total * coef, limit if cap is None else torch.minimum(limit, cap), coef < 1.0)

    def state_dict(self) -> dict[str, Any]:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state)

    def config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "z_thresh": self.z_thresh, "warmup_steps": self.warmup_steps, "mode": self.mode,
                "clip_option": self.clip_option, "max_norm": self.max_norm, "eps": self.eps}
