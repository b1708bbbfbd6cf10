"""The critical-batch recipe, lighter: steps to a target accuracy against batch size on digits, fitted to
McCandlish et al.'s S = S_min (1 + B_noise / B), with B_noise compared to NoiseScaleMonitor's measured B_simple.

Every run is a real Lightning Trainer (BackpropTask, the recipe's MLP, SGD): a small callback evaluates the
validation accuracy every ``--check-every`` steps directly on the 270 validation images (no validation loop) and
stops at the target; S(B) is the fewest steps over the learning-rate grid (the paper's S assumes the best learning
rate at each batch size), the median over seeds. NoiseScaleMonitor (split source, every 5 steps) runs in every job;
B_simple is read when the run reaches the target, the median over the best-lr jobs.

    python benchmarks/critical_batch.py                 # ~3-5 min on a 2-core CPU
    python benchmarks/critical_batch.py --smoke         # seconds
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from bpkit.callbacks import NoiseScaleMonitor  # noqa: E402
from bpkit.data import DigitsDataModule  # noqa: E402
from bpkit.models import MLP  # noqa: E402
from bpkit.stats.noise_scale import critical_batch_sentence, fit_steps_vs_batch  # noqa: E402
from bpkit.task import BackpropTask  # noqa: E402


class StopAtTarget(pl.Callback):
    """Validation accuracy every ``every`` optimizer steps on fixed tensors; stop at ``target``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, target: float, every: int) -> None:
        self.x, self.y, self.target, self.every = x, y, target, every
        self.reached: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every or self.reached is not None:
            return
        was = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            acc = (pl_module(self.x).argmax(1) == self.y).float().mean().item()
        pl_module.train(was)
        if acc >= self.target:
            self.reached = step
            trainer.should_stop = True


def run(batch: int, lr: float, seed: int, args, val) -> tuple[float, float | None]:
    pl.seed_everything(seed, verbose=False)
    model = MLP(64, 10, depth=2, width=64)
    task = BackpropTask(model, "cross_entropy", functools.partial(torch.optim.SGD, lr=lr), num_classes=10)
    stop = StopAtTarget(*val, target=args.target, every=args.check_every)
    monitor = NoiseScaleMonitor(source="split", every_n_steps=5, log_every_n_steps=5, ema=0.8)
    trainer = pl.Trainer(max_steps=args.max_steps, max_epochs=10_000, callbacks=[monitor, stop], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=5)
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=batch, seed=seed))
    steps = float(stop.reached) if stop.reached is not None else math.inf
    return steps, monitor.last.get("noise/b_simple")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="8,16,32,64,128,256")
    ap.add_argument("--lrs", default="0.1,0.3,1.0")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--check-every", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--smoke", action="store_true", help="two batch sizes, one lr, one seed, a low target")
    args = ap.parse_args()
    if args.smoke:
        args.batches, args.lrs, args.seeds, args.target, args.max_steps = "16,64", "0.3", "0", 0.5, 200
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    val = dm.split("val").tensors
    start = time.time()
    rows = []
    for b in batches:
        per_lr = {}
        for lr in lrs:
            results = [run(b, lr, s, args, val) for s in seeds]
            per_lr[lr] = (statistics.median(r[0] for r in results), [r[1] for r in results if r[1] is not None])
        best = min(per_lr, key=lambda lr: per_lr[lr][0])
        rows.append((b, per_lr, best))
    elapsed = time.time() - start

    print(f"# critical batch on digits (MLP 64-64-10, SGD, target val acc {args.target:.2f}, "
          f"check every {args.check_every} steps, seeds {seeds})")
    print(f"torch {torch.__version__}, lightning {pl.__version__}, {platform.machine()}, 1 thread, "
          f"{time.strftime('%Y-%m-%d')}, {elapsed:.0f} s\n")
    print("| batch B | " + " | ".join(f"steps at lr {lr:g}" for lr in lrs) + " | S(B) (best lr) | B x S (samples) "
          "| B_simple at target (best lr) |")
    print("|---|" + "---|" * len(lrs) + "---|---|---|")
    fit_b, fit_s, b_simples = [], [], []
    for b, per_lr, best in rows:
        s, bs = per_lr[best]
        cells = " | ".join("-" if math.isinf(per_lr[lr][0]) else f"{per_lr[lr][0]:.0f}" for lr in lrs)
        bsimple = statistics.median(bs) if bs else float("nan")
        print(f"| {b} | {cells} | {s:.0f} (lr {best:g}) | {b * s:.0f} | {bsimple:.0f} |")
        if math.isfinite(s):
            fit_b.append(b)
            fit_s.append(s)
        b_simples += bs
    if len(set(fit_b)) >= 2:
        s_min, b_noise = fit_steps_vs_batch(fit_b, fit_s)
        measured = statistics.median(b_simples) if b_simples else float("nan")
        print(f"\nfit S = S_min (1 + B_noise / B): S_min = {s_min:.1f} steps, B_noise = {b_noise:.1f}; "
              f"E_min = S_min x B_noise = {s_min * b_noise:.0f} samples")
        print("| B | S measured | S fitted | fitted / measured |")
        print("|---|---|---|---|")
        for b, s in zip(fit_b, fit_s):
            pred = s_min * (1 + b_noise / b)
            print(f"| {b} | {s:.0f} | {pred:.0f} | {pred / s:.2f} |")
        ratio = b_noise / measured if measured == measured and measured > 0 else float("nan")
        print(f"\nmeasured B_simple (median at the target, best-lr runs) = {measured:.1f}; "
              f"B_noise / B_simple = {ratio:.2f}")
        print("report sentence at batch 64: " + critical_batch_sentence(64, measured))


if __name__ == "__main__":
    main()
