"""CPU anchor against Cockpit: bpkit's GradientProbe and Cockpit side by side in a plain PyTorch loop.

Issue 22 quotes "Cockpit 1.5x (economy) to 21x (full)" from an H200 run. This script measures the same anchor on
the CPU, on ``benchmarks/overhead.py``'s "mlp" (``MLP(64, 10, depth=10, width=512)``: 2.14M parameters in 20
tensors, batch 64, cross-entropy, Adam lr 1e-3, one torch thread, data made in memory), in a plain loop because
Cockpit does not run inside Lightning. Configurations (interleaved in each repeat, in a rotated order; the mean time
per step over the timed steps, the median over repeats, and its ratio to the bare loop's median):

- ``bare``: forward, backward, ``opt.step()``;
- ``bpkit_default``: ``GradientProbe(model)`` at its default cadence (a log step every 50 steps);
- ``bpkit_all_every_step``: ``GradientProbe(model, log_every_n_steps=1, histogram_every_n_steps=1)``: norms, max,
  weight norms, update ratios and histograms, read back at every step; ``_sampled``: the same with
  ``histogram_samples=4096``;
- ``cockpit_<label>``: ``Cockpit(model.parameters(), quantities=configuration(label))`` for the labels economy,
  business and full, tracking at every step; ``cockpit_<label>_every_50``: the same tracking every 50th step
  (``schedules.linear(50, offset=49)``: steps 49, 99, ..., the steps on which bpkit logs).

The steps around a cadence of 50 (bare, bpkit, ``_every_50``) run 5 warm-up and 50 timed steps (steps 5-54), so the
timed window holds exactly one log step (bpkit's step 49; Cockpit's step 49 and Alpha's end point at 50): the
amortised cost of one interval. Cockpit at every step costs seconds per step on a CPU, so those rows run 1 warm-up
and 2 timed steps (``--cockpit-steps``). Cockpit is used as its docs show: the model's layers and the loss extended
by ``backpack.extend``, the per-sample losses (``reduction="none"``) and the optimizer handed in through ``info``,
``with cockpit(step, info=...): loss.backward(create_graph=cockpit.create_graph(step))``. BackPACK cannot extend
bpkit's ``MLP`` container nor ``nn.Identity`` (its placeholder norm/dropout), so only the other leaf modules
(Linear, ReLU) are extended: the same model for every row.

Setup (Cockpit and BackPACK are not bpkit dependencies: install them into a separate folder, never into bpkit's
environment; ``--no-deps`` keeps pip from touching torch)::

    python -m pip install --no-deps --target /tmp/cockpit_env cockpit-for-pytorch==1.0.2 \\
        backpack-for-pytorch==1.7.1 einops unfoldNd json-tricks pandas scipy seaborn "setuptools<81"

(``setuptools<81``: Cockpit 1.0.2 imports ``pkg_resources``, which setuptools 81 removed; matplotlib and numpy come
from bpkit's environment.)

Usage::

    PYTHONPATH=/tmp/cockpit_env python benchmarks/cockpit_anchor.py            # about 10 minutes on a 2-core CPU
    PYTHONPATH=/tmp/cockpit_env python benchmarks/cockpit_anchor.py --smoke    # seconds (a width-64 MLP)
    PYTHONPATH=/tmp/cockpit_env python benchmarks/cockpit_anchor.py --configs bare,cockpit_economy --repeats 1
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")  # pkg_resources' deprecation, Cockpit's "no update step for Adam" (see the notes)

import torch  # noqa: E402
from torch import nn  # noqa: E402

try:
    import backpack  # noqa: E402
    import cockpit  # noqa: E402
    from cockpit.utils import schedules  # noqa: E402
    from cockpit.utils.configuration import configuration  # noqa: E402
except ImportError as err:  # pragma: no cover - depends on the machine
    sys.exit(f"cockpit_anchor.py needs Cockpit and BackPACK, which are not bpkit dependencies ({err}).\n"
             "Install them into a separate folder and put it on PYTHONPATH:\n"
             "  python -m pip install --no-deps --target /tmp/cockpit_env cockpit-for-pytorch==1.0.2 "
             "backpack-for-pytorch==1.7.1 einops unfoldNd json-tricks pandas scipy seaborn 'setuptools<81'\n"
             "  PYTHONPATH=/tmp/cockpit_env python benchmarks/cockpit_anchor.py")

from bpkit import GradientProbe  # noqa: E402
from bpkit.models import MLP  # noqa: E402

COCKPIT_INTERVAL = 50
SMOKE = False  # set from --smoke: a width-64 MLP


def make_model(smoke: bool) -> nn.Module:
    """``benchmarks/overhead.py``'s "mlp": 10 Linear layers, 20 tensors (2.14M parameters at width 512)."""
    torch.manual_seed(0)
    return MLP(64, 10, depth=10, width=64 if smoke else 512)


