"""How the learning rate meets the curvature (the stability limit of each optimizer), and the two rules:
``sharpness`` (the step is too large for the loss surface) and ``saddle`` (small gradient, negative curvature)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bpkit.alert import Alert
from bpkit.errors import check_float
from bpkit.record import WHERE_HESSIAN

WHERE = WHERE_HESSIAN
"""``Alert.where`` of curvature alerts: they concern the whole loss surface, not one tensor."""


@dataclass
class Stability:
    """What ``curvature/sharpness_x_lr`` measures for an optimizer: the largest eigenvalue of ``D H D`` with
    ``D^2 = diag(scale)``, whose gradient-descent stability limit is 2.

    Attributes:
        rule: ``sgd``, ``heavy_ball``, ``nesterov``, ``adam``, ``rmsprop``, ``adagrad`` or ``raw`` (an optimizer
            whose dynamics are not modelled: plain ``lr x lambda_max``).
        scale: flat per-parameter ``lr_eff / P`` (``P``: the optimizer's diagonal preconditioner), or ``None``
            when it is one number for all parameters (then ``sharpness_x_lr = scalar x lambda_max``).
        scalar: that number when ``scale`` is ``None``.
        lr: the learning rate of the first parameter group (for the message).
    """

    rule: str
    scale: torch.Tensor | None
    scalar: float
    lr: float


def stability(optimizer: torch.optim.Optimizer | None, params: Sequence[torch.Tensor],
              preconditioned: bool = True) -> Stability | None:
    """The effective step ``lr_eff / P`` per parameter, normalised so that gradient descent on a quadratic with
    Hessian ``H`` is stable iff ``lambda_max(D H D) < 2`` (``D^2 = lr_eff / P``).

    - SGD: ``lr_eff = lr (1 - dampening)``; with momentum ``beta`` (heavy ball, PyTorch's form)
      ``lr / (1 + beta)`` (limit ``(2 + 2 beta) / lr``, Cohen et al. 2021 App. A); Nesterov
      ``lr (1 + 2 beta) / (1 + beta)``.
    - Adam/AdamW (``preconditioned``): ``P = sqrt(v_hat) + eps`` from the optimizer's state,
      ``lr_eff = lr (1 - beta1) / (1 + beta1)``: the preconditioned sharpness of Cohen et al. 2022 against their limit
      ``(2 + 2 beta1) / ((1 - beta1) lr)``; ``None`` before the first step (no state yet).
    - RMSprop (``P = sqrt(square_avg) + eps``, momentum as SGD) and Adagrad (``P = sqrt(sum) + eps``) likewise.
    - any other optimizer, or ``preconditioned=False`` for an adaptive one: ``raw``, ``lr x lambda_max``.

    Parameters not in the optimizer get scale 0 (they do not move).

    Example::

        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> s = stability(torch.optim.SGD([w], lr=0.1, momentum=0.9), [w])
        >>> s.rule, round(s.scalar, 4), s.scale is None
        ('heavy_ball', 0.0526, True)
    """
    if optimizer is None:
        return None
    groups = getattr(optimizer, "param_groups", None) or []
    if not groups:
        return None
    group_of = {}
    for g in groups:
        for p in g["params"]:
            group_of[id(p)] = g
    name = type(optimizer).__name__.lower()
    first_lr = float(groups[0].get("lr", 0.0))
    adaptive = name in ("adam", "adamw", "nadam", "radam", "rmsprop", "adagrad")
    if adaptive and not preconditioned:
        return _uniform("raw", [float(group_of.get(id(p), {}).get("lr", 0.0)) for p in params], params, first_lr)
    if name == "sgd":
        lrs = []
        rule = "sgd"
        for p in params:
            g = group_of.get(id(p))
            if g is None:
                lrs.append(0.0)
                continue
            lr, beta = float(g.get("lr", 0.0)), float(g.get("momentum", 0.0) or 0.0)
            damp = float(g.get("dampening", 0.0) or 0.0)
            if beta > 0 and g.get("nesterov", False):
                lrs.append(lr * (1 + 2 * beta) / (1 + beta))
                rule = "nesterov"
            elif beta > 0:
                lrs.append(lr * (1 - damp) / (1 + beta))
                rule = "heavy_ball"
            else:
                lrs.append(lr)
        return _uniform(rule, lrs, params, first_lr)
    if name in ("adam", "adamw", "rmsprop", "adagrad"):
        state = optimizer.state
        parts = []
        for p in params:
            g, st = group_of.get(id(p)), state.get(p, {})
            if g is None:
                parts.append(torch.zeros(p.numel(), device=p.device))
                continue
            lr, eps = float(g.get("lr", 0.0)), float(g.get("eps", 1e-8))
            if name in ("adam", "adamw"):
                if "exp_avg_sq" not in st:
                    return None
                b1, b2 = (float(b) for b in g.get("betas", (0.9, 0.999)))
                step = float(st.get("step", 1))
                v_hat = st["exp_avg_sq"].detach().float() / (1 - b2 ** max(step, 1.0))
                precond, lr_eff = v_hat.sqrt() + eps, lr * (1 - b1) / (1 + b1)
            elif name == "rmsprop":
                if "square_avg" not in st:
                    return None
                beta = float(g.get("momentum", 0.0) or 0.0)
                precond, lr_eff = st["square_avg"].detach().float().sqrt() + eps, lr / (1 + beta)
            else:
                if "sum" not in st:
                    return None
                precond, lr_eff = st["sum"].detach().float().sqrt() + float(g.get("eps", 1e-10)), lr
            parts.append((lr_eff / precond).reshape(-1).to(p.device))
        return Stability(name.replace("adamw", "adam"), torch.cat(parts), 1.0, first_lr)
    return _uniform("raw", [float(group_of.get(id(p), {}).get("lr", 0.0)) for p in params], params, first_lr)


def _uniform(rule: str, lrs: list[float], params: Sequence[torch.Tensor], first_lr: float) -> Stability:
    if len(set(lrs)) <= 1:
        return Stability(rule, None, lrs[0] if lrs else first_lr, first_lr)
    scale = torch.cat([torch.full((p.numel(),), lr, device=p.device) for p, lr in zip(params, lrs)])
    return Stability(rule, scale, 1.0, first_lr)


def sharpness_alert(step: int, sharpness_x_lr: float, lambda_max: float, lr: float, limit: float = 2.0,
                    rule: str = "sgd") -> Alert | None:
    """A ``sharpness`` alert when ``sharpness_x_lr`` exceeds ``limit`` (2: gradient descent on a quadratic diverges
    along the top eigenvector when ``lr x lambda_max > 2``).

    Example::

        >>> a = sharpness_alert(10, 2.5, 25.0, 0.1)
        >>> a.kind, a.threshold, "below 2/lambda_max = 0.08" in a.message
        ('sharpness', 2.0, True)
        >>> sharpness_alert(10, 1.0, 10.0, 0.1) is None
        True
    """
    if not sharpness_x_lr > limit:
        return None
    lr_limit = lr * limit / sharpness_x_lr if sharpness_x_lr > 0 else float("nan")
    what = {"heavy_ball": " (with momentum)", "nesterov": " (Nesterov)", "adam": " (Adam's preconditioned "
            "sharpness, Cohen et al. 2022)", "rmsprop": " (RMSprop's preconditioned sharpness)",
            "adagrad": " (Adagrad's preconditioned sharpness)"}.get(rule, "")
    bound = "2/lambda_max" if rule == "sgd" else "the stability limit"
    return Alert("sharpness", int(step), WHERE, float(sharpness_x_lr), float(limit),
                 f"the loss surface is too sharp for the learning rate: lambda_max x lr = {sharpness_x_lr:.3g} > "
                 f"{limit:g}{what} (lambda_max = {lambda_max:.4g}); gradient descent is unstable along the top "
                 f"Hessian eigenvector, so the loss oscillates or diverges. Lower the learning rate below "
                 f"{bound} = {lr_limit:.3g}, or use warmup.")


def saddle_alert(step: int, lambda_min: float, lambda_max: float, grad_norm: float, loss: float,
                 neg_ratio: float = 0.1, grad_ratio: float = 0.01) -> Alert | None:
    """A ``saddle`` alert when the negative curvature is significant, ``lambda_min <= -neg_ratio x |lambda_max|``,
    and the gradient is small for it: ``||g||^2 / |lambda_min| <= grad_ratio x |loss|``.

    ``||g||^2 / |lambda_min|`` is the loss change over the distance ``||g|| / |lambda_min|`` at which the gradient
    and the negative curvature have equal say: when that is under 1% of the loss, gradient descent crawls (it leaves
    a saddle only as fast as ``(1 + lr |lambda_min|)`` per step from a tiny start) while the surface curves down.

    Example::

        >>> saddle_alert(5, -1.0, 1.0, 1e-4, 1.0).kind
        'saddle'
        >>> saddle_alert(5, -1.0, 1.0, 1.0, 1.0) is None    # a large gradient: not stuck
        True
        >>> saddle_alert(5, -1e-3, 1.0, 1e-4, 1.0) is None  # negligible negative curvature
        True
    """
    check_float("neg_ratio", neg_ratio, 0.0)
    check_float("grad_ratio", grad_ratio, 0.0)
    if not (lambda_min < 0 and -lambda_min >= neg_ratio * abs(lambda_max)):
        return None
    measure = grad_norm ** 2 / -lambda_min
    if not measure <= grad_ratio * abs(loss):
        return None
    return Alert("saddle", int(step), WHERE, float(lambda_min), float(-neg_ratio * abs(lambda_max)),
                 f"a saddle point: the gradient is small (||g|| = {grad_norm:.3g}) while the loss surface curves down "
                 f"(lambda_min = {lambda_min:.3g}, lambda_max = {lambda_max:.3g}); plain gradient descent escapes "
                 "slowly. Try momentum, gradient noise (a smaller batch), a learning-rate bump, or a larger init.")
