"""Cost of bpkit.gradcheck.check_gradients against parameter count.

For MLPs of growing width (and a deep ResNet with many tensors) on a batch of 64 digits-sized
inputs, measures: one float32 forward+backward (the training step's own cost), the directional
check, the full check with 8 sampled elements per tensor, and what ``torch.autograd.gradcheck``-style per-element
central differences over every parameter would cost (2 forward passes per element, extrapolated
from the measured float64 forward time; not run).

Usage::

    python benchmarks/gradcheck_cost.py            # table in markdown on stdout
    python benchmarks/gradcheck_cost.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import time

import lightning
import torch
import torch.nn.functional as F

from bpkit.gradcheck import check_gradients
from bpkit.models import MLP, ResNet


def _best(fn, repeats: int) -> float:
    """Best of ``repeats`` runs; runs longer than 5 s are not repeated."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if best > 5.0:
            break
    return best


def _step_time(model, batch, repeats: int, dtype=torch.float32) -> float:
    model = model.to(dtype)
    x, y = batch[0].to(dtype), batch[1]

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    step()
    return _best(step, repeats)


def _forward_time(model, batch, repeats: int, dtype=torch.float64) -> float:
    model = model.to(dtype)
    x = batch[0].to(dtype)
    with torch.no_grad():
        model(x)
        return _best(lambda: model(x), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--only", default="", help="run only the models whose name contains this")
    parser.add_argument("--smoke", action="store_true", help="the two smallest MLPs, one repeat: a seconds-long check")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.batch = 1, 16
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cases = [(f"MLP width {w}", lambda w=w: MLP(64, 10, depth=4, width=w), (args.batch, 64))
             for w in ((32, 128) if args.smoke else (32, 128, 512, 1024, 2048))]
    if not args.smoke:
        cases.append(("ResNet depth 8 width 16 (BN)", lambda: ResNet(1, 10, depth=8, width=16), (args.batch, 1, 8, 8)))

    print(f"torch {torch.__version__}, lightning {lightning.__version__}, python {platform.python_version()}, "
          f"{args.threads} thread(s), batch {args.batch}, float64 copy, best of {args.repeats}\n")
    print("| model | params | tensors | fwd+bwd fp32 | directional (3 dirs) | evals | full (8 el./tensor) | evals "
          "| every element (extrapolated) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, make, shape in cases:
        if args.only not in name:
            continue
        model = make()
        batch = (torch.rand(*shape), torch.randint(0, 10, (shape[0],)))
        n_params = sum(p.numel() for p in model.parameters())
        n_tensors = len(list(model.parameters()))
        step = _step_time(make(), batch, args.repeats)
        fwd64 = _forward_time(make(), batch, args.repeats)
        report = None

        def directional(model=model, batch=batch):
            nonlocal report
            report = check_gradients(model, batch, loss_fn=F.cross_entropy, mode="directional", n_directions=3)

        t_dir = _best(directional, args.repeats)
        assert report.passed, str(report)
        ev_dir = report.evaluations
        if args.skip_full:
            t_full, ev_full = float("nan"), 0
        else:
            def full(model=model, batch=batch):
                nonlocal report
                report = check_gradients(model, batch, loss_fn=F.cross_entropy, mode="full", max_elements=8)

            t_full = _best(full, 1)
            assert report.passed, str(report)
            ev_full = report.evaluations
        every = 2 * n_params * fwd64
        print(f"| {name} | {n_params:,} | {n_tensors} | {step * 1e3:.2f} ms | {t_dir:.2f} s | {ev_dir} | "
              f"{t_full:.2f} s | {ev_full} | {every:,.0f} s ({every / 3600:.1f} h) |", flush=True)


if __name__ == "__main__":
    main()
