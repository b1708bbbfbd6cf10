"""Cost of each bpkit clipping policy next to torch's clip_grad_norm_ and a per-tensor (timm-style) AGC loop.

Every method clips the same gradients in place; they are restored before each call (untimed). Times are per call, the median over repeats; ratios are against
``torch.nn.utils.clip_grad_norm_`` (foreach implementation) measured in the same run.

    python benchmarks/clip_overhead.py            # full sizes
    python benchmarks/clip_overhead.py --smoke    # seconds, for CI
    python benchmarks/clip_overhead.py --calm     # not a timing: the fraction of steps each policy clips at its
                                                  # defaults on calm runs (no spikes), about 2 minutes on a CPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

import bpkit
from bpkit.clip import make_policy
from bpkit.models import MLP, ResNet, RNN
from bpkit.stats.norms import foreach_norms, total_norm


def timm_agc(parameters, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """The per-tensor loop of timm.utils.agc.adaptive_clip_grad (re-typed here: timm is not a dependency)."""
    for p in parameters:
        if p.grad is None:
            continue
        w, g = p.detach(), p.grad.detach()
        dims = tuple(range(1, w.ndim)) if w.ndim > 1 else None
        w_norm = w.norm(2.0, dim=dims, keepdim=True) if dims else w.norm(2.0)
        g_norm = g.norm(2.0, dim=dims, keepdim=True) if dims else g.norm(2.0)
        max_norm = w_norm.clamp(min=eps).mul_(clip_factor)
        clipped = g * (max_norm / g_norm.clamp(min=1e-6))
        g.copy_(torch.where(g_norm < max_norm, g, clipped))


def models(smoke: bool) -> dict[str, nn.Module]:
    if smoke:
        return {"MLP 4x64": MLP(64, 10, depth=4, width=64), "ResNet d4 w8": ResNet(1, 10, depth=4, width=8)}
    return {
        "MLP depth 8, width 2048": MLP(1024, 10, depth=8, width=2048),
        "ResNet depth 16, width 32, 3 stages": ResNet(3, 10, depth=16, width=32, stages=3),
        "LSTM 2 layers x 1024": RNN("lstm", input_size=256, hidden_size=1024, num_layers=2, out_features=10),
    }


def fill_grads(model: nn.Module) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device) * 0.1
    return params


def bench(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
          reset: Callable[[], None]) -> dict[str, float]:
    """Median seconds per call; the methods take turns within each repeat, so a change in machine load
    (a shared CPU) hits all of them alike. ``reset`` restores the original gradients before every call
    (untimed): repeated clipping would otherwise shrink them towards subnormal numbers, slow on CPUs."""
    for fn in fns.values():
        reset()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            reset()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def methods(params: list[torch.Tensor], model: nn.Module) -> dict[str, Callable[[], object]]:
    grads = [p.grad for p in params]
    policies = {name: make_policy(name, **kw) for name, kw in [
        ("norm", {"max_norm": 1.0}), ("value", {"clip_value": 0.01}), ("agc", {}), ("autoclip", {}),
        ("zclip", {"warmup_steps": 2}), ("skip", {"warmup_steps": 2})]}
    policies["agc"].bind(model)
    published = total_norm(foreach_norms(grads))  # what GradientMonitor would have published this step

    def skip_with_decision():
        return bool(policies["skip"].clip_(params).skip)  # the policy's one 1-element read

    return {
        "torch clip_grad_norm_ (foreach)": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "torch clip_grad_value_": lambda: torch.nn.utils.clip_grad_value_(params, 0.01),
        "timm-style AGC loop": lambda: timm_agc(params),
        "bpkit norm (computes the norm)": lambda: policies["norm"].clip_(params),
        "bpkit norm (norm reused from monitor)": lambda: policies["norm"].apply(params, grads, published),
        "bpkit value": lambda: policies["value"].clip_(params),
        "bpkit agc (grouped by unit shape)": lambda: policies["agc"].clip_(params),
        "bpkit autoclip": lambda: policies["autoclip"].clip_(params),
        "bpkit zclip": lambda: policies["zclip"].clip_(params),
        "bpkit zclip (norm reused)": lambda: policies["zclip"].apply(params, grads, published),
        "bpkit skip (+1 host read)": skip_with_decision,
    }


# ---------------------------------------------------------------- calm runs: how often each policy acts at its defaults

DEFAULTS: dict[str, dict] = {"norm": {}, "value": {}, "agc": {}, "autoclip": {}, "zclip": {}, "skip": {},
                             "zclip, official cap max_norm=1.0": {"max_norm": 1.0}}


def calm_task(kind: str, scale: float, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A smooth regression (MLP) or next-value prediction of noisy sines (LSTM); ``scale`` multiplies the targets,
    and with them the gradient norm (scale 10: norms around 10, as in the forecasting models of issue 16)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        x = torch.randn(4096, 8, generator=g)
        y = scale * (torch.sin(x[:, :1]) + 0.5 * torch.cos(2 * x[:, 1:2]) + 0.05 * torch.randn(4096, 1, generator=g))
        return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)), x, y
    t = torch.arange(24).float()
    phase, freq = torch.rand(2048, 1, generator=g) * 6.28, 0.2 + 0.3 * torch.rand(2048, 1, generator=g)
    s = scale * torch.sin(freq * t + phase) + 0.05 * torch.randn(2048, 24, generator=g)

    class LSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.out = nn.LSTM(1, 32, batch_first=True), nn.Linear(32, 1)

        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(xb)[0][:, -1])

    return LSTM(), s[:, :-1, None], s[:, -1:]


def clipped_fraction(kind: str, scale: float, policy: str, kwargs: dict, steps: int) -> tuple[float, float]:
    """(fraction of steps the policy clipped or skipped, median total norm) over ``steps`` Adam steps (lr 1e-3,
    batch 32)."""
    net, x, y = calm_task(kind, scale)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    clip = make_policy(policy.split(",")[0], **kwargs).bind(net)
    g = torch.Generator().manual_seed(1)
    clipped, norms = 0, []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        opt.zero_grad()
        F.mse_loss(net(x[idx]), y[idx]).backward()
        res = clip.clip_(net.parameters())
        norms.append(float(res.norm_pre) if res.norm_pre is not None else float("nan"))
        if res.skip is not None and bool(res.skip):
            for p in net.parameters():
                p.grad = None
        clipped += bool(res.clipped)
        opt.step()
    finite = [n for n in norms if n == n]
    return clipped / steps, statistics.median(finite) if finite else float("nan")


def calm(steps: int) -> None:
    runs = [("mlp", 1.0), ("mlp", 10.0), ("lstm", 1.0), ("lstm", 10.0)]
    print(f"\n## Fraction of steps clipped at the defaults on calm runs ({steps} Adam steps, no spikes)\n")
    print("| policy (defaults) | " + " | ".join(f"{k.upper()}, targets x{s:g}" for k, s in runs) + " |")
    print("|---|" + "---|" * len(runs))
    medians: dict[tuple[str, float], float] = {}
    for policy, kwargs in DEFAULTS.items():
        cells = []
        for kind, scale in runs:
            fraction, median = clipped_fraction(kind, scale, policy, kwargs, steps)
            if policy == "skip":  # skips nothing on these runs: the norms of an unclipped run
                medians[(kind, scale)] = median
            cells.append(f"{100 * fraction:.1f}%")
        print(f"| {policy} | " + " | ".join(cells) + " |", flush=True)
    print("| (median total norm, unclipped) | " + " | ".join(f"{medians[r]:.3g}" for r in runs) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calm", action="store_true", help="fraction of steps clipped at the defaults on calm runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.calm:
        calm(60 if args.smoke else 600)
        return
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.smoke else 20)
    print(f"# clip_overhead: {time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
          f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}, bpkit {bpkit.__version__}")
    for model_name, model in models(args.smoke).items():
        model.to(device)
        params = fill_grads(model)
        n = sum(p.numel() for p in params)
        saved = [p.grad.clone() for p in params]

        def reset() -> None:
            torch._foreach_copy_([p.grad for p in params], saved)

        results = bench(methods(params, model), repeats, device, reset)
        base = results["torch clip_grad_norm_ (foreach)"]
        print(f"\n## {model_name}: {n / 1e6:.2f}M params, {len(params)} tensors\n")
        print("| method | ms / call | x clip_grad_norm_ |")
        print("|---|---|---|")
        for name, t in results.items():
            print(f"| {name} | {t * 1e3:.3f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
