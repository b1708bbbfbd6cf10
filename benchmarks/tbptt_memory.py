"""Truncated BPTT: peak activation memory vs sequence length, and throughput vs a hand-written loop.

1. Memory: the bytes autograd keeps for backward (saved tensors, counted with
   ``torch.autograd.graph.saved_tensors_hooks``; on CUDA also ``torch.cuda.max_memory_allocated``) at their
   peak during one training batch, for full BPTT and for ``TBPTTModule`` with a fixed ``k``, as the sequence
   length T grows. Full BPTT grows linearly in T; truncated BPTT stays flat.
2. Throughput: sequences per second of a minimal ``TBPTTModule`` subclass against the same model trained by a
   hand-written manual-optimization loop (Lightning 2.x docs recipe, done right: chunks of k steps,
   ``manual_backward``, ``step``, ``zero_grad``, detach), both in a real Trainer, interleaved trials, median.

Usage::

    python benchmarks/tbptt_memory.py            # full run (CPU: a few minutes)
    python benchmarks/tbptt_memory.py --smoke    # seconds: a check that it runs
    python benchmarks/tbptt_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref

import lightning.pytorch as pl
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from bpkit.tbptt import TBPTTModule


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedBytes:
    """Peak bytes of tensors saved for backward that are alive at the same time."""

    def __init__(self) -> None:
        self.alive = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor):
        size = t.numel() * t.element_size()
        self.alive += size
        self.peak = max(self.peak, self.alive)
        holder = _Held(t)
        weakref.finalize(holder, self._free, size)  # runs when autograd drops the saved tensor
        return holder

    def _free(self, size: int) -> None:
        self.alive -= size

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda holder: holder.tensor)


def make_net(hidden: int, layers: int) -> torch.nn.Module:
    from bpkit.models import RNN

    return RNN("lstm", input_size=8, hidden_size=hidden, num_layers=layers, out_features=8, output="all")


class Tbptt(TBPTTModule):
    """What a user writes: the 1.x contract."""

    def __init__(self, net, k, counter=None):
        super().__init__()
        self.net, self.counter = net, counter
        self.truncated_bptt_steps = k
        self.tbptt_log_loss = False

    def training_step(self, batch, batch_idx, hiddens):
        x, y = batch
        out, hiddens = self.net(x, hiddens)
        loss = F.mse_loss(out, y)
        self.log("train/loss", loss)
        return {"loss": loss, "hiddens": hiddens}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)


class HandWritten(pl.LightningModule):
    """The same training written by hand with manual optimization."""

    def __init__(self, net, k):
        super().__init__()
        self.net, self.k = net, k
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        hiddens = None
        for xc, yc in zip(x.split(self.k, 1), y.split(self.k, 1)):
            out, hiddens = self.net(xc, hiddens)
            loss = F.mse_loss(out, yc)
            self.log("train/loss", loss)
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()
            hiddens = tuple(h.detach() for h in hiddens)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)


def trainer(device: str, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kwargs)


def data(n: int, t: int, batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, t, 8, generator=g)
    return DataLoader(TensorDataset(x, x.roll(1, 1)), batch_size=batch)


def peak_memory(device: str, t: int, k: int | None, hidden: int, layers: int, batch: int) -> tuple[int, int]:
    counter = SavedBytes()
    module = Tbptt(make_net(hidden, layers), k)
    fit = trainer(device, max_steps=-1, max_epochs=1, limit_train_batches=1)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with counter.hooks():
        fit.fit(module, data(batch, t, batch))
    cuda_peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return counter.peak, cuda_peak


class Clock(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seconds, self.batches = warmup, None, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.batches += 1

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def throughput(device: str, kind: str, t: int, k: int, hidden: int, layers: int, batch: int, batches: int) -> float:
    torch.manual_seed(0)
    net = make_net(hidden, layers)
    module = Tbptt(net, k) if kind == "tbptt" else HandWritten(net, k)
    clock = Clock(warmup=2)
    trainer(device, max_epochs=1, callbacks=[clock]).fit(module, data(batch * (batches + 2), t, batch))
    return clock.batches * batch / clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared machine)")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.smoke:
        lengths, k, hidden, layers, batch, batches, trials = (40, 80), 10, 16, 1, 4, 3, 1
        speed_t = 40
    else:
        lengths, k, hidden, layers, batch, batches = (250, 500, 1000, 2000, 4000), 50, 128, 2, 16, 8
        trials = args.trials
        speed_t = 1000

    print(f"## Peak memory for one batch (LSTM {layers}x{hidden}, batch {batch}, k={k}; saved-for-backward bytes)")
    cuda = args.device == "cuda"
    print("| T | full BPTT (MiB) | TBPTT k (MiB) | ratio |" + (" CUDA full / TBPTT (MiB) |" if cuda else ""))
    print("|---|---|---|---|" + ("---|" if args.device == "cuda" else ""))
    for t in lengths:
        full, full_cuda = peak_memory(args.device, t, None, hidden, layers, batch)
        trunc, trunc_cuda = peak_memory(args.device, t, k, hidden, layers, batch)
        row = f"| {t} | {full / 2**20:.2f} | {trunc / 2**20:.3f} | {full / trunc:.1f}x |"
        if args.device == "cuda":
            row += f" {full_cuda / 2**20:.1f} / {trunc_cuda / 2**20:.1f} |"
        print(row, flush=True)

    print(f"\n## Throughput (T={speed_t}, k={k}, LSTM {layers}x{hidden}, batch {batch}; sequences/s, "
          f"median of {trials} interleaved trials)")
    results: dict[str, list[float]] = {"tbptt": [], "hand": []}
    for _ in range(trials):
        for kind in ("hand", "tbptt"):
            results[kind].append(throughput(args.device, kind, speed_t, k, hidden, layers, batch, batches))
    hand, ours = statistics.median(results["hand"]), statistics.median(results["tbptt"])
    print("| loop | sequences/s | trials |")
    print("|---|---|---|")
    print(f"| hand-written manual optimization | {hand:.1f} | {', '.join(f'{v:.1f}' for v in results['hand'])} |")
    print(f"| TBPTTModule | {ours:.1f} | {', '.join(f'{v:.1f}' for v in results['tbptt'])} |")
    print(f"\nTBPTTModule / hand-written: {ours / hand:.3f}")


if __name__ == "__main__":
    main()
