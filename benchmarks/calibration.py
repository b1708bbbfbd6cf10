"""Calibration of GradientMonitor's exploding rule on healthy runs and on the known exploding one.

A fast pure-torch loop reproduces the total-gradient-norm series of the runs ``bpkit-train`` makes
(bpkit.models.MLP on bpkit.data.DigitsDataModule with batch size 64 as conf/data/digits.yaml; every optimizer
config of conf/optimizer/ with the learning rate of its yaml file; the exploding recipe's tanh RNN on the adding
problem with recurrent_scale 1.5, SGD 0.1 and no clipping) and feeds each series, step by step, to the detectors
GradientMonitor runs (:class:`bpkit.detect.ExplodingDetector` with GradientMonitor's defaults, and the spike
rule on the norm), exactly as its replay does (host values, one update per optimizer step).

    python benchmarks/calibration.py                 # the table, markdown, on stdout
    python benchmarks/calibration.py --steps 300     # shorter runs
    python benchmarks/calibration.py --factor 10 --warmup 50 --patience 3 --growth 100   # other thresholds

Single process, ``torch.set_num_threads(1)``: the runs are tiny.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bpkit.data import AddingDataModule, DigitsDataModule  # noqa: E402
from bpkit.detect import ExplodingDetector, SpikeDetector  # noqa: E402
from bpkit.models import MLP, RNN  # noqa: E402


def optimizer_configs() -> dict[str, dict]:
    """conf/optimizer/*.yaml as {name: {target, kwargs}} (read from the files, not copied)."""
    import yaml

    out = {}
    folder = os.path.join(ROOT, "conf", "optimizer")
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".yaml"):
            continue
        with open(os.path.join(folder, fname)) as f:
            cfg = yaml.safe_load(f)
        target = cfg.pop("_target_")
        cfg.pop("_partial_", None)
        out[fname[:-5]] = {"cls": getattr(torch.optim, target.rsplit(".", 1)[1]), "kwargs": cfg}
    return out


def _batches(loader, steps):
    n = 0
    while True:
        for batch in loader:
            yield batch
            n += 1
            if n >= steps:
                return


def grad_series(model: torch.nn.Module, loader, opt: torch.optim.Optimizer, steps: int, loss_fn) -> tuple:
    """Train ``steps`` optimizer steps; per step the total gradient norm (float64 of the fp32 norms, as
    torch.nn.utils.get_total_norm), the per-tensor norms and the loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    totals, norms, losses = [], [], []
    for x, y in _batches(loader, steps):
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out[0] if isinstance(out, tuple) else out, y)
        loss.backward()
        with torch.no_grad():
            per = torch.stack([p.grad.detach().norm() if p.grad is not None else torch.zeros(()) for p in params])
            total = per.norm()
        totals.append(float(total))
        norms.append(per.numpy().astype(np.float64))
        losses.append(float(loss.detach()))
        if not math.isfinite(float(total)):
            break  # NaN from here on: the run is lost (GradientMonitor would skip these steps)
        opt.step()
    return np.array(totals), norms, np.array(losses)


def replay(totals, norms, losses, exploding_kw: dict) -> dict:
    """Feed a series to the exploding and spike rules as GradientMonitor's replay does."""
    det = ExplodingDetector(**exploding_kw)
    spike = SpikeDetector(("loss", "grad_norm_total"))
    fired, spikes = [], []
    ratio = 0.0
    hist = []
    for step, (t, n, loss) in enumerate(zip(totals, norms, losses)):
        if det.update(t, n, step):
            fired.append(step)
        if spike.update([loss, t], step)[1]:
            spikes.append(step)
        if math.isfinite(t):
            window = [h for h in hist[-exploding_kw.get("window", 100):] if math.isfinite(h)]
            if len(window) >= 10:
                ratio = max(ratio, t / max(float(np.median(window)), 1e-30))
            hist.append(t)
    first_nan = next((i for i, t in enumerate(totals) if not math.isfinite(t)), None)
    return {"fired": fired, "spikes": spikes, "ratio": ratio, "first_nan": first_nan,
            "max_norm": float(np.nanmax(np.where(np.isfinite(totals), totals, np.nan)))}


def _steps_txt(steps: list[int]) -> str:
    if not steps:
        return "-"
    if len(steps) <= 4:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, ... {steps[-1]} ({len(steps)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--depths", default="2,3,4,6,8,12,16,24")
    parser.add_argument("--seeds", default="42,0")
    parser.add_argument("--factor", type=float, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--growth", type=float, default=None)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--save", default=None, help="save the series (npz) to re-run the rules without training")
    parser.add_argument("--load", default=None, help="replay saved series (npz) instead of training")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kw = {k: getattr(args, k) for k in ("factor", "warmup", "patience", "growth", "window")
          if getattr(args, k) is not None}
    shown = ExplodingDetector(**kw)
    print(f"ExplodingDetector: factor {shown.factor:g}, warmup {shown.warmup}, patience {shown.patience}, "
          f"growth {shown.growth_factor:g}, baseline_steps {shown.baseline_steps}, window {shown.window}\n")

    series: dict[str, tuple] = {}
    if args.load:
        data = np.load(args.load, allow_pickle=True)
        series = data["series"].item()
    else:
        t0 = time.time()
        opts = optimizer_configs()
        for seed in map(int, args.seeds.split(",")):
            dm = DigitsDataModule(batch_size=64, seed=seed)
            for depth in map(int, args.depths.split(",")):
                for name, oc in opts.items():
                    torch.manual_seed(seed)
                    model = MLP(64, 10, depth=depth, width=128, activation="relu")
                    opt = oc["cls"](model.parameters(), **oc["kwargs"])
                    series[f"MLP depth {depth} relu, {name} (lr {oc['kwargs']['lr']:g}), seed {seed}"] = (
                        "healthy", *grad_series(model, dm.train_dataloader(), opt, args.steps, F.cross_entropy))
            # the known exploding case: recipes/exploding_rnn.yaml (clipping none)
            torch.manual_seed(seed)
            model = RNN("rnn_tanh", input_size=2, hidden_size=64, out_features=1, recurrent_scale=1.5)
            dm = AddingDataModule(seq_len=10, num_train=2000, batch_size=64, seed=seed)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)

            def mse(out, y):
                return F.mse_loss(out.reshape(y.shape), y.to(out.dtype))

            series[f"exploding_rnn (tanh, scale 1.5, SGD 0.1, no clipping), seed {seed}"] = (
                "exploding", *grad_series(model, dm.train_dataloader(), opt, args.steps, mse))
        print(f"(trained {len(series)} runs in {time.time() - t0:.0f} s)\n", file=sys.stderr)
        if args.save:
            np.savez(args.save, series=np.array(series, dtype=object))

    print("| run | steps | max total norm | max norm / running median | exploding alerts at steps | "
          "spike (norm) at steps | first NaN | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    bad = 0
    for name, (kind, totals, norms, losses) in series.items():
        r = replay(totals, norms, losses, kw)
        if kind == "healthy":
            ok = not r["fired"]
            verdict = "ok (silent)" if ok else "FALSE ALARM"
        else:
            limit = r["first_nan"] if r["first_nan"] is not None else len(totals)
            ok = bool(r["fired"]) and r["fired"][0] < limit
            verdict = f"ok (flagged {limit - r['fired'][0]} steps before NaN)" if ok else "MISSED"
        bad += not ok
        print(f"| {name} | {len(totals)} | {r['max_norm']:.3g} | {r['ratio']:.1f}x | {_steps_txt(r['fired'])} | "
              f"{_steps_txt(r['spikes'])} | {r['first_nan'] if r['first_nan'] is not None else '-'} | {verdict} |")
    print(f"\n{len(series) - bad} of {len(series)} runs as expected.")


if __name__ == "__main__":
    main()
