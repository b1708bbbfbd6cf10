"""Small test doubles shared by the test files."""

from __future__ import annotations

import torch
from lightning.pytorch.loggers.logger import Logger
from torch.utils._python_dispatch import TorchDispatchMode


def step_if_manual(module, loss) -> None:
    """Under manual optimization, the zero_grad / backward / step that Lightning would do automatically."""
    if not module.automatic_optimization:
        opt = module.optimizers()
        opt.zero_grad()
        module.manual_backward(loss)
        opt.step()


def sgd_or_adam(module, name: str, lr: float) -> torch.optim.Optimizer:
    """``Adam(lr)`` for ``name="adam"``, else ``SGD(lr, momentum=0.9)``: the test models' optimizers."""
    if name == "adam":
        return torch.optim.Adam(module.parameters(), lr=lr)
    return torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)


class MemoryLogger(Logger):
    """A Lightning logger that keeps every logged scalar: ``metrics[step][key] = value``."""

    def __init__(self):
        super().__init__()
        self.metrics = {}

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.setdefault(step, {}).update({k: float(v) for k, v in metrics.items()})

    def keys(self):
        return {k for m in self.metrics.values() for k in m}

    def series(self, key):
        """``{step: value}`` of one key."""
        return {step: m[key] for step, m in self.metrics.items() if key in m}


class OpRecorder(TorchDispatchMode):
    """Records every aten op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    def kernels(self):
        """Ops that launch work (views only change metadata)."""
        return [str(f) for f in self.ops if not f.is_view]
