"""Leave no trace: a curvature probe runs extra forward/backward passes, which must not change training (RNG
streams, dropout/BatchNorm mode, BatchNorm running statistics, torchmetrics accumulators). Pure torch."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Save and restore the random states of Python's ``random``, numpy's global RNG, torch's CPU generator and
    every initialized CUDA device's generator around the block.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> with preserved_rng():
        ...     _ = torch.rand(100)
        >>> x = torch.rand(1)
        >>> _ = torch.manual_seed(0)
        >>> torch.equal(x, torch.rand(1))
        True
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = torch.cuda.get_rng_state_all()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _is_metric(module: torch.nn.Module) -> bool:
    # torchmetrics.Metric, by duck typing (no import): its states are listed in `_defaults`
    return isinstance(getattr(module, "_defaults", None), dict) and hasattr(module, "_update_count")


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


@contextlib.contextmanager
def preserved_module(module: torch.nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run the block with ``module`` in eval mode (``eval_mode``), then put back every submodule's training flag, every
    buffer's values (BatchNorm's running statistics and counters) and the accumulated state of every torchmetrics
    ``Metric`` inside it (so a probe's ``training_step`` does not count in the epoch's accuracy).

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).train()
        >>> before = net[1].running_mean.clone()
        >>> with preserved_module(net, eval_mode=False):
        ...     _ = net(torch.randn(8, 3) + 5)   # train mode: moves the running mean
        >>> torch.equal(net[1].running_mean, before), net.training
        (True, True)
    """
    flags = [(m, m.training) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    metrics = []
    for m in module.modules():
        if _is_metric(m):
            saved = {name: _copy(getattr(m, name)) for name in m._defaults}
            extra = {k: _copy(getattr(m, k)) for k in ("_update_count", "_computed", "_forward_cache")
                     if hasattr(m, k)}
            metrics.append((m, saved, extra))
    if eval_mode:
        module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        for m, saved, extra in metrics:
            for name, value in {**saved, **extra}.items():
                setattr(m, name, value)
