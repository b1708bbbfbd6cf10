"""The LR range test (Smith 2017): an exponential LR sweep, the smoothed loss, a plot and a suggestion.

Built on Lightning's ``Tuner.lr_find`` (exponential sweep, smoothed loss, stop on divergence,
model and optimizer restored from a temporary checkpoint). bpkit adds a documented suggestion
rule, a saved PNG plot (also logged to W&B as an image), a printed explanation, and the option to
apply the suggestion to the run.

Example::

    from bpkit.lr_find import find_lr
    result = find_lr(trainer, task, datamodule, out_dir="outputs/lr")
    print(result.explain())          # "suggested lr=2.1e-03 (rule: min_div10 ...)"
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bpkit.errors import BpkitConfigError, check_choice, check_float, check_int

RULES = ("min_div10", "steepest")
RULE_TEXT = {
    "min_div10": "the LR at the minimum of the smoothed loss, divided by 10 (Smith 2017; fastai's lr_min)",
    "steepest": "the LR where the smoothed loss falls fastest against log LR (Lightning's suggestion)",
}


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]
    suggestion: float | None
    rule: str
    others: dict[str, float | None] = field(default_factory=dict)
    plot_path: str | None = None
    requested_steps: int | None = None

    def explain(self) -> str:
        short = ""
        if self.requested_steps and len(self.lrs) < self.requested_steps:
            short = (f" [ran {len(self.lrs)} of {self.requested_steps} steps: the loss diverged, or the run is "
                     f"shorter than the sweep (max_epochs x batches per epoch)]")
        if self.suggestion is None:
            return ("LR range test: no suggestion (too few steps, or the loss never decreased; widen "
                    "lr_finder.min_lr/max_lr or add steps)" + short)
        alt = ", ".join(f"{k}: {v:.2e}" for k, v in self.others.items() if v is not None and k != self.rule)
        return (f"LR range test: suggested lr={self.suggestion:.2e} (rule {self.rule}: {RULE_TEXT[self.rule]}; "
                f"{len(self.lrs)} steps from {self.lrs[0]:.1e} to {self.lrs[-1]:.1e}"
                + (f"; other rules: {alt}" if alt else "") + ")" + short)


def suggest(lrs: list[float], losses: list[float], rule: str, skip_begin: int = 10, skip_end: int = 1) -> float | None:
    """Suggest an LR from a range-test curve (``losses`` already smoothed)."""
    check_choice("rule", rule, RULES)
    lr = np.asarray(lrs, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    keep = np.isfinite(loss)
    lr, loss = lr[keep], loss[keep]
    if len(lr) <= skip_begin + skip_end + 2:
        return None
    lr, loss = lr[skip_begin:len(lr) - skip_end], loss[skip_begin:len(loss) - skip_end]
    if rule == "min_div10":
        best = int(np.argmin(loss))
        return float(lr[best] / 10.0) if best > 0 else None
    slope = np.gradient(loss, np.log10(lr))
    return float(lr[int(np.argmin(slope))])


def plot_lr_find(result: LRFindResult, path: str | Path) -> str:
    """Save the loss-vs-LR curve with the suggestion marked; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot(result.lrs, result.losses, color="#1f77b4", label="smoothed training loss")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    finite = [v for v in result.losses if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        top = min(hi, finite[0] + 0.5 * (finite[0] - lo)) if finite[0] > lo else hi
        pad = 0.05 * (top - lo) or 0.1
        ax.set_ylim(lo - pad, top + pad)
    for name, value in result.others.items():
        if value is not None:
            ax.axvline(value, color="#d62728" if name == result.rule else "#aaaaaa", linestyle="--",
                       label=f"{name}: {value:.1e}" + (" (suggested)" if name == result.rule else ""))
    ax.set_title("LR range test")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def check_options(min_lr: float, max_lr: float, num_steps: int, rule: str,
                  early_stop_threshold: float | None = 4.0, **_: Any) -> None:
    """Validate the range test's options (keys named as in the ``lr_finder`` config)."""
    check_float("lr_finder.min_lr", min_lr, 0.0, low_inclusive=False)
    check_float("lr_finder.max_lr", max_lr, 0.0, low_inclusive=False)
    if max_lr <= min_lr:
        raise BpkitConfigError("lr_finder.max_lr", max_lr, f"a value above lr_finder.min_lr={min_lr}")
    check_int("lr_finder.num_steps", num_steps, minimum=2)
    check_choice("lr_finder.rule", rule, RULES)
    if early_stop_threshold is not None:
        check_float("lr_finder.early_stop_threshold", early_stop_threshold, 1.0, low_inclusive=False)


def find_lr(trainer: Any, task: Any, datamodule: Any = None, *, min_lr: float = 1e-6, max_lr: float = 1.0,
            num_steps: int = 100, early_stop_threshold: float | None = 4.0, rule: str = "min_div10",
            out_dir: str | Path | None = None, apply: bool = False) -> LRFindResult:
    """Run the LR range test on ``task`` and return the curve and a suggestion.

    The weights, optimizer state and loops are restored exactly afterwards (Lightning restores a
    temporary checkpoint). With ``apply=True`` the suggestion replaces the LR of a
    :class:`~bpkit.task.BackpropTask`'s optimizer (``task.optimizer_factory``) or sets ``task.lr``.

    Raises:
        BpkitConfigError: min_lr/max_lr not positive or not increasing, num_steps < 2, unknown rule.
    """
    from lightning.pytorch.tuner import Tuner

    check_options(min_lr, max_lr, num_steps, rule, early_stop_threshold)
    finder = Tuner(trainer).lr_find(task, datamodule=datamodule, min_lr=min_lr, max_lr=max_lr,
                                    num_training=num_steps, mode="exponential",
                                    early_stop_threshold=early_stop_threshold, update_attr=False)
    results = getattr(finder, "results", None) or {"lr": [], "loss": []}
    lrs = [float(v) for v in results["lr"]]
    losses = [float(v) for v in results["loss"]]
    others = {r: suggest(lrs, losses, r) for r in RULES}
    result = LRFindResult(lrs, losses, others[rule], rule, others, requested_steps=num_steps)
    if out_dir is not None and lrs:
        result.plot_path = plot_lr_find(result, Path(out_dir) / "lr_find.png")
    if apply and result.suggestion is not None:
        apply_lr(task, result.suggestion)
    return result


def apply_lr(task: Any, lr: float) -> None:
    factory = getattr(task, "optimizer_factory", None)
    if isinstance(factory, functools.partial):
        task.optimizer_factory = functools.partial(factory.func, *factory.args, **{**factory.keywords, "lr": lr})
    elif hasattr(task, "lr"):
        task.lr = lr
    else:
        raise BpkitConfigError("lr_finder.apply", True, "a task with an optimizer_factory partial or an `lr` attribute")
