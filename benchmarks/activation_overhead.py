"""Step-time overhead of ActivationMonitor vs a bare run, on small CPU models from bpkit.models.

For each model (MLP, residual CNN, LSTM) and each setting (bare; monitor at the default cadence of 50
steps; monitor every step; every step with histograms of a strided sample of 4096 elements per output
(``histogram_samples=4096``); monitor every step with gradients), a real Lightning Trainer runs
``--steps`` optimizer steps; the time per step is the wall time from the first timed step to the last
(after ``--warmup`` steps) divided by the step count, so log steps are included at their real share.
Settings are interleaved inside each repeat (a noisy shared machine drifts), and the median over
``--repeats`` is reported with its ratio to the bare run.

Usage::

    python benchmarks/activation_overhead.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/activation_overhead.py --smoke    # seconds: checks that everything runs
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings

import lightning
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bpkit.callbacks import ActivationMonitor
from bpkit.models import MLP, RNN, ResNet


class Lit(LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        out = out[0] if isinstance(out, tuple) else out
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class StepTimer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if self.start is not None:
            self.end = time.perf_counter()
            self.steps += 1

    @property
    def per_step(self) -> float:
        return (self.end - self.start) / self.steps


MODELS = {
    "MLP 8x256": (lambda: MLP(64, 10, depth=8, width=256), lambda n: torch.randn(n, 64)),
    "ResNet 4 blocks, w16": (lambda: ResNet(1, 10, depth=4, width=16), lambda n: torch.randn(n, 1, 8, 8)),
    "LSTM 128, T=32": (lambda: RNN("lstm", input_size=8, hidden_size=128, out_features=10),
                       lambda n: torch.randn(n, 32, 8)),
}
SETTINGS = {
    "bare": None,
    "default cadence (50)": dict(log_every_n_steps=50),
    "every step": dict(log_every_n_steps=1),
    "every step, sampled histograms": dict(log_every_n_steps=1, histogram_samples=4096),
    "every step + gradients": dict(log_every_n_steps=1, gradients=True),
}


def run(model: str, setting: str, steps: int, warmup: int, batch: int, root: str) -> tuple[float, int]:
    torch.manual_seed(0)
    make_net, make_x = MODELS[model]
    x = make_x(batch * 8)
    data = DataLoader(TensorDataset(x, torch.randint(0, 10, (len(x),))), batch_size=batch, shuffle=True)
    timer = StepTimer(warmup)
    callbacks: list[Callback] = [timer]
    monitor = None
    if SETTINGS[setting] is not None:
        monitor = ActivationMonitor(**SETTINGS[setting])
        callbacks.insert(0, monitor)
    trainer = Trainer(accelerator="cpu", max_steps=steps + warmup, callbacks=callbacks, logger=False,
                      default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, log_every_n_steps=50)
    trainer.fit(Lit(make_net()), data)
    return timer.per_step, len(monitor.probe.names) if monitor else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: less noise)")
    parser.add_argument("--smoke", action="store_true", help="a few steps, one repeat: checks that it runs")
    parser.add_argument("--models", nargs="*", default=None,
                        help="model name prefixes (default: all), e.g. --models MLP LSTM")
    parser.add_argument("--settings", nargs="*", default=None,
                        help='settings by name (default: all; bare is always run), e.g. --settings "every step"')
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.repeats, args.batch = 6, 2, 1, 16
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    machine = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, lightning {lightning.__version__}, {machine}, {torch.get_num_threads()} "
          f"thread(s); {args.steps} steps x {args.repeats} repeats, batch {args.batch}")
    print()
    print("| model | modules | setting | ms/step (median) | x bare (median of paired ratios) "
          "| x bare from every-step cost / 50 |")
    print("|---|---|---|---|---|---|")
    models = [m for m in MODELS if args.models is None or any(m.startswith(p) for p in args.models)]
    settings = ["bare"] + [s for s in SETTINGS if s != "bare" and (args.settings is None or s in args.settings)]
    with tempfile.TemporaryDirectory() as root:
        for model in models:
            times: dict[str, list[float]] = {s: [] for s in settings}
            count = 0
            for _ in range(args.repeats):
                for setting in settings:
                    t, n = run(model, setting, args.steps, args.warmup, args.batch, root)
                    times[setting].append(t)
                    count = max(count, n)
            bare = statistics.median(times["bare"])
            every = statistics.median(times["every step"]) if "every step" in times else bare
            for setting, ts in times.items():
                med = statistics.median(ts)
                # paired: each repeat's ratio to the bare run of the same repeat, then the median
                ratio = statistics.median(t / b for t, b in zip(ts, times["bare"]))
                extra = ""
                if setting == "default cadence (50)":
                    # the cost of one log step spread over 50 steps: less noisy than the direct ratio
                    extra = f"{1 + (every - bare) / bare / 50:.3f}"
                print(f"| {model} | {count} | {setting} | {1e3 * med:.2f} | {ratio:.3f} | {extra} |", flush=True)


if __name__ == "__main__":
    main()
