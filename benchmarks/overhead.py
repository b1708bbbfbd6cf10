"""Step-time overhead of gradient monitoring, against a bare run, on small reference models.

Compares named configurations (a dict, so later issues can add their callbacks) on a small MLP,
a residual CNN and an LSTM from ``bpkit.models``, trained by a real Lightning Trainer on
in-memory random data:

- ``bare``: no monitoring;
- ``lightning_clip``: no monitoring, ``Trainer(gradient_clip_val=1.0)``: the clipping that bpkit's
  default set (which clips too) replaces;
- ``lightning_grad_norm``: Lightning's documented recipe, ``self.log_dict(grad_norm(module, 2))``
  in ``on_before_optimizer_step``, every step;
- ``wandb_watch_all``: ``wandb.watch(model, log="all", log_freq=50)`` in an offline run (and ``_f1``:
  log_freq=1);
- ``gradient_monitor``: ``GradientMonitor()`` at the default cadence (every 50 steps, skip on NaN);
- ``gradient_monitor_every_step``: ``GradientMonitor(log_every_n_steps=1)``;
- ``gradient_monitor_all_every_step``: ``GradientMonitor(log_every_n_steps=1, histogram_every_n_steps=1)``: every
  statistic (norms, max, weight norms, update ratios, histograms) at every step; ``_ref``: the same with the
  histograms on the reference (log10) path for that run, to compare the two binnings in one process; ``_sampled``:
  the same with ``histogram_samples=4096`` (histograms over a strided sample of each tensor, estimated counts);
- ``bpkit_default``: GradientMonitor + ActivationMonitor + GradientClipping("norm") at the default cadence;
- ``bpkit_full``: the same three with every statistic read back and logged at every step.

``--device cuda --sizes gpu`` uses design.md's reference sizes, as near as bpkit's models build them
(MLP 31.5M params / 20 tensors for design.md's 35M / 20; residual CNN 1.8M / 59 for 2.4M / 52; LSTM
9.5M / 10 for 12.7M / 10) with the data on the GPU, and counts host
syncs per step with ``torch.cuda.set_sync_debug_mode("warn")``; on the CPU it counts host reads.
Aten ops per step added by a configuration are counted with a ``TorchDispatchMode`` over the whole
training step, minus the bare run's. ``--scaling`` prints ops per step against the number of
parameter tensors (10/50/200-layer MLPs).

Time per step is the mean over the steps after warm-up (logging steps included, so the cost of a
log interval is amortised), taken as the median over repeats; configurations are interleaved in
each repeat (in a rotated order) so that load from other processes hits them alike. The machine's copy bandwidth
(a large float32 ``copy_``, bytes read plus written) is printed for the cost model (bytes per step / bandwidth). Host reads per step (``item``,
``tolist``, ``cpu``, ``numpy``, ``bool``/``float``/``int`` of a tensor, from any caller) are
counted in a separate short run.

Usage::

    python benchmarks/overhead.py            # a few minutes on a 2-core CPU
    python benchmarks/overhead.py --smoke    # seconds
    python benchmarks/overhead.py --configs bare,gradient_monitor --models mlp --steps 100
    python benchmarks/overhead.py --device cuda --sizes gpu    # on a GPU (benchmarks/gpu_check.sh)
    python benchmarks/overhead.py --scaling                    # ops per step vs number of tensors
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bpkit.callbacks import ActivationMonitor, GradientClipping, GradientMonitor  # noqa: E402
from bpkit.models import MLP, RNN, ResNet  # noqa: E402

warnings.filterwarnings("ignore")
for _name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)


# ----------------------------------------------------------------- models and data

SIZES = "cpu"  # set from --sizes


def make_model(name: str, smoke: bool) -> tuple[nn.Module, Callable[[int], tuple[torch.Tensor, torch.Tensor]], str]:
    """A model, a batch maker and the loss name."""
    g = torch.Generator().manual_seed(0)
    if SIZES == "gpu" and not smoke:  # design.md's reference models
        if name == "mlp":  # 10 Linear layers: 20 tensors, 31.5M parameters
            return (MLP(1024, 10, depth=10, width=1920),
                    lambda n: (torch.rand(n, 1024, generator=g), torch.randint(0, 10, (n,), generator=g)), "ce")
        if name == "resnet":  # 59 tensors, 1.8M parameters
            return (ResNet(3, 10, depth=8, width=48, stages=3),
                    lambda n: (torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)), "ce")
        if name == "lstm":  # 2 layers: 10 tensors, 9.5M parameters; T=100 on a GPU, 20 on a CPU
            steps = 100 if DEVICE == "cuda" else 20
            return (RNN("lstm", input_size=64, hidden_size=880, num_layers=2, out_features=10),
                    lambda n: (torch.rand(n, steps, 64, generator=g), torch.rand(n, 10, generator=g)), "mse")
    if name == "mlp":  # 20 tensors like design.md's MLP, scaled down for a CPU
        width = 64 if smoke else 512
        return (MLP(64, 10, depth=10, width=width),
                lambda n: (torch.rand(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)), "ce")
    if name == "mlp_tiny":  # the default job's model: fixed costs show most here
        return (MLP(64, 10, depth=3, width=128),
                lambda n: (torch.rand(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)), "ce")
    if name == "resnet":
        return (ResNet(1, 10, depth=2 if smoke else 8, width=8 if smoke else 32, stages=2),
                lambda n: (torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)), "ce")
    if name == "lstm":
        hidden = 16 if smoke else 256
        return (RNN("lstm", input_size=2, hidden_size=hidden, num_layers=2, out_features=1),
                lambda n: (torch.rand(n, 10 if smoke else 50, 2, generator=g), torch.rand(n, 1, generator=g)), "mse")
    if name.startswith("mlp_depth"):  # --scaling: width 32, depth from the name
        return (MLP(32, 10, depth=int(name[len("mlp_depth"):]), width=32),
                lambda n: (torch.rand(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g)), "ce")
    raise ValueError(f"unknown model {name!r}")


class Task(pl.LightningModule):
    def __init__(self, model: nn.Module, batches: list, loss: str) -> None:
        super().__init__()
        self.model, self.batches, self.loss = model, batches, loss

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.model(x)
        out = out[0] if isinstance(out, tuple) else out
        return nn.functional.cross_entropy(out, y) if self.loss == "ce" else nn.functional.mse_loss(out, y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)


# ----------------------------------------------------------------- configurations

class LightningGradNorm(pl.Callback):
    """Lightning's documented way to track gradient norms, every step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pl_module.log_dict(grad_norm(pl_module, norm_type=2))


