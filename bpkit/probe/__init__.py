"""Framework-free engines: the statistics, buffers, rules and metric names of bpkit's monitors, driven from a plain
PyTorch loop, Lightning Fabric or bpkit's Lightning callbacks alike. No Lightning import here.

Example::

    >>> import torch
    >>> from bpkit import GradientProbe
    >>> model = torch.nn.Linear(3, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> probe = GradientProbe(model, log_every_n_steps=2, histograms=False)
    >>> for step in range(4):
    ...     loss = model(torch.randn(8, 3)).pow(2).mean()
    ...     loss.backward()
    ...     if probe.step(step, loss=loss):  # False: a non-finite (or, by your choice, exploding) step: skip it
    ...         optimizer.step()
    ...     optimizer.zero_grad()
    ...     if probe.is_log_step(step):
    ...         metrics = probe.flush()  # the one host read: a flat dict of metrics; new alerts in probe.alerts
    >>> sorted(metrics)[:3]
    ['grad/max/bias', 'grad/max/weight', 'grad/norm/bias']
"""

from importlib import import_module

_EXPORTS = {
    "GradientProbe": "bpkit.probe.gradient",
    "ActivationProbe": "bpkit.probe.activation",
    "TemporalProbe": "bpkit.probe.temporal",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bpkit.probe' has no attribute {name!r}")
