"""Cost of bpkit.gradcheck.check_gradients against parameter count.

For MLPs of growing width (and a deep ResNet with many tensors) on a batch of 64 digits-sized
inputs, measures: one float32 forward+backward (the training step's own cost), the directional
check, the full check with 8 sampled elements per tensor, and what ``torch.autograd.gradcheck``-style per-element
central differences over every parameter would cost (2 forward passes per element, extrapolated
from the measured float64 forward time; not run).

With ``--budget`` it measures instead what the ``GradientCheck`` callback costs inside a real
``Trainer.fit`` on CPU, for a mid-size MLP and a small transformer (``torch.nn.TransformerEncoder``):
the fit without the callback, the check with no time limit (``max_seconds=None``, the behaviour before
the budget) and with the default budget (``max_seconds=5.0``), and what each check covered.

Usage::

    python benchmarks/gradcheck_cost.py            # table in markdown on stdout
    python benchmarks/gradcheck_cost.py --threads 2 --repeats 3
    python benchmarks/gradcheck_cost.py --budget   # callback cost vs fit time, before/after max_seconds
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
import warnings

import lightning
import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from bpkit.gradcheck import check_gradients
from bpkit.models import MLP, ResNet


def _best(fn, repeats: int) -> float:
    """Best of ``repeats`` runs; runs longer than 5 s are not repeated."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if best > 5.0:
            break
    return best


def _step_time(model, batch, repeats: int, dtype=torch.float32) -> float:
    model = model.to(dtype)
    x, y = batch[0].to(dtype), batch[1]

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    step()
    return _best(step, repeats)


def _forward_time(model, batch, repeats: int, dtype=torch.float64) -> float:
    model = model.to(dtype)
    x = batch[0].to(dtype)
    with torch.no_grad():
        model(x)
        return _best(lambda: model(x), repeats)


class _Lit(pl.LightningModule):
    """A classifier around ``net`` as a Lightning example writes it."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)


class _TinyTransformer(torch.nn.Module):
    def __init__(self, vocab: int = 64, d_model: int = 64, layers: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        layer = torch.nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.1,
                                                 batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d_model, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def budget_table(args: argparse.Namespace) -> None:
    """The callback's check vs the fit it sits in, before (no limit) and after (default budget)."""
    from torch.utils.data import DataLoader, TensorDataset

    from bpkit.callbacks import GradientCheck

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    steps = 5 if args.smoke else 100
    cases = [
        ("MLP 256-1024x6-10", lambda: _Lit(MLP(256, 10, depth=6 if not args.smoke else 2,
                                              width=1024 if not args.smoke else 64)),
         lambda g: (torch.randn(args.batch * steps, 256, generator=g), torch.randint(0, 10, (args.batch * steps,),
                                                                                    generator=g))),
        ("Transformer 4x64 (seq 32)", lambda: _Lit(_TinyTransformer(layers=1 if args.smoke else 4)),
         lambda g: (torch.randint(0, 64, (args.batch * steps, 32), generator=g),
                    torch.randint(0, 10, (args.batch * steps,), generator=g))),
    ]
    print(f"torch {torch.__version__}, lightning {lightning.__version__}, python {platform.python_version()}, "
          f"{args.threads} thread(s), batch {args.batch}, {steps} steps per fit, CPU, float64 copy\n")
    print("| model | params | tensors | fit without the check | check, max_seconds=None | coverage | "
          "check, max_seconds=5 (default) | coverage |")
    print("|---|---|---|---|---|---|---|---|")
    for name, make, data in cases:
        if args.only not in name:
            continue
        loader = DataLoader(TensorDataset(*data(torch.Generator().manual_seed(0))), batch_size=args.batch)

        def fit(callbacks):
            pl.seed_everything(0, verbose=False)
            module = make()
            trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                                 enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)
            t = time.perf_counter()
            trainer.fit(module, loader)
            return module, time.perf_counter() - t

        module, t_fit = fit([])
        n_params = sum(p.numel() for p in module.parameters())
        row = [name, f"{n_params:,}", str(len(list(module.parameters()))), f"{t_fit:.1f} s"]
        for budget in (None, 5.0):
            check = GradientCheck(max_seconds=budget)
            fit([check])
            (_, report), = check.reports
            assert not report.failed, str(report)
            row += [f"{report.seconds:.1f} s", f"{report.checked_tensors}/{report.total_tensors} tensors, "
                    f"{report.checked_elements / max(report.total_elements or 1, 1):.0%} of elements"]
        print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--only", default="", help="run only the models whose name contains this")
    parser.add_argument("--smoke", action="store_true", help="the two smallest MLPs, one repeat: a seconds-long check")
    parser.add_argument("--budget", action="store_true",
                        help="GradientCheck inside Trainer.fit, max_seconds=None vs the default 5 s")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.batch = 1, 16
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.budget:
        budget_table(args)
        return

    cases = [(f"MLP width {w}", lambda w=w: MLP(64, 10, depth=4, width=w), (args.batch, 64))
             for w in ((32, 128) if args.smoke else (32, 128, 512, 1024, 2048))]
    if not args.smoke:
        cases.append(("ResNet depth 8 width 16 (BN)", lambda: ResNet(1, 10, depth=8, width=16), (args.batch, 1, 8, 8)))

    print(f"torch {torch.__version__}, lightning {lightning.__version__}, python {platform.python_version()}, "
          f"{args.threads} thread(s), batch {args.batch}, float64 copy, best of {args.repeats}\n")
    print("| model | params | tensors | fwd+bwd fp32 | directional (3 dirs) | evals | full (8 el./tensor) | evals "
          "| every element (extrapolated) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, make, shape in cases:
        if args.only not in name:
            continue
        model = make()
        batch = (torch.rand(*shape), torch.randint(0, 10, (shape[0],)))
        n_params = sum(p.numel() for p in model.parameters())
        n_tensors = len(list(model.parameters()))
        step = _step_time(make(), batch, args.repeats)
        fwd64 = _forward_time(make(), batch, args.repeats)
        report = None

        def directional(model=model, batch=batch):
            nonlocal report
            report = check_gradients(model, batch, loss_fn=F.cross_entropy, mode="directional", n_directions=3)

        t_dir = _best(directional, args.repeats)
        assert report.passed, str(report)
        ev_dir = report.evaluations
        if args.skip_full:
            t_full, ev_full = float("nan"), 0
        else:
            def full(model=model, batch=batch):
                nonlocal report
                report = check_gradients(model, batch, loss_fn=F.cross_entropy, mode="full", max_elements=8)

            t_full = _best(full, 1)
            assert report.passed, str(report)
            ev_full = report.evaluations
        every = 2 * n_params * fwd64
        print(f"| {name} | {n_params:,} | {n_tensors} | {step * 1e3:.2f} ms | {t_dir:.2f} s | {ev_dir} | "
              f"{t_full:.2f} s | {ev_full} | {every:,.0f} s ({every / 3600:.1f} h) |", flush=True)


if __name__ == "__main__":
    main()