class WandbWatch(pl.Callback):
    def __init__(self, log_freq: int) -> None:
        self.log_freq = log_freq

    def on_fit_start(self, trainer, pl_module):
        import wandb

        self.run = wandb.init(mode="offline", dir=trainer.default_root_dir, project="bpkit-bench", reinit=True)
        wandb.watch(pl_module, log="all", log_freq=self.log_freq)

    def on_fit_end(self, trainer, pl_module):
        import wandb

        wandb.unwatch(pl_module)
        self.run.finish()


class ReferenceHistograms(pl.Callback):
    """For the length of one run, GradientMonitor's histograms take the reference (log10) path instead of the
    float-bits one: the two side by side in one process (issue 22)."""

    def on_fit_start(self, trainer, pl_module):
        import functools

        import bpkit.probe.gradient as probe_module

        self._saved = probe_module.log_histograms
        probe_module.log_histograms = functools.partial(self._saved, method="reference")

    def on_fit_end(self, trainer, pl_module):
        import bpkit.probe.gradient as probe_module

        probe_module.log_histograms = self._saved


# name -> a function returning the callbacks of one run; extend this dict to benchmark more callbacks
CONFIGS: dict[str, Callable[[], list[pl.Callback]]] = {
    "bare": lambda: [],
    "empty_callback": lambda: [pl.Callback()],  # what Lightning's dispatch of every hook to one callback costs
    "empty_callback_x10": lambda: [pl.Callback() for _ in range(10)],
    "lightning_clip": lambda: [],  # bare + Trainer(gradient_clip_val=1.0): what bpkit_default's clipping replaces
    "lightning_grad_norm": lambda: [LightningGradNorm()],
    "wandb_watch_all": lambda: [WandbWatch(50)],
    "wandb_watch_all_f1": lambda: [WandbWatch(1)],
    "gradient_monitor": lambda: [GradientMonitor()],
    "gradient_monitor_warn": lambda: [GradientMonitor(on_nonfinite="warn")],
    "gradient_monitor_every_step": lambda: [GradientMonitor(log_every_n_steps=1)],
    # every statistic every step (norms, max, weight norms, update ratios, histograms): issue 22's target
    "gradient_monitor_all_every_step": lambda: [GradientMonitor(log_every_n_steps=1, histogram_every_n_steps=1)],
    "gradient_monitor_all_every_step_ref": lambda: [GradientMonitor(log_every_n_steps=1, histogram_every_n_steps=1),
                                                    ReferenceHistograms()],
    # the same with histograms over a strided sample of 4096 elements per tensor (estimated counts)
    "gradient_monitor_all_every_step_sampled": lambda: [GradientMonitor(log_every_n_steps=1, histogram_every_n_steps=1,
                                                                        histogram_samples=4096)],
    "bpkit_default": lambda: [GradientMonitor(), ActivationMonitor(), GradientClipping("norm")],
    "bpkit_full": lambda: [GradientMonitor(log_every_n_steps=1, check_every_n_steps=1),
                           ActivationMonitor(log_every_n_steps=1), GradientClipping("norm", log_every_n_steps=1)],
}


