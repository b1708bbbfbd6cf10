"""Where a NaN/Inf is born: replay one step with hooks on every module and name the first one that makes it.

Only run on a step whose gradient was already found non-finite (the probe skips that step), so its cost never
touches a healthy step. No Lightning import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bpkit.curvature.state import preserved_module, preserved_rng
from bpkit.stats.readback import readback


@dataclass(frozen=True)
class NonFiniteOrigin:
    """The module where the first non-finite value appeared.

    Attributes:
        module: the module's name as in ``named_modules()`` (``"(model)"`` for the root).
        phase: ``"forward"`` (its output is the first non-finite one while its inputs were finite) or ``"backward"``
            (its input gradient is non-finite while its output gradient was finite).
        samples: the samples of the batch (rows of dim 0) with a non-finite value there.
    """

    module: str
    phase: str
    samples: tuple[int, ...]

    def __str__(self) -> str:
        how = ("forward: non-finite output from finite inputs" if self.phase == "forward"
               else "backward: non-finite input gradient from a finite output gradient")
        return f"{self.module} ({how}; samples {_samples(self.samples)})"

    def sentence(self) -> str:
        """The plain-words sentence for an alert's message."""
        rows = _samples(self.samples)
        if self.phase == "forward":
            return (f"It starts in the forward pass of `{self.module}`: its inputs are finite, its output is not "
                    f"(sample(s) {rows} of the batch); look for a log, sqrt, division or exp there.")
        return (f"It starts in the backward pass of `{self.module}`: the gradient reaching its output is finite, the "
                f"one it passes to its input is not (sample(s) {rows} of the batch). A forward that is finite with a "
                "non-finite derivative is typical of sqrt, pow or norm at 0 (e.g. an epsilon outside a square root) or "
                "of a clamp/where that still differentiates a NaN branch.")


