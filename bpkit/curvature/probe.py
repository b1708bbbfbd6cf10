"""CurvatureProbe: the top and most negative Hessian eigenvalues, the Hessian trace and the sharpness against the
learning rate, every N steps on a fixed probe batch, with the ``sharpness`` and ``saddle`` rules. No Lightning."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from bpkit.alert import Alert
from bpkit.curvature.hvp import HessianOperator
from bpkit.curvature.lanczos import hutchinson_trace, lanczos
from bpkit.curvature.rules import saddle_alert, sharpness_alert, stability
from bpkit.errors import BpkitConfigError, check_bool, check_float, check_int

DEFAULT_EVERY_N_STEPS = 2000
"""The default cadence: one probe (about 30 Hessian-vector products, each about two backward passes) every 2000
steps costs under 5% of the steps in between on the recipes' models (``benchmarks/results/curvature_cost.md``)."""

METRICS = ("curvature/lambda_max", "curvature/lambda_min", "curvature/trace", "curvature/trace_stderr",
           "curvature/residual", "curvature/hvps", "curvature/grad_norm", "curvature/loss", "curvature/sharpness_x_lr",
           "curvature/lr_limit")
"""The keys :meth:`CurvatureProbe.measure` returns (the last two only when the optimizer is known)."""


def _rule_options(key: str, value: Any, allowed: Sequence[str]) -> dict[str, Any] | None:
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise BpkitConfigError(key, value, "true, false or a mapping with " + ", ".join(allowed))
    for k, v in value.items():
        if k not in allowed:
            raise BpkitConfigError(f"{key}.{k}", v, "an option among " + ", ".join(allowed))
        check_float(f"{key}.{k}", v, 0.0)
    return dict(value)