# configurations whose whole per-step work is in callback hooks (the "in its hooks" columns); the others
# work in Lightning's loop (gradient_clip_val) or in module hooks (wandb.watch)
HOOKED = {"lightning_grad_norm", "gradient_monitor", "gradient_monitor_warn", "gradient_monitor_every_step",
          "gradient_monitor_all_every_step", "gradient_monitor_all_every_step_ref",
          "gradient_monitor_all_every_step_sampled", "bpkit_default", "bpkit_full"}

# Trainer arguments of a configuration, when it needs any
TRAINER_KWARGS: dict[str, dict[str, Any]] = {"lightning_clip": {"gradient_clip_val": 1.0}}

# ----------------------------------------------------------------- measurement

HOOK_CLOCK = [0.0]  # seconds spent inside the hooks of the configuration's callbacks


def clock_hooks(callbacks: list[pl.Callback]) -> list[pl.Callback]:
    """Wrap every hook a callback overrides so that its time adds to ``HOOK_CLOCK``: the cost a
    configuration adds, measured directly instead of as a difference of two noisy step times.
    (Work in module hooks, e.g. ActivationMonitor's forward hooks, is not in it.)"""
    for cb in callbacks:
        for name in dir(type(cb)):
            if not name.startswith("on_") or getattr(type(cb), name) is getattr(pl.Callback, name, None):
                continue
            original = getattr(cb, name)
            if not callable(original):
                continue

            def timed(*args, _f=original, **kwargs):
                t = time.perf_counter()
                try:
                    return _f(*args, **kwargs)
                finally:
                    HOOK_CLOCK[0] += time.perf_counter() - t

            setattr(cb, name, timed)
    return callbacks


class _StepStart(pl.Callback):
    """First in the callback list: the step starts before any other callback's hook."""

    def __init__(self, timer: "StepTimer") -> None:
        self.timer = timer

    def on_train_batch_start(self, *args):
        self.timer._t, self.timer._h = time.perf_counter(), HOOK_CLOCK[0]


class StepTimer(pl.Callback):
    """Last in the callback list: wall time per step and the time inside the configuration's hooks."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.hook_times: list[float] = []
        self.start = _StepStart(self)

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self._t)
        self.hook_times.append(HOOK_CLOCK[0] - self._h)


class CudaStepTimer(StepTimer):
    """Wall time per step; the GPU is drained at the end of each step so queued work is counted."""

    def on_train_batch_end(self, *args):
        torch.cuda.synchronize()
        super().on_train_batch_end(*args)


class HostReads:
    """Counts device->host reads of tensors from any caller while active."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self) -> None:
        self.count, self.active, self._orig = 0, False, {}

    def __enter__(self):
        for name in self.METHODS:
            orig = getattr(torch.Tensor, name)
            self._orig[name] = orig

            def wrapper(t, *a, _orig=orig, **k):
                if self.active:
                    self.count += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(torch.Tensor, name, orig)


class CountSteps(pl.Callback):
    def __init__(self, reads: HostReads, warmup: int) -> None:
        self.reads, self.warmup, self.steps = reads, warmup, 0

    def on_train_batch_start(self, trainer, *args):
        self.reads.active = trainer.global_step >= self.warmup

    def on_train_batch_end(self, trainer, *args):
        self.steps += int(self.reads.active)
        self.reads.active = False  # between steps Lightning's own loop is not counted... except the step itself


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class CountOps(pl.Callback):
    """Aten ops dispatched during each training step after warm-up (forward, backward, hooks, step)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.per_step, self.mode = warmup, [], None

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step >= self.warmup:
            self.mode = OpCounter()
            self.mode.__enter__()

    def on_train_batch_end(self, trainer, *args):
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.per_step.append(self.mode.count)
            self.mode = None


class CountSyncs(pl.Callback):
    """CUDA host syncs per step after warm-up, from the sync debug mode's warnings."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.counts, self._catcher = warmup, [], None

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step >= self.warmup:
            self._catcher = warnings.catch_warnings(record=True)
            self._log = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, *args):
        if self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.counts.append(sum("synchroniz" in str(w.message) for w in self._log))
            self._catcher.__exit__(None, None, None)
            self._catcher = None


