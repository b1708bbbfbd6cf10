"""What NoiseScaleMonitor costs at its default cadence, side by side in one process with the bare run.

Configurations, interleaved in a rotated order within each repeat (medians over repeats; the machine is shared, so a
single timing moves by 10-30%):

- ``bare``: no callback; ``split``: NoiseScaleMonitor with the default source and cadence (the split batch's extra
  forward/backward on the log steps, Trainer ``log_every_n_steps=50``);
- ``bare_acc2`` / ``accumulation``: the same with ``accumulate_grad_batches=2`` (the monitor takes its two batch
  sizes from the micro-batches: two fused norms per optimizer step, no extra pass);
- ``split_every_step``: the split batch on every step (not a default: the ceiling of the split method).

Also reported: the time inside the monitor's hooks per step over the bare step (``1 + hooks/bare``), measured directly
by wrapping the hooks, which does not suffer the noise of a difference of two step times.

    python benchmarks/noise_scale_cost.py            # ~2 min on a 2-core CPU
    python benchmarks/noise_scale_cost.py --smoke
"""

from __future__ import annotations

import argparse
import functools
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
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from bpkit.callbacks import NoiseScaleMonitor  # noqa: E402
from bpkit.models import MLP  # noqa: E402
from bpkit.task import BackpropTask  # noqa: E402

MODELS = {  # name: (in, out, depth, width, batch)
    "mlp_digits": (64, 10, 2, 64, 64),  # the critical_batch recipe's model and batch
    "mlp_wide": (256, 10, 4, 512, 128),
}
HOOKS = ("on_train_batch_start", "on_after_backward", "on_before_optimizer_step", "on_train_batch_end")


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._t = warmup, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self._t is None:
            self._t = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if self._t is not None:
            self.times.append((time.perf_counter() - self._t) / (trainer.global_step - self.warmup))


def timed_hooks(monitor: NoiseScaleMonitor) -> list[float]:
    spent = [0.0]
    for name in HOOKS:
        original = getattr(monitor, name)

        def wrapper(*args, _original=original, **kwargs):
            t = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t
        setattr(monitor, name, wrapper)
    return spent


def run(model_name: str, config: str, steps: int, warmup: int) -> tuple[float, float | None]:
    n_in, n_out, depth, width, batch = MODELS[model_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch * 16, n_in, generator=gen)
    y = torch.randint(0, n_out, (batch * 16,), generator=gen)
    accumulate = 2 if config in ("bare_acc2", "accumulation") else 1
    loader = DataLoader(TensorDataset(x, y), batch_size=batch // accumulate, shuffle=True, generator=gen)
    pl.seed_everything(0, verbose=False)
    task = BackpropTask(MLP(n_in, n_out, depth=depth, width=width), "cross_entropy",
                        functools.partial(torch.optim.SGD, lr=0.01), num_classes=n_out)
    timer = StepTimer(warmup)
    callbacks: list[pl.Callback] = [timer]
    spent = None
    if config in ("split", "accumulation", "split_every_step"):
        monitor = NoiseScaleMonitor(every_n_steps=1 if config == "split_every_step" else None)
        spent = timed_hooks(monitor)
        callbacks.insert(0, monitor)
    trainer = pl.Trainer(max_steps=warmup + steps, max_epochs=10_000, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         log_every_n_steps=50, accumulate_grad_batches=accumulate)
    trainer.fit(task, train_dataloaders=loader)
    return timer.times[-1], (spent[0] / (warmup + steps) if spent is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.steps, args.warmup, args.repeats = "mlp_digits", 50, 5, 1
    torch.set_num_threads(1)
    configs = ["bare", "split", "split_every_step", "bare_acc2", "accumulation"]
    print(f"# NoiseScaleMonitor cost (log_every_n_steps=50, {args.steps} timed steps after {args.warmup}, "
          f"median of {args.repeats} interleaved repeats)")
    print(f"torch {torch.__version__}, lightning {pl.__version__}, {platform.machine()}, 1 thread, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| model | config | ms/step | x bare | ms/step in the monitor's hooks | 1 + hooks/bare |")
    print("|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        times: dict[str, list[float]] = {c: [] for c in configs}
        hooks: dict[str, list[float]] = {c: [] for c in configs}
        for r in range(args.repeats):
            for c in configs[r % len(configs):] + configs[:r % len(configs)]:
                t, h = run(model_name, c, args.steps, args.warmup)
                times[c].append(t)
                if h is not None:
                    hooks[c].append(h)
        for c in configs:
            base = "bare_acc2" if c in ("bare_acc2", "accumulation") else "bare"
            t, b = statistics.median(times[c]), statistics.median(times[base])
            h = statistics.median(hooks[c]) if hooks[c] else None
            hcell = "-" if h is None else f"{1e3 * h:.3f}"
            rcell = "-" if h is None else f"{1 + h / b:.3f}x"
            print(f"| {model_name} | {c} | {1e3 * t:.2f} | {t / b:.2f}x | {hcell} | {rcell} |")


if __name__ == "__main__":
    main()