class CurvatureProbe:
    r"""Hessian spectrum probes by double backward: ``lambda_max``, ``lambda_min``, ``trace`` and
    ``sharpness_x_lr``, with alerts.

    Every call of :meth:`measure` builds the gradient of ``loss_fn()`` with a graph (one forward and one backward),
    then runs Lanczos with full reorthogonalization (at most ``max_iter`` Hessian-vector products, stopping when
    both extreme Ritz values have a residual ``||H y - theta y|| <= tol x max(|theta|)``: each is then within that
    of a true eigenvalue of the probe batch's Hessian) and Hutchinson's trace estimator with ``trace_samples``
    Rademacher probes deflated by the Lanczos basis (unbiased; exact when the basis spans all parameters).
    ``sharpness_x_lr`` is the top eigenvalue of the Hessian scaled by the optimizer's effective step
    (:func:`bpkit.curvature.rules.stability`): ``lr x lambda_max`` for SGD, momentum folded in
    (``lr x lambda_max / (1 + beta)``), and for Adam/RMSprop/Adagrad the preconditioned sharpness
    (Cohen et al. 2022: ``lambda_max(P^-1 H)`` with Adam's ``P = sqrt(v_hat) + eps``, times
    ``lr (1 - beta1) / (1 + beta1)``), always against the limit 2. An adaptive optimizer costs a second, top-only
    Lanczos run on the preconditioned operator.

    The probe reads a few numbers from the device per Hessian-vector product, on probe steps only. Rademacher
    vectors come from a private generator seeded with ``seed + step`` (the global RNG is untouched).

    Args:
        every_n_steps: probe on steps with ``step % every_n_steps == 0`` (:meth:`due`); 0: never by itself.
        max_iter: Lanczos iterations (Hessian-vector products) at most.
        tol: Lanczos relative residual tolerance.
        trace_samples: Hutchinson probes (Hessian-vector products); 0: no trace.
        sharpness: the ``sharpness`` rule (``True``, ``False`` or ``{"limit": 2.0}``).
        saddle: the ``saddle`` rule (``True``, ``False`` or ``{"neg_ratio": 0.1, "grad_ratio": 0.01}``, see
            :func:`bpkit.curvature.rules.saddle_alert`).
        preconditioned: for adaptive optimizers, measure the preconditioned sharpness (default) or the raw
            ``lr x lambda_max`` (``False``; cheaper, not their stability limit).
        seed: seed of the Rademacher vectors.

    Raises:
        BpkitConfigError: on a negative or non-integer count, a bad tolerance or bad rule options.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
        >>> probe = CurvatureProbe(every_n_steps=10)
        >>> loss_fn = lambda: 1.0 + 3.0 * w[0] ** 2 - 0.5 * w[1] ** 2    # H = diag(6, -1), a saddle at 0
        >>> m = probe.measure(loss_fn, [w], step=0, optimizer=torch.optim.SGD([w], lr=0.5))
        >>> round(m["curvature/lambda_max"], 3), round(m["curvature/lambda_min"], 3), round(m["curvature/trace"], 3)
        (6.0, -1.0, 5.0)
        >>> round(m["curvature/sharpness_x_lr"], 3), sorted(a.kind for a in probe.take_new_alerts())
        (3.0, ['saddle', 'sharpness'])
    """

    def __init__(self, every_n_steps: int = DEFAULT_EVERY_N_STEPS, max_iter: int = 20, tol: float = 1e-3,
                 trace_samples: int = 30, sharpness: bool | Mapping[str, Any] = True,
                 saddle: bool | Mapping[str, Any] = True, preconditioned: bool = True, seed: int = 0) -> None:
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 0)
        self.max_iter = check_int("max_iter", max_iter, 1)
        self.tol = check_float("tol", tol, 0.0, 1.0, low_inclusive=False)
        self.trace_samples = check_int("trace_samples", trace_samples, 0)
        self.sharpness = _rule_options("sharpness", sharpness, ("limit",))
        self.saddle = _rule_options("saddle", saddle, ("neg_ratio", "grad_ratio"))
        self.preconditioned = check_bool("preconditioned", preconditioned)
        self.seed = check_int("seed", seed, 0)
        self.limit = float((self.sharpness or {}).get("limit", 2.0))
        self.alerts: list[Alert] = []
        self._new: list[Alert] = []
        self.history: list[dict[str, float]] = []
        self.last_rule: str | None = None

    def due(self, step: int) -> bool:
        """Is ``step`` a probe step (``step % every_n_steps == 0``: the first step, then every N)?

        Example::

            >>> [s for s in range(25) if CurvatureProbe(every_n_steps=10).due(s)]
            [0, 10, 20]
        """
        return self.every_n_steps > 0 and step % self.every_n_steps == 0

    def measure(self, loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], step: int,
                optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Probe the Hessian of ``loss_fn()`` with respect to ``params`` now; returns the ``curvature/*`` metrics and
        queues the alerts (:meth:`take_new_alerts`).

        Args:
            loss_fn: returns the scalar loss on the probe batch, with a graph to ``params`` (call it under the mode,
                precision and RNG protection the caller wants: see :mod:`bpkit.curvature.state`).
            params: the parameters of the Hessian (those that require grad).
            step: the step to report at.
            optimizer: the optimizer, for ``sharpness_x_lr`` (omitted: no sharpness metric or rule).

        Raises:
            RuntimeError: from autograd when the loss has no double backward (the caller decides to skip).
        """
        params = [p for p in params if p.requires_grad]
        with torch.enable_grad():
            loss = loss_fn()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise BpkitConfigError("loss_fn", type(loss).__name__, "a function returning a scalar loss tensor")
            op = HessianOperator(loss.reshape(()), params)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
            kw = {"device": op.device, "dtype": op.dtype}
            lz = lanczos(op.matvec, op.dim, self.max_iter, self.tol, gen, **kw)
            trace = hutchinson_trace(op.matvec, op.dim, self.trace_samples, gen, lz.basis, lz.basis_trace, **kw) \
                if self.trace_samples > 0 else None
            stab = stability(optimizer, params, self.preconditioned)
            s_x_lr = None
            if stab is not None:
                if stab.scale is None:
                    s_x_lr = stab.scalar * lz.lambda_max
                else:
                    d = stab.scale.to(**kw).clamp_min(0).sqrt()
                    top = lanczos(lambda v: d * op.matvec(d * v), op.dim, self.max_iter, self.tol, gen, **kw)
                    s_x_lr = top.lambda_max
            grad_norm, loss_value = (float(x) for x in torch.stack([op.grad_norm, loss.detach().reshape(())])
                                     .double().cpu().tolist())
        scale = max(abs(lz.lambda_max), abs(lz.lambda_min), 1e-30)
        metrics = {
            "curvature/lambda_max": lz.lambda_max, "curvature/lambda_min": lz.lambda_min,
            "curvature/residual": max(lz.residual_max, lz.residual_min) / scale,
            "curvature/hvps": float(op.hvps), "curvature/grad_norm": grad_norm, "curvature/loss": loss_value,
        }
        if trace is not None:
            metrics["curvature/trace"] = trace.value
            metrics["curvature/trace_stderr"] = trace.stderr
        if s_x_lr is not None:
            metrics["curvature/sharpness_x_lr"] = float(s_x_lr)
            metrics["curvature/lr_limit"] = stab.lr * self.limit / s_x_lr if s_x_lr > 0 else float("inf")
        self.last_rule = stab.rule if stab is not None else None
        self.observe(step, metrics, self.last_rule)
        return metrics

    def observe(self, step: int, metrics: Mapping[str, float], rule: str | None = None) -> list[Alert]:
        """Record one probe's metrics in :attr:`history` and run the rules on them (what :meth:`measure` does after
        measuring; a DDP rank that got rank 0's numbers calls it directly, so every rank has the same alerts).

        Args:
            step: the probe's step.
            metrics: the ``curvature/*`` metrics of :meth:`measure`.
            rule: the optimizer's stability rule (:class:`bpkit.curvature.rules.Stability`), for the message.

        Returns:
            The new alerts (also queued for :meth:`take_new_alerts`).
        """
        self.history.append({"step": float(step), **metrics})
        new = []
        s_x_lr = metrics.get("curvature/sharpness_x_lr")
        if self.sharpness is not None and s_x_lr is not None:
            lr = metrics["curvature/lr_limit"] * s_x_lr / self.limit if s_x_lr > 0 else 0.0
            a = sharpness_alert(step, s_x_lr, metrics["curvature/lambda_max"], lr, self.limit, rule or "sgd")
            if a is not None:
                new.append(a)
        if self.saddle is not None:
            a = saddle_alert(step, metrics["curvature/lambda_min"], metrics["curvature/lambda_max"],
                             metrics["curvature/grad_norm"], metrics["curvature/loss"], **self.saddle)
            if a is not None:
                new.append(a)
        self.alerts.extend(new)
        self._new.extend(new)
        return new

    def take_new_alerts(self) -> list[Alert]:
        """The alerts raised since the last call."""
        new, self._new = self._new, []
        return new

    def state_dict(self) -> dict[str, Any]:
        """The probe history (one small dict per probe)."""
        return {"curvature_history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [dict(h) for h in state.get("curvature_history", [])]