def make_batches(count: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(count)]


# ----------------------------------------------------------------- configurations
# Each maker returns (step function, counter): ``step(global_step, x, y)`` runs one whole training step;
# ``counter(first, last)`` says how many log/track events fell in the timed window (a check that the monitor ran).

Step = Callable[[int, torch.Tensor, torch.Tensor], None]


def bare() -> tuple[nn.Module, Step, Callable[[int, int], int]]:
    model = make_model(SMOKE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(s: int, x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return model, step, lambda first, last: 0


def bpkit(**kwargs) -> Callable[[], tuple[nn.Module, Step, Callable[[int, int], int]]]:
    def make():
        model = make_model(SMOKE)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        probe = GradientProbe(model, **kwargs)
        flushed: list[int] = []

        def step(s: int, x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if probe.step(s, loss=loss, optimizer=opt):
                opt.step()
            if probe.is_log_step(s):
                if probe.flush():
                    flushed.append(s)

        return model, step, lambda first, last: sum(first <= s <= last for s in flushed)
    return make


def with_cockpit(label: str, interval: int,
                 quantity: type | None = None) -> Callable[[], tuple[nn.Module, Step, Callable[[int, int], int]]]:
    """Cockpit with ``configuration(label)`` (or the one ``quantity`` class alone), tracking every ``interval``."""
    def make():
        model = make_model(SMOKE)
        for module in model.modules():  # leaves only: BackPACK has no rule for the MLP container or nn.Identity
            if not list(module.children()) and not isinstance(module, nn.Identity):
                backpack.extend(module)
        loss_fn = backpack.extend(nn.CrossEntropyLoss())
        individual_loss_fn = nn.CrossEntropyLoss(reduction="none")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        schedule = schedules.linear(interval, offset=interval - 1 if interval > 1 else 0)
        quantities = ([quantity(track_schedule=schedule)] if quantity is not None
                      else configuration(label, track_schedule=schedule))
        cp = cockpit.Cockpit(model.parameters(), quantities=quantities)

        def step(s: int, x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = loss_fn(out, y)
            losses = individual_loss_fn(out, y)
            with cp(s, info={"batch_size": x.shape[0], "individual_losses": losses, "loss": loss, "optimizer": opt}):
                loss.backward(create_graph=cp.create_graph(s))
            opt.step()

        def counter(first: int, last: int) -> int:
            return sum(first <= s <= last for s in cp.get_output())

        return model, step, counter
    return make


CONFIGS: dict[str, tuple[Callable, str]] = {
    "bare": (bare, "cadence"),
    "bpkit_default": (bpkit(), "cadence"),
    "bpkit_all_every_step": (bpkit(log_every_n_steps=1, histogram_every_n_steps=1), "cadence"),
    "bpkit_all_every_step_sampled": (bpkit(log_every_n_steps=1, histogram_every_n_steps=1, histogram_samples=4096),
                                     "cadence"),
    "cockpit_economy_every_50": (with_cockpit("economy", COCKPIT_INTERVAL), "cadence"),
    "cockpit_business_every_50": (with_cockpit("business", COCKPIT_INTERVAL), "cadence"),
    "cockpit_full_every_50": (with_cockpit("full", COCKPIT_INTERVAL), "cadence"),
    "cockpit_economy": (with_cockpit("economy", 1), "cockpit"),
    "cockpit_business": (with_cockpit("business", 1), "cockpit"),
    "cockpit_full": (with_cockpit("full", 1), "cockpit"),
}

WHAT = {
    "bare": "no monitoring",
    "bpkit_default": "GradientProbe(model): norms, max every step, read back every 50 (histograms at the 1st log step)",
    "bpkit_all_every_step": "norms, max, weight norms, update ratios, histograms, all read back every step",
    "bpkit_all_every_step_sampled": "the same, histograms over 4096 samples per tensor",
    "cockpit_economy_every_50": "economy (9 quantities), tracked at step 49 (and Alpha's end point, 50)",
    "cockpit_business_every_50": "business (economy + TICDiag, HessTrace), tracked at 49/50",
    "cockpit_full_every_50": "full (business + HessMaxEV, GradHist2d), tracked at 49/50",
    "cockpit_economy": "economy, every step",
    "cockpit_business": "business, every step",
    "cockpit_full": "full, every step",
}


def run_once(name: str, batches: list, warmup: int, steps: int) -> tuple[float, int]:
    """Mean ms per timed step and the number of log/track events in the timed window."""
    make, _ = CONFIGS[name]
    model, step, counter = make()
    model.train()
    for s in range(warmup):
        x, y = batches[s % len(batches)]
        step(s, x, y)
    start = time.perf_counter()
    for s in range(warmup, warmup + steps):
        x, y = batches[s % len(batches)]
        step(s, x, y)
    elapsed = time.perf_counter() - start
    return 1e3 * elapsed / steps, counter(warmup, warmup + steps - 1)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    global SMOKE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, among: " + ", ".join(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps of the rows at a cadence")
    parser.add_argument("--steps", type=int, default=50, help="timed steps of the rows at a cadence")
    parser.add_argument("--cockpit-warmup", type=int, default=1, help="warm-up steps of Cockpit at every step")
    parser.add_argument("--cockpit-steps", type=int, default=2, help="timed steps of Cockpit at every step")
    parser.add_argument("--smoke", action="store_true", help="a width-64 MLP, 1 repeat, few steps")
    parser.add_argument("--per-quantity", action="store_true",
                        help="instead: each quantity of Cockpit's full configuration alone, every step, against bare")
    parser.add_argument("--out", default=None, help="also write the markdown block to this file")
    args = parser.parse_args()
    SMOKE = args.smoke
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if args.per_quantity:
        from cockpit.utils.configuration import quantities_cls_for_configuration
        names = ["bare"]
        for cls in quantities_cls_for_configuration("full"):
            CONFIGS[cls.__name__] = (with_cockpit("full", 1, cls), "cockpit")
            WHAT[cls.__name__] = f"Cockpit's {cls.__name__} alone, every step"
            names.append(cls.__name__)
    for n in names:
        if n not in CONFIGS:
            sys.exit(f"unknown configuration {n!r}; choose among: {', '.join(CONFIGS)}")
    if SMOKE:
        args.repeats, args.steps, args.cockpit_steps = 1, 50, 2

    torch.set_num_threads(1)
    batches = make_batches(8, 64)
    model = make_model(SMOKE)
    n_params, n_tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    versions = (f"torch {torch.__version__}, Python {platform.python_version()}, "
                f"cockpit-for-pytorch {importlib.metadata.version('cockpit-for-pytorch')}, "
                f"backpack-for-pytorch {importlib.metadata.version('backpack-for-pytorch')}, "
                f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread")
    load_start = uptime()
    print(versions, flush=True)
    print(f"start: {load_start}", flush=True)
    print(f"model: MLP(64, 10, depth=10, width={64 if SMOKE else 512}), {n_params:,} parameters in {n_tensors} "
          f"tensors, batch 64, Adam lr 1e-3", flush=True)

    times: dict[str, list[float]] = {n: [] for n in names}
    events: dict[str, int] = {}
    wall = time.perf_counter()
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            cadence = CONFIGS[n][1] == "cadence"
            warmup = args.warmup if cadence else args.cockpit_warmup
            steps = args.steps if cadence else args.cockpit_steps
            ms, ev = run_once(n, batches, warmup, steps)
            times[n].append(ms)
            events[n] = ev
            print(f"  repeat {r + 1}/{args.repeats} {n:30s} {ms:10.1f} ms/step  ({ev} log/track steps in the "
                  f"{steps} timed)", flush=True)
    wall = time.perf_counter() - wall
    load_end = uptime()
    print(f"end: {load_end}  ({wall:.0f} s)", flush=True)

    med = {n: statistics.median(v) for n, v in times.items()}
    base = med.get("bare")
    lines = ["| configuration | what it computes | timed steps x repeats | ms/step (median) | x bare | "
             "log/track steps in the window | per repeat (ms/step) |",
             "|---|---|---|---|---|---|---|"]
    for n in names:
        cadence = CONFIGS[n][1] == "cadence"
        steps = args.steps if cadence else args.cockpit_steps
        ratio = f"{med[n] / base:.2f}x" if base else "-"
        per = ", ".join(f"{v:.1f}" for v in times[n])
        lines.append(f"| `{n}` | {WHAT[n]} | {steps} x {args.repeats} | {med[n]:.1f} | {ratio} | {events[n]} | {per} |")
    table = "\n".join(lines)
    command = "PYTHONPATH=/tmp/cockpit_env python benchmarks/cockpit_anchor.py " + " ".join(sys.argv[1:])
    block = (f"{datetime.date.today().isoformat()}, `{command.strip()}`\n\n{versions}; model {n_params:,} parameters "
             f"in {n_tensors} tensors, batch 64.\nLoad at start: `{load_start}`; at end: `{load_end}`; "
             f"{wall:.0f} s in all.\n\n{table}\n")
    print()
    print(block)
    if args.out:
        with open(args.out, "w") as f:
            f.write(block)


if __name__ == "__main__":
    main()
