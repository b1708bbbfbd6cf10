"""What every clipping policy shares: the result of one step, the base class and the in-place scaling."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from bpkit.stats.norms import foreach_norms, total_norm
from bpkit.stats.sharded import coalesce_grads_, locals_of

EPS = 1e-6  # added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does


@dataclass
class ClipResult:
    """What a policy did on one step. Every field is a tensor on the gradients' device (no host read).

    Args:
        norm_pre: total gradient norm before clipping, or ``None`` when the policy did not need it.
        norm_post: total gradient norm after clipping, or ``None`` when the policy did not compute it.
        threshold: the norm (or value, or AGC clip factor) above which the policy acts.
        clipped: 0-d bool, whether the gradients were changed (or the step is to be skipped).
        skip: 0-d bool for policies that skip the whole update, else ``None``.
    """

    norm_pre: torch.Tensor | None
    norm_post: torch.Tensor | None
    threshold: torch.Tensor
    clipped: torch.Tensor
    skip: torch.Tensor | None = None


class ClipPolicy:
    """Base class: a small stateful object that clips gradients in place, state kept on the device.

    Subclasses set ``name`` and implement :meth:`apply`. ``needs_total_norm`` says whether
    :meth:`apply` uses the total norm (then the caller passes the one already computed by the
    gradient statistics, or computes it fused).
    """

    name = ""
    needs_total_norm = True
    norm_type = 2.0
    #: the total norm on the host when the caller has it this step anyway (GradientMonitor's skip decision
    #: reads it), set just before :meth:`apply`; a policy may use it to leave out work (``norm`` does)
    total_host: float | None = None

    def bind(self, module: torch.nn.Module) -> "ClipPolicy":
        """Attach to the model whose gradients will be clipped (AGC needs its layer names)."""
        return self

    def apply(self, params: list[torch.Tensor], grads: list[torch.Tensor],
              total: torch.Tensor | None) -> ClipResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def clip_(self, parameters: Iterable[torch.Tensor]) -> ClipResult:
        """Compute the total norm (fused) and clip the ``.grad`` of ``parameters`` in place.

        The pure-torch entry point: call it after ``loss.backward()`` and before ``optimizer.step()``.
        A result with ``skip`` set to True means: do not step (see :class:`~bpkit.clip.skip.SkipOnSpike`).
        """
        params = [p for p in parameters if p.grad is not None]
        coalesce_grads_(params)
        full = [p.grad for p in params]
        total = total_norm(foreach_norms(full, self.norm_type), self.norm_type) if self.needs_total_norm else None
        return self.apply(params, self.pieces(full), total)

    def pieces(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """What :meth:`apply` scales in place: the local shards of FSDP2 gradients and the values of sparse
        gradients (views), which the element-wise policies act on directly."""
        return locals_of(grads)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def config(self) -> dict[str, Any]:
        return {}


def scale_grads_(grads: list[torch.Tensor], total: torch.Tensor, threshold: torch.Tensor,
                 strict: bool = False) -> torch.Tensor:
    """Scale ``grads`` in place so that their total norm is at most ``threshold``; return the factor.

    ``strict=False`` is ``clip_grad_norm_``'s rule, ``min(threshold / (total + eps), 1)``;
    ``strict=True`` scales only when ``total > threshold`` (ZClip's rule). A non-finite total or
    threshold leaves the gradients untouched (factor 1): clipping never turns a gradient into NaN.
    """
    coef = threshold / (total + EPS)
    if strict:
        coef = torch.where(total > threshold, coef, torch.ones_like(coef))
    else:
        coef = coef.clamp(max=1.0)
    coef = torch.where(torch.isfinite(total) & torch.isfinite(threshold), coef, torch.ones_like(coef))
    if grads:
        torch._foreach_mul_(grads, coef)
    return coef


def as_device_tensor(value: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32, device=like.device)


def move_state(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}
