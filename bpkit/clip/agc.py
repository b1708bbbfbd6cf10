"""Adaptive gradient clipping (AGC, Brock et al. 2021, "High-Performance Large-Scale Image Recognition
Without Normalization"): clip each unit's gradient relative to the norm of its weights."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bpkit.clip._base import ClipPolicy, ClipResult, as_device_tensor
from bpkit.errors import BpkitConfigError, check_float
from bpkit.stats.norms import foreach_norms


STACK_MAX_NUMEL = 1 << 16  # tensors up to this size are stacked with others of their unit shape


def unit_shape(p: torch.Tensor) -> tuple[int, int]:
    """A parameter seen as (units, fan-in): rows of a Linear weight, output channels of a Conv
    weight; a bias or any other 1-D/0-D tensor is one unit (as timm does)."""
    if p.dim() <= 1:
        return 1, max(p.numel(), 1)
    return p.shape[0], p.numel() // max(p.shape[0], 1)


class AGC(ClipPolicy):
    """Unit-wise adaptive gradient clipping.

    For every unit ``i`` of every parameter ``W`` with gradient ``G``:
    ``G_i <- G_i * min(1, clip_factor * max(||W_i||, eps) / ||G_i||)`` (the ratio uses
    ``max(||G_i||, 1e-6)`` in the denominator, as in NFNets/timm). Parameters of the same unit shape are
    processed together (small tensors of one unit shape are stacked: one norm and one scaling per group
    instead of kernels per tensor); a large tensor is processed on a view of itself, without a copy.

    Not a spike filter: the published ``clip_factor=0.01`` was tuned for NFNets at batch sizes of thousands;
    with small batches the gradient-to-weight ratio of some unit exceeds it on nearly every step (measured on
    calm Adam runs of a small MLP and LSTM: 100% of steps had a clipped unit, see
    ``benchmarks/results/clipping.md``). Raise ``clip_factor`` (the paper uses larger values for smaller batches)
    when only outliers should be clipped.

    Args:
        clip_factor: the largest allowed ratio of gradient norm to weight norm per unit (> 0), default 0.01.
        eps: the smallest weight norm used (>= 0), so that zero-initialised units can still move; default 1e-3.
        exclude: parameters left unclipped: ``None``; ``"auto"`` for the last ``nn.Linear`` of the model (the
            classifier, which NFNets does not clip; nothing when the model has none); or a module or
            parameter name, or a list of them, as in ``named_modules()``/``named_parameters()``.

    Raises:
        BpkitConfigError: on a non-positive ``clip_factor``, a negative ``eps``, a name that is not in the
            model, or (in :meth:`bind`) a module without parameters.

    Example::

        >>> import torch
        >>> net = torch.nn.Linear(3, 2)
        >>> net(torch.randn(4, 3)).pow(2).sum().mul(1e3).backward()
        >>> agc = AGC(clip_factor=0.01).bind(net)
        >>> bool(agc.clip_(net.parameters()).clipped)
        True
    """

    name = "agc"
    needs_total_norm = False

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3,
                 exclude: str | Sequence[str] | None = None) -> None:
        self.clip_factor = check_float("clip_factor", clip_factor, 0.0, low_inclusive=False)
        self.eps = check_float("eps", eps, 0.0)
        if exclude is not None and not isinstance(exclude, (str, Sequence)):
            raise BpkitConfigError("exclude", exclude, 'None, "auto", or a module/parameter name or list of names')
        self.exclude = exclude
        self._excluded: set[int] = set()
        self.excluded_names: list[str] = []
        self._bound = False
        self._plan_key: tuple | None = None
        self._plan: Any = None

    def bind(self, module: nn.Module) -> "AGC":
        named = list(module.named_parameters())
        if not named:
            raise BpkitConfigError("module", type(module).__name__, "a module with parameters for AGC")
        if self.exclude is None:
            names: list[str] = []
        else:
            names = [self.exclude] if isinstance(self.exclude, str) else [str(n) for n in self.exclude]
        modules = dict(module.named_modules())
        params = dict(named)
        chosen: list[str] = []
        for name in names:
            if name == "auto":
                linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
                if linears:
                    chosen += [f"{linears[-1]}.{k}" if linears[-1] else k
                               for k, _ in modules[linears[-1]].named_parameters()]
            elif name in params:
                chosen.append(name)
            elif name in modules:
                chosen += [f"{name}.{k}" for k, _ in modules[name].named_parameters()]
            else:
                raise BpkitConfigError("exclude", name, "a module or parameter name of the model, or 'auto'")
        self.excluded_names = chosen
        self._excluded = {id(params[n]) for n in chosen}
        self._plan_key = None
        self._bound = True
        return self

    def pieces(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(grads)  # AGC works on whole tensors (units are rows); sparse gradients are left out

    def _make_plan(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> Any:
        groups: dict[tuple, list[int]] = defaultdict(list)
        excluded, plan = [], []
        sparse = [i for i, g in enumerate(grads) if g.layout != torch.strided]
        if sparse:
            warnings.warn(f"bpkit AGC: {len(sparse)} parameter(s) have sparse gradients (e.g. nn.Embedding(sparse=True)) "
                          "and are not clipped; AGC needs dense per-unit gradient norms", UserWarning, stacklevel=3)
        for i, (p, g) in enumerate(zip(params, grads)):
            if id(p) in self._excluded or i in sparse:
                excluded.append(i)
            elif p.numel() <= STACK_MAX_NUMEL:
                groups[(unit_shape(p), g.dtype, g.device)].append(i)
            else:
                plan.append((unit_shape(p), [i]))
        # many small tensors of one unit shape: one stacked pass; a large tensor: its own pass on a view
        for (shape, _, _), idx in groups.items():
            plan += [(shape, idx)] if len(idx) > 1 else [(shape, [i]) for i in idx]
        return plan, excluded

    def apply(self, params: list[torch.Tensor], grads: list[torch.Tensor], total: torch.Tensor | None) -> ClipResult:
        if not grads:
            raise BpkitConfigError("params", [], "at least one parameter with a gradient for AGC")
        if self.exclude is not None and not self._bound:
            raise BpkitConfigError("exclude", self.exclude, "AGC.bind(model) to be called first to resolve the names")
        key = tuple(id(p) for p in params) + tuple((g.dtype, g.device) for g in grads)
        if key != self._plan_key:
            self._plan, self._plan_key = self._make_plan(params, grads), key
        plan, excluded = self._plan
        pre_sq, post_sq, clipped = [], [], []
        for (units, fan), idx in plan:
            if len(idx) == 1:
                g_all = grads[idx[0]].reshape(1, units, fan)  # a view when contiguous: no copy
                w_all = params[idx[0]].detach().reshape(1, units, fan)
            else:
                g_all = torch.stack([grads[i].reshape(units, fan) for i in idx])
                w_all = torch.stack([params[i].detach().reshape(units, fan) for i in idx])
            acc = torch.float32 if g_all.dtype in (torch.float16, torch.bfloat16) else g_all.dtype
            g_norm = torch.linalg.vector_norm(g_all, dim=-1, dtype=acc)  # (n, units)
            w_norm = torch.linalg.vector_norm(w_all, dim=-1, dtype=acc)
            max_norm = w_norm.clamp(min=self.eps) * self.clip_factor
            # gradients already within bounds, and non-finite ones, are left as they are
            over = (g_norm > max_norm) & torch.isfinite(g_norm)
            scale = torch.where(over, max_norm / g_norm.clamp(min=1e-6), torch.ones_like(g_norm))
            pre_sq.append(g_norm.float().square().sum())
            post_sq.append((g_norm * scale).float().square().sum())
            clipped.append(over.any())
            self._scale_(grads, idx, g_all, scale)
        if excluded:
            ex = foreach_norms([grads[i] for i in excluded], 2.0).square().sum()
            pre_sq.append(ex)
            post_sq.append(ex)
        norm_pre, norm_post = torch.stack(pre_sq).sum().sqrt(), torch.stack(post_sq).sum().sqrt()
        clipped_any = torch.stack(clipped).any() if clipped else torch.zeros((), dtype=torch.bool,
                                                                             device=norm_pre.device)
        threshold = as_device_tensor(self.clip_factor, norm_pre)
        return ClipResult(norm_pre=norm_pre, norm_post=norm_post, threshold=threshold, clipped=clipped_any)

    @staticmethod
    def _scale_(grads: list[torch.Tensor], idx: list[int], g_all: torch.Tensor, scale: torch.Tensor) -> None:
        scale = scale.to(g_all.dtype).unsqueeze(-1)  # (n, units, 1)
        if len(idx) == 1:
            g = grads[idx[0]]
            if g_all.data_ptr() == g.data_ptr() and g.is_contiguous():
                g_all.mul_(scale)  # in place through the view
            else:
                g.copy_((g_all * scale).reshape(g.shape))
            return
        # one multiply on the stacked copy, one fused copy back into the .grad tensors
        g_all.mul_(scale)
        units, fan = g_all.shape[1:]
        if all(grads[i].is_contiguous() for i in idx):
            torch._foreach_copy_([grads[i].view(units, fan) for i in idx], list(g_all.unbind(0)))
        else:
            for i, src in zip(idx, g_all.unbind(0)):
                grads[i].copy_(src.reshape(grads[i].shape))

    def config(self) -> dict[str, Any]:
        return {"clip_factor": self.clip_factor, "eps": self.eps, "exclude": self.exclude}