DEVICE = "cpu"  # set from --device


def run_once(model_name: str, config: str, steps: int, batch: int, smoke: bool, root: str,
             extra: list[pl.Callback] = ()) -> list[float]:
    torch.manual_seed(0)
    model, make_batch, loss = make_model(model_name, smoke)
    batches = [tuple(t.to(DEVICE) for t in make_batch(batch)) for _ in range(8)]  # data on the device
    timer = StepTimer()
    if DEVICE == "cuda":
        timer = CudaStepTimer()
    trainer = pl.Trainer(accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, max_steps=steps, logger=False,
                         enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         callbacks=[timer.start, *clock_hooks(CONFIGS[config]()), timer, *extra],
                         **TRAINER_KWARGS.get(config, {}))
    trainer.fit(Task(model, batches, loss))
    run_once.hook_times = timer.hook_times
    return timer.times


def ops_per_step(model_name: str, config: str, warmup: int, batch: int, smoke: bool, root: str) -> float:
    counter = CountOps(warmup)
    run_once(model_name, config, warmup + 5, batch, smoke, root, [counter])
    return statistics.fmean(counter.per_step) if counter.per_step else float("nan")


def scaling(root: str, batch: int) -> list[dict[str, Any]]:
    """Aten ops per step added by GradientMonitor (default cadence, non-log steps) vs number of tensors."""
    rows = []
    for depth in (10, 50, 200):
        bare = ops_per_step(f"mlp_depth{depth}", "bare", 3, batch, True, root)
        monitored = ops_per_step(f"mlp_depth{depth}", "gradient_monitor_warn", 3, batch, True, root)
        rows.append({"layers": depth, "tensors": 2 * depth, "ops_bare": bare, "ops_added": monitored - bare})
    return rows


