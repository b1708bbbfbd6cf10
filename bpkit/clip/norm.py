"""Clip by total norm: the classic rule of ``torch.nn.utils.clip_grad_norm_``."""

from __future__ import annotations

from typing import Any

import torch

from bpkit.clip._base import ClipPolicy, ClipResult, as_device_tensor, scale_grads_
from bpkit.errors import BpkitConfigError, check_float


class NormClip(ClipPolicy):
    """Scale all gradients together so that their total norm is at most ``max_norm``.

    Same result as ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)``, but it reuses a
    total norm computed elsewhere and never reads it to the host.

    Args:
        max_norm: the largest total norm allowed (> 0).
        norm_type: the norm, a number >= 1 or ``inf``.

    Raises:
        BpkitConfigError: if ``max_norm`` is not positive or ``norm_type`` is below 1.

    Example::

        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> NormClip(max_norm=1.0).clip_([p]).norm_pre
        tensor(5.)
        >>> p.grad
        tensor([0.6000, 0.8000])
    """

    name = "norm"

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        self.max_norm = check_float("max_norm", max_norm, 0.0, low_inclusive=False)
        if isinstance(norm_type, str) and norm_type.lower() in ("inf", "infinity"):
            norm_type = float("inf")
        self.norm_type = check_float("norm_type", norm_type, 1.0)
        if self.norm_type != self.norm_type:  # pragma: no cover - check_float rejects NaN already
            raise BpkitConfigError("norm_type", norm_type, "a number >= 1 or inf")

    def apply(self, params: list[torch.Tensor], grads: list[torch.Tensor], total: torch.Tensor | None) -> ClipResult:
        threshold = as_device_tensor(self.max_norm, total)
        host, self.total_host = self.total_host, None  # below the bound the factor is exactly 1: no multiply
        # margin: the float32 factor max_norm / (total + eps) is then >= 1 for certain, so clamped to exactly 1
        unchanged = host is not None and host <= self.max_norm * (1 - 1e-6) - 1e-5
        coef = scale_grads_([] if unchanged else grads, total, threshold)
        return ClipResult(norm_pre=total, norm_post=total * coef, threshold=threshold, clipped=coef < 1.0)

    def config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}
