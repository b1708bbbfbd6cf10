"""Cost of CurvatureMonitor's probe against a training step and a PyHessian-style loop, side by side.

For the models of the curvature recipes (the edge-of-stability MLP on full-batch digits, the deep linear net of the
saddle recipe) and a mid-size MLP with Adam (the preconditioned sharpness: a second Lanczos run), measures in one
process, interleaved (A B C A B C ..., medians): one bare training step (forward, backward, optimizer step); one
probe exactly as the callback runs it (``preserved_rng``, ``preserved_module`` in eval mode, autocast off,
``CurvatureProbe.measure``: Lanczos for lambda_max/lambda_min, Hutchinson trace, sharpness); and a PyHessian-style
loop (Yao et al. 2020: gradient with ``create_graph``, Hessian-vector products on lists of tensors, power iteration
for the top eigenvalue, Hutchinson for the trace) with the same number of Hessian-vector products. The amortised
cost of the monitor is ``probe / (every_n_steps x step)`` at the default cadence.

Usage::

    python benchmarks/curvature_cost.py              # markdown table on stdout
    python benchmarks/curvature_cost.py --repeats 3 --threads 1
    python benchmarks/curvature_cost.py --smoke      # seconds: one repeat of the smallest case
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import lightning
import torch
import torch.nn.functional as F

from bpkit.curvature import DEFAULT_EVERY_N_STEPS, CurvatureProbe, preserved_module, preserved_rng
from bpkit.data import DigitsDataModule, RegressionDataModule
from bpkit.models import MLP
from bpkit.models.deep_linear import DeepLinear


def _cases():
    digits = DigitsDataModule(batch_size=64)
    x, y = digits.split("train").tensors
    reg = RegressionDataModule(batch_size=64, seed=42)
    rx, ry = reg.split("train").tensors
    torch.manual_seed(0)
    eos = MLP(64, 10, depth=3, width=64, activation="tanh")
    lin = DeepLinear(8, 1, depth=4, width=16, init_scale=0.3)
    mid = MLP(64, 10, depth=4, width=256)
    return [
        ("edge_of_stability MLP 64x64 tanh, full batch 1257, SGD", eos, (x, y), F.cross_entropy,
         torch.optim.SGD(eos.parameters(), lr=0.5)),
        ("saddle DeepLinear 4x16, batch 64, SGD", lin, (rx[:64], ry[:64]), F.mse_loss,
         torch.optim.SGD(lin.parameters(), lr=0.01)),
        ("MLP 4x256, batch 64, Adam (preconditioned)", mid, (x[:64], y[:64]), F.cross_entropy,
         torch.optim.Adam(mid.parameters(), lr=1e-3)),
    ]


def _step(model, batch, loss_fn, opt):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(batch[0]), batch[1])
    loss.backward()
    opt.step()


def _probe(probe, model, batch, loss_fn, opt):
    params = [p for p in model.parameters() if p.requires_grad]
    with preserved_rng(), preserved_module(model), torch.autocast("cpu", enabled=False):
        return probe.measure(lambda: loss_fn(model(batch[0]), batch[1]), params, 0, opt)


def _pyhessian(model, batch, loss_fn, hvps: int, trace_samples: int):
    """PyHessian's loop (hessian.eigenvalues with top_n=1, then hessian.trace), capped at ``hvps`` products."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hv(v):
        return torch.autograd.grad(grads, params, grad_outputs=v, only_inputs=True, retain_graph=True)

    def normalize(v):
        s = torch.sqrt(sum((x * x).sum() for x in v))
        return [x / (s + 1e-6) for x in v]

    v = normalize([torch.randn_like(p) for p in params])
    eig = None
    for _ in range(hvps - trace_samples):
        h = hv(v)
        eig = sum((a * b).sum() for a, b in zip(h, v)).item()
        v = normalize(h)
    trace = []
    for _ in range(trace_samples):
        z = [torch.randint_like(p, high=2) * 2 - 1 for p in params]
        trace.append(sum((a * b).sum() for a, b in zip(hv(z), z)).item())
    model.train()
    return eig, sum(trace) / max(len(trace), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="training steps per step-time sample")
    parser.add_argument("--smoke", action="store_true", help="one repeat of the smallest case (a test runs this)")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.steps = 1, 2
    torch.set_num_threads(args.threads)
    print(f"# CurvatureMonitor cost ({datetime.date.today().isoformat()})\n")
    print(f"torch {torch.__version__}, lightning {lightning.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()} CPU, {args.threads} thread(s), medians of {args.repeats} interleaved repeats. "
          f"Default cadence every_n_steps={DEFAULT_EVERY_N_STEPS}.\n")
    print("| model | params | step (ms) | probe (ms) | HVPs | probe / step | amortised at default cadence "
          "| PyHessian-style, same HVPs (ms) | probe / PyHessian |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model, batch, loss_fn, opt in (_cases()[1:2] if args.smoke else _cases()):
        for _ in range(3):
            _step(model, batch, loss_fn, opt)  # warm up, and give Adam its state
        probe = CurvatureProbe()
        hvps = int(_probe(  # all products, the preconditioned run's included
            probe, model, batch, loss_fn, opt)["curvature/hvps"])
        steps, probes, pyh = [], [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for _ in range(args.steps):
                _step(model, batch, loss_fn, opt)
            steps.append((time.perf_counter() - t) / args.steps)
            t = time.perf_counter()
            _probe(probe, model, batch, loss_fn, opt)
            probes.append(time.perf_counter() - t)
            t = time.perf_counter()
            _pyhessian(model, batch, loss_fn, hvps, probe.trace_samples)
            pyh.append(time.perf_counter() - t)
        step, pr, ph = statistics.median(steps), statistics.median(probes), statistics.median(pyh)
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params:,} | {1e3 * step:.2f} | {1e3 * pr:.1f} | {hvps} "
              f"| {pr / step:.0f}x | {100 * pr / (DEFAULT_EVERY_N_STEPS * step):.1f}% | {1e3 * ph:.1f} "
              f"| {pr / ph:.2f} |")


if __name__ == "__main__":
    main()
