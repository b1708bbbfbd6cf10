"""Step-time overhead of TemporalGradientMonitor vs a bare run, on the RNNs of the recipes.

For each model (the recipes' LSTM, GRU and tanh RNN on the adding problem, and an LSTM trained with truncated BPTT)
and each setting (bare; the monitor at Lightning's default cadence of 50 steps; at bpkit-train's cadence of 10;
every step), a real Lightning Trainer runs ``--steps`` optimizer steps in this one process; the time per step is the
wall time from the first timed step to the last (after ``--warmup`` steps) divided by the step count, so log steps
are included at their real share. Settings are interleaved inside each repeat (a noisy shared machine drifts) and the
median over ``--repeats`` is reported with the median of the paired ratios to the bare run of the same repeat. The
direct ratio at a cadence of 50 is within the noise of a shared machine, so the table also gives the cost of a
measured step spread over 50 (and 10) steps: ``1 + (every - bare) / bare / n``. The ``time/grad/<m>`` image (made
only with a W&B or TensorBoard logger) is timed on its own (plot + PNG) and given per log step.

Usage::

    python benchmarks/temporal_overhead.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/temporal_overhead.py --smoke    # seconds: checks that everything runs
"""

from __future__ import annotations

import argparse
import logging
import os
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

from bpkit.callbacks import TemporalGradientMonitor
from bpkit.data.synthetic import AddingDataModule
from bpkit.models import RNN
from bpkit.tbptt import TBPTTModule


class Lit(LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x)[0], y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class LitTBPTT(TBPTTModule):
    """The long_range recipe's truncated BPTT: chunks of k1=10 steps, the sequence target on the last chunk, k2=T."""

    def __init__(self, net: nn.Module, k1: int, k2: int) -> None:
        super().__init__()
        self.net, self.truncated_bptt_steps, self.tbptt_backprop_steps = net, k1, k2
        self.tbptt_log_loss = False

    def training_step(self, batch, batch_idx, hiddens):
        x, y = batch
        out, hiddens = self.net(x, hiddens)
        last = self.tbptt_split_idx == self.tbptt_num_splits - 1
        return {"loss": nn.functional.mse_loss(out, y) if last else None, "hiddens": hiddens}

    def tbptt_split_batch(self, batch, split_size):
        x, y = batch
        return [(xs, y) for xs in x.split(split_size, dim=1)]

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class StepTimer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, *args):
        if self.start is None and trainer.fit_loop.epoch_loop._batches_that_stepped == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if self.start is not None:
            self.end = time.perf_counter()
            self.steps += 1

    @property
    def per_step(self) -> float:
        return (self.end - self.start) / self.steps


MODELS = {  # name: (module factory, sequence length)
    "forget_gate_bias: LSTM 64, T=40": (lambda: Lit(RNN("lstm", input_size=2, hidden_size=64, forget_bias=1.0)), 40),
    "spectral_radius: tanh RNN 64, T=40": (lambda: Lit(RNN("rnn_tanh", input_size=2, hidden_size=64,
                                                           recurrent_scale=1.0)), 40),
    "long_range: GRU 64, T=40": (lambda: Lit(RNN("gru", input_size=2, hidden_size=64)), 40),
    "long_range (TBPTT k1=10, k2=40): LSTM 64": (lambda: LitTBPTT(RNN("lstm", input_size=2, hidden_size=64), 10, 40),
                                                 40),
}
SETTINGS = {"bare": None, "cadence 50 (Lightning default)": 50, "cadence 10 (bpkit-train)": 10, "every step": 1}


def run(model: str, setting: str, steps: int, warmup: int, batch: int, root: str) -> float:
    torch.manual_seed(0)
    make, seq_len = MODELS[model]
    x, y, _ = AddingDataModule(seq_len=seq_len).make(torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(x[:batch * 16], y[:batch * 16]), batch_size=batch, shuffle=True)
    timer = StepTimer(warmup)
    callbacks: list[Callback] = [timer]
    every = SETTINGS[setting]
    if every is not None:
        callbacks.insert(0, TemporalGradientMonitor(log_every_n_steps=every))
    trainer = Trainer(accelerator="cpu", max_steps=steps + warmup, callbacks=callbacks, logger=False,
                      default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, log_every_n_steps=50)
    trainer.fit(make(), data)
    return timer.per_step


def image_ms(root: str, repeats: int = 5) -> float:
    """One ``time/grad/<m>`` image: the plot and its PNG (what a log step adds with a W&B/TensorBoard logger)."""
    import numpy as np

    from bpkit.probe.temporal import TemporalProfile, plot_profile

    profile = TemporalProfile(np.geomspace(1.0, 1e-4, 40), 1.0, 10, None)
    plot_profile(profile, "warm", 0).savefig(os.path.join(root, "warm.png"))  # imports matplotlib
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        plot_profile(profile, "model.rnn", i).savefig(os.path.join(root, f"p{i}.png"))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: less noise)")
    parser.add_argument("--smoke", action="store_true", help="a few steps, one repeat: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.repeats, args.batch = 6, 2, 1, 16
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    machine = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, lightning {lightning.__version__}, {machine}, {torch.get_num_threads()} "
          f"thread(s); {args.steps} steps x {args.repeats} repeats, batch {args.batch}")
    print()
    print("| model | setting | ms/step (median) | x bare (median of paired ratios) | x bare from every-step cost / n |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for model in MODELS:
            times: dict[str, list[float]] = {s: [] for s in SETTINGS}
            for _ in range(args.repeats):
                for setting in SETTINGS:
                    times[setting].append(run(model, setting, args.steps, args.warmup, args.batch, root))
            bare = statistics.median(times["bare"])
            every = statistics.median(times["every step"])
            for setting, ts in times.items():
                ratio = statistics.median(t / b for t, b in zip(ts, times["bare"]))
                n = SETTINGS[setting]
                extra = f"{1 + (every - bare) / bare / n:.4f}" if n and n > 1 else ""
                print(f"| {model} | {setting} | {1e3 * statistics.median(ts):.2f} | {ratio:.3f} | {extra} |",
                      flush=True)
        print()
        print(f"time/grad/<m> image (plot + PNG), per module per log step with a W&B/TensorBoard logger: "
              f"{image_ms(root, 2 if args.smoke else 7):.1f} ms")


if __name__ == "__main__":
    main()
