"""bpkit in a plain PyTorch loop: no Lightning, no Trainer.

A deep sigmoid MLP (its first layers get almost no gradient) is trained on a synthetic task, and one batch holds
a NaN. ``GradientProbe`` names the vanishing layers and skips the NaN step, so the weights stay finite.

    python examples/plain_loop.py
"""

from __future__ import annotations

import torch
from torch import nn

from bpkit import GradientProbe


def make_model(depth: int = 12, width: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(16, width), nn.Sigmoid()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, 2))


def batches(steps: int, nan_at: int, batch: int = 64):
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randn(batch, 16, generator=g)
        y = (x[:, 0] > 0).long()
        if step == nan_at:
            x[0, 0] = float("nan")  # a corrupt record
        yield x, y


def main(steps: int = 60, nan_at: int = 7, log_every_n_steps: int = 10) -> GradientProbe:
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = GradientProbe(model, log_every_n_steps=log_every_n_steps, histograms=False)
    for step, (x, y) in enumerate(batches(steps, nan_at)):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if probe.step(step, loss=loss):  # False: a NaN/Inf gradient; the probe already dropped it
            optimizer.step()
        optimizer.zero_grad()
        if probe.is_log_step(step):
            metrics = probe.flush()  # the one host read of a log step
            print(f"step {step}: loss {loss.item():.3f}, total gradient norm {metrics['grad/norm_total']:.3g}")
            for alert in probe.take_new_alerts():
                print(f"  {alert}")
    probe.flush()
    for alert in probe.take_new_alerts():
        print(f"  {alert}")
    print(f"skipped steps: {probe.skipped_steps}; weights finite: "
          f"{all(bool(torch.isfinite(p).all()) for p in model.parameters())}")
    return probe


if __name__ == "__main__":
    main()