def copy_bandwidth(numel: int = 1 << 25, repeats: int = 5) -> float:
    """GB/s of a torch copy of a large float32 tensor (bytes read plus bytes written, best of ``repeats``): the
    memory floor of the cost model, measured with the benchmark's thread count."""
    src, dst = torch.rand(numel, device=DEVICE), torch.empty(numel, device=DEVICE)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * 4 * numel / best / 1e9


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global DEVICE, SIZES
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, few steps: a seconds-long check")
    parser.add_argument("--models", default="mlp,resnet,lstm,mlp_tiny")
    parser.add_argument("--configs", default="bare,lightning_grad_norm,wandb_watch_all,wandb_watch_all_f1,"
                                             "gradient_monitor,bpkit_default,bpkit_full")
    parser.add_argument("--steps", type=int, default=110)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", choices=("cpu", "gpu"), default=None, help="model sizes (default: by device)")
    parser.add_argument("--scaling", action="store_true", help="also: ops per step vs number of tensors")
    parser.add_argument("--skip-counts", action="store_true",
                        help="no host-read and op-count runs (they add ~35 steps per configuration: slow models)")
    args = parser.parse_args(argv)
    DEVICE = args.device
    SIZES = args.sizes or ("gpu" if args.device == "cuda" else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.device == "cuda" and args.models == "mlp,resnet,lstm,mlp_tiny":
        args.models = "mlp,resnet,lstm"
    if args.smoke:
        args.steps, args.warmup, args.repeats = 12, 2, 1
        args.configs = "bare,lightning_grad_norm,gradient_monitor,bpkit_default,bpkit_full"
    torch.set_num_threads(args.threads)
    models, configs = args.models.split(","), args.configs.split(",")
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"unknown config {c!r}; known: {', '.join(CONFIGS)}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as root:
        for model_name in models:
            model, _, _ = make_model(model_name, args.smoke)
            n_params = sum(p.numel() for p in model.parameters())
            n_tensors = sum(1 for _ in model.parameters())
            per_config: dict[str, list[float]] = {c: [] for c in configs}
            in_hooks: dict[str, list[float]] = {c: [] for c in configs}
            run_once(model_name, configs[0], args.warmup + 2, args.batch, args.smoke, root)  # warm caches, discarded
            for r in range(args.repeats):
                for config in configs[r % len(configs):] + configs[:r % len(configs)]:  # rotate the order
                    times = run_once(model_name, config, args.steps, args.batch, args.smoke, root)
                    per_config[config].append(statistics.fmean(times[args.warmup:]))
                    in_hooks[config].append(statistics.fmean(run_once.hook_times[args.warmup:]))
            reads: dict[str, float] = {}
            ops: dict[str, float] = {}
            for config in configs:
                if args.skip_counts:
                    reads[config], ops[config] = float("nan"), float("nan")
                    continue
                if DEVICE == "cuda":
                    syncs = CountSyncs(args.warmup)
                    run_once(model_name, config, args.warmup + 10, args.batch, args.smoke, root, [syncs])
                    reads[config] = statistics.fmean(syncs.counts) if syncs.counts else float("nan")
                else:
                    with HostReads() as counter:
                        steps_counter = CountSteps(counter, args.warmup)
                        run_once(model_name, config, args.warmup + 10, args.batch, args.smoke, root,
                                 [steps_counter])
                    reads[config] = counter.count / max(steps_counter.steps, 1)
                ops[config] = ops_per_step(model_name, config, args.warmup, args.batch, args.smoke, root)
            bare = statistics.median(per_config["bare"]) if "bare" in per_config else None
            rows = {}
            for config in configs:
                t = statistics.median(per_config[config])
                hook = statistics.median(in_hooks[config])
                rows[config] = {"ms": t * 1e3, "ratio": t / bare if bare else float("nan"), "reads": reads[config],
                                "ops": ops[config] - ops.get("bare", 0.0), "hook_ms": hook * 1e3,
                                "hook_ratio": 1 + hook / bare if bare else float("nan")}
            results[model_name] = {"params": n_params, "tensors": n_tensors, "rows": rows}
            what = "syncs" if DEVICE == "cuda" else "reads"
            print(f"\n{model_name}: {n_params / 1e6:.2f}M params, {n_tensors} tensors, batch {args.batch}")
            print(f"  {'config':28s} {'ms/step':>9s} {'x bare':>7s} {'in hooks':>9s} {'1+hooks/bare':>12s} "
                  f"{what + '/step':>11s} {'+ops/step':>10s}")
            for config, r in rows.items():
                added = r["reads"] - rows["bare"]["reads"] if "bare" in rows else r["reads"]
                hooks = f"{r['hook_ms']:9.3f} {r['hook_ratio']:12.3f}" if config in HOOKED else f"{'-':>9s} {'-':>12s}"
                print(f"  {config:28s} {r['ms']:9.2f} {r['ratio']:7.3f} {hooks} "
                      f"{r['reads']:7.1f} ({added:+.1f}) {r['ops']:9.0f}")
            sys.stdout.flush()
        if args.scaling:
            results["scaling"] = scaling(root, 16)
    bandwidth = copy_bandwidth(1 << 20 if args.smoke else 1 << 25)
    results["bandwidth_gbs"] = bandwidth
    print(f"\nmemory bandwidth (torch copy of a {'4 MiB' if args.smoke else '128 MiB'} float32 tensor, read + write): "
          f"{bandwidth:.1f} GB/s")
    env = (f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
           + (f", {torch.cuda.get_device_name()}" if DEVICE == "cuda" else "")
           + f", torch {torch.__version__}, lightning {pl.__version__}, threads {args.threads}, steps {args.steps} "
             f"(warm-up {args.warmup}), repeats {args.repeats}, batch {args.batch}")
    print(f"\n{env}\n")
    what = "host syncs" if DEVICE == "cuda" else "host reads"
    print(f"| model | config | ms/step | x bare | ms/step in its hooks | 1 + hooks/bare | {what}/step (added) "
          "| aten ops/step added |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name, res in results.items():
        if model_name in ("scaling", "bandwidth_gbs"):
            continue
        label = f"{model_name} ({res['params'] / 1e6:.2f}M, {res['tensors']} tensors)"
        for config, r in res["rows"].items():
            added = r["reads"] - res["rows"]["bare"]["reads"] if "bare" in res["rows"] else r["reads"]
            hooks = f"{r['hook_ms']:.3f} | {r['hook_ratio']:.3f}x" if config in HOOKED else "- | -"
            print(f"| {label} | {config} | {r['ms']:.2f} | {r['ratio']:.2f}x | {hooks} | "
                  f"{r['reads']:.1f} ({added:+.1f}) | {r['ops']:.0f} |")
    if "scaling" in results:
        print("\n| MLP layers | parameter tensors | aten ops/step, bare | added by GradientMonitor (non-log steps) |")
        print("|---|---|---|---|")
        for row in results["scaling"]:
            print(f"| {row['layers']} | {row['tensors']} | {row['ops_bare']:.0f} | {row['ops_added']:.0f} |")
    return results


if __name__ == "__main__":
    main()