def _samples(rows: tuple[int, ...], limit: int = 8) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f", ... ({len(rows)} in all)" if len(rows) > limit else "") if rows else "unknown"


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _bad_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor, a (rows,) bool mask of the rows (dim 0) holding a NaN/Inf, flattened into one device tensor."""
    masks = [(~torch.isfinite(t.detach())).reshape(t.shape[0], -1).any(dim=1) if t.dim() else
             (~torch.isfinite(t.detach())).reshape(1) for t in tensors if t.is_floating_point()]
    return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)


class _Recorder:
    """Hooks on every module: forward order, the first non-finite output, and per backward event whether the
    gradient at a module's output and input is finite."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.depth = {name: (name.count(".") + 1 if name else 0) for name, _ in model.named_modules()}
        self.forward_hit: NonFiniteOrigin | None = None
        # (module, "in"/"out", the tensor's id, its bad rows) in backward order
        self.events: list[tuple[str, str, int, torch.Tensor]] = []
        self.handles: list[Any] = []

    def __enter__(self) -> "_Recorder":
        for name, module in self.model.named_modules():
            label = name or "(model)"
            self.handles.append(module.register_forward_pre_hook(self._leafify))
            self.handles.append(module.register_forward_hook(lambda m, i, o, label=label: self._forward(label, i, o)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @staticmethod
    def _leafify(module: nn.Module, inputs: Any) -> Any:
        # an input that carries no gradient (the data) becomes a leaf that does, so the first module's input
        # gradient can be seen too
        if not isinstance(inputs, tuple) or not any(isinstance(t, torch.Tensor) and t.is_floating_point()
                                                    and not t.requires_grad for t in inputs):
            return None
        return tuple(t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point()
                     and not t.requires_grad and torch.is_grad_enabled() else t for t in inputs)

    def _forward(self, label: str, inputs: Any, output: Any) -> None:
        outs = [t for t in _tensors(output) if t.is_floating_point()]
        ins = [t for t in _tensors(inputs) if t.is_floating_point()]
        if self.forward_hit is None and outs:
            bad_out = readback({"m": _bad_rows(outs)})["m"]
            if bad_out.any():
                bad_in = readback({"m": _bad_rows(ins)})["m"] if ins else None
                if bad_in is None or not bad_in.any():
                    rows = (~torch.isfinite(outs[0].detach())).reshape(outs[0].shape[0], -1).any(dim=1) \
                        if outs[0].dim() else torch.zeros(0, dtype=torch.bool)
                    self.forward_hit = NonFiniteOrigin(label, "forward", tuple(
                        int(i) for i in readback({"r": rows.nonzero().flatten()})["r"].tolist()))
        for kind, tensors in (("out", outs), ("in", ins)):
            for t in tensors:
                if t.requires_grad:
                    t.register_hook(lambda g, label=label, kind=kind, tid=id(t): self._backward(label, kind, tid, g))

    def _backward(self, label: str, kind: str, tid: int, grad: torch.Tensor) -> None:
        rows = (~torch.isfinite(grad)).reshape(grad.shape[0], -1).any(dim=1) if grad.dim() else \
            (~torch.isfinite(grad)).reshape(1)
        self.events.append((label, kind, tid, rows))

    def backward_origin(self) -> NonFiniteOrigin | None:
        """The first module, in backward order, whose input gradient is non-finite while every gradient that
        reached its output so far was finite; among modules hit by the same event, the deepest."""
        if not self.events:
            return None
        host = readback({str(i): rows for i, (_, _, _, rows) in enumerate(self.events)})
        bad_out: set[str] = set()
        for i, (label, kind, tid, _) in enumerate(self.events):
            rows = host[str(i)]
            if not rows.any():
                continue
            if kind == "out":
                bad_out.add(label)
                continue
            if label in bad_out:
                continue
            # the same input tensor is hooked by a container and its first child: prefer the innermost module
            same = [lab for j, (lab, k, t, _) in enumerate(self.events) if j >= i and t == tid and k == "in"
                    and lab not in bad_out]
            best = max(same, key=lambda lab: self.depth.get(lab, 0) if lab != "(model)" else 0, default=label)
            return NonFiniteOrigin(best, "backward", tuple(int(r) for r in rows.nonzero()[0].tolist()))
        return None


@contextlib.contextmanager
def _kept(model: nn.Module) -> Iterator[None]:
    """Leave the model as it was: gradients, buffers (BatchNorm's running statistics), torchmetrics accumulators,
    training flags and the RNG streams (Python, numpy, torch)."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    with preserved_rng(), preserved_module(model, eval_mode=False):
        try:
            for p in params:
                p.grad = None
            yield
        finally:
            for p, g in zip(params, grads):
                p.grad = g


def locate_nonfinite(model: nn.Module, replay: Callable[[], Any]) -> NonFiniteOrigin | None:
    """Replay a step (``replay()`` runs the forward pass and returns the loss, a tensor or a dict with ``"loss"``)
    with hooks on every module of ``model``, and name where the first non-finite value appears: the first module (in
    forward order) whose output is non-finite while its inputs are finite; else, after ``backward()``, the first module
    (in backward order) whose input gradient is non-finite while its output gradient is finite. The model's
    gradients, buffers, torchmetrics accumulators and RNG streams are left as they were (other side effects of
    ``replay``, e.g. a counter in your code, see the extra call). ``None`` when the replay is finite everywhere (the NaN
    came from elsewhere, e.g. another process or a step that cannot be replayed).

    Example::

        >>> import torch
        >>> class Norm(torch.nn.Module):
        ...     def forward(self, x):  # the epsilon is outside the square root: d sqrt(s)/ds is infinite at s = 0
        ...         return x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-6)
        >>> model = torch.nn.Sequential(Norm(), torch.nn.Linear(3, 1))
        >>> x = torch.randn(4, 3); x[2] = 0.0  # one blank record
        >>> print(locate_nonfinite(model, lambda: model(x).sum()))
        0 (backward: non-finite input gradient from a finite output gradient; samples 2)
    """
    with _kept(model), torch.enable_grad(), _Recorder(model) as recorder:
        out = replay()
        loss = out.get("loss") if isinstance(out, dict) else out
        if recorder.forward_hit is not None:
            return recorder.forward_hit
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return None
        if not bool(readback({"ok": torch.isfinite(loss.detach()).all()})["ok"]):
            return None
        loss.backward()
    return recorder.backward_origin()
