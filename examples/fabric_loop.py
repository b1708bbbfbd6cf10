"""bpkit in a Lightning Fabric loop (bf16 mixed precision), without the Trainer.

The same planted problems as ``plain_loop.py``: a deep sigmoid MLP whose first layers get almost no gradient, and
one batch with a NaN. ``GradientProbe`` looks through Fabric's module wrapper, so the metrics and alerts use your
parameter names (``0.weight``, not ``_forward_module.0.weight``), and ``fabric.log_dict`` sends the metrics to
Fabric's loggers.

    python examples/fabric_loop.py
"""

from __future__ import annotations

import torch
from lightning.fabric import Fabric
from torch import nn

from bpkit import GradientProbe

try:
    from examples.plain_loop import batches, make_model
except ImportError:  # run as a script from the examples folder
    from plain_loop import batches, make_model


def main(steps: int = 60, nan_at: int = 7, log_every_n_steps: int = 10, loggers=None) -> GradientProbe:
    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-mixed", loggers=loggers)
    fabric.launch()
    fabric.seed_everything(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    probe = GradientProbe(model, log_every_n_steps=log_every_n_steps, histograms=False)
    for step, (x, y) in enumerate(batches(steps, nan_at)):
        x, y = fabric.to_device((x, y))
        loss = nn.functional.cross_entropy(model(x), y)
        fabric.backward(loss)
        if probe.step(step, loss=loss, optimizer=optimizer):
            optimizer.step()
        optimizer.zero_grad()
        if probe.is_log_step(step):
            fabric.log_dict(probe.flush(), step=step)
            for alert in probe.take_new_alerts():
                fabric.print(f"  {alert}")
    fabric.log_dict(probe.flush(), step=steps - 1)
    for alert in probe.take_new_alerts():
        fabric.print(f"  {alert}")
    fabric.print(f"skipped steps: {probe.skipped_steps}")
    return probe


if __name__ == "__main__":
    main()
