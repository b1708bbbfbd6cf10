"""Framework-free engines: the statistics, buffers, rules and metric names of bpkit's monitors, driven from a plain
PyTorch loop, Lightning Fabric or bpkit's Lightning callbacks alike. No Lightning import here.

Example::

    from bpkit import GradientProbe

    probe = GradientProbe(model)
    for step, (x, y) in enumerate(loader):
        loss = loss_fn(model(x), y)
        loss.backward()
        if probe.step(step, loss=loss):  # False: a non-finite (or, by your choice, exploding) step: skip it
            optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 50 == 0:
            print(probe.flush())  # the one host read: a flat dict of metrics; new alerts in probe.alerts
"""

from importlib import import_module

_EXPORTS = {
    "GradientProbe": "bpkit.probe.gradient",
    "ActivationProbe": "bpkit.probe.activation",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bpkit.probe' has no attribute {name!r}")
