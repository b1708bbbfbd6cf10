"""What finding where a NaN starts costs: bpkit's replay on the failing step only, against
``torch.autograd.detect_anomaly`` around every step.

The model is the one of ``tests/test_origin.py``: a stem, a normalisation whose epsilon is outside the square root
(finite forward, NaN backward on a blank record) and a head, trained for 200 steps with one blank record in batch 150.
Three runs, interleaved in one process (a plain PyTorch loop, one torch thread):

- ``bare``: no monitoring (the NaN update is applied: the weights end NaN);
- ``bpkit``: ``GradientProbe(model, replay=...)``: statistics every step, the replay only on the NaN step;
- ``detect_anomaly``: every step under ``torch.autograd.detect_anomaly()`` (what a user reaches for today), which
  raises at the NaN step naming the backward function.

    python benchmarks/nan_origin.py [--steps 200] [--repeats 3] [--width 512] [--smoke]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from bpkit import GradientProbe


class UnitNorm(nn.Module):
    def forward(self, x):
        return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-6)


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width, bias=False), nn.Tanh(), UnitNorm(), nn.Linear(width, width),
                         nn.Tanh(), nn.Linear(width, 10))


def batches(steps: int, nan_at: int, batch: int = 128):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(8)]
    for step in range(steps):
        x, y = data[step % 8]
        if step == nan_at:
            x = x.clone()
            x[5] = 0.0
        yield x, y


def run(mode: str, steps: int, nan_at: int, width: int) -> tuple[float, str]:
    model = make_model(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = GradientProbe(model, histograms=False) if mode == "bpkit" else None
    said = ""
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches(steps, nan_at)):
        opt.zero_grad()
        if mode == "detect_anomaly":
            try:
                with warnings.catch_warnings(), torch.autograd.detect_anomaly():
                    warnings.simplefilter("ignore")
                    F.cross_entropy(model(x), y).backward()
            except RuntimeError as err:
                said = str(err).splitlines()[0]
                continue  # the user's loop would stop here; keep timing the same number of steps
            opt.step()
            continue
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if probe is None:
            opt.step()
        elif probe.step(step, replay=lambda x=x, y=y: F.cross_entropy(model(x), y)):
            opt.step()
        if probe is not None and probe.is_log_step(step):
            probe.flush()
    if probe is not None:
        probe.flush()
        said = next((a.origin for a in probe.alerts if a.kind == "nonfinite"), "")
    return (time.perf_counter() - start) / steps * 1e3, said


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--smoke", action="store_true", help="a few steps, one repeat (tests)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.repeats, args.width = 12, 1, 32
    torch.set_num_threads(1)
    nan_at = args.steps * 3 // 4
    times: dict[str, list[float]] = {"bare": [], "bpkit": [], "detect_anomaly": []}
    said: dict[str, str] = {}
    for _ in range(args.repeats):
        for mode in times:
            ms, text = run(mode, args.steps, nan_at, args.width)
            times[mode].append(ms)
            said[mode] = text
    bare = statistics.median(times["bare"])
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, {args.steps} steps, "
          f"MLP width {args.width}, batch 128, NaN born at step {nan_at}; median of {args.repeats}")
    print("| run | ms/step | x bare | what it says |")
    print("|---|---|---|---|")
    for mode, values in times.items():
        ms = statistics.median(values)
        print(f"| {mode} | {ms:.2f} | {ms / bare:.2f}x | {said.get(mode) or '-'} |")


if __name__ == "__main__":
    main()
