"""Learning-rate schedules by name, built from torch's own schedulers (pure torch).

Every builder returns a standard ``torch.optim.lr_scheduler`` object, so Lightning steps it and
checkpoints save and restore it. Schedules torch has are used as they are; warm-up phases are
composed with ``SequentialLR``; only the 1-sqrt decay of WSD, which torch lacks, is a small
picklable ``LambdaLR`` factor.

Example::

    >>> import torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> sched = build_scheduler(opt, "warmup_cosine", total_steps=100, warmup_steps=10, min_lr_ratio=0.01)
    >>> lrs = []
    >>> for _ in range(100):
    ...     lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
    >>> max(range(100), key=lrs.__getitem__), round(lrs[-1], 4)
    (10, 0.001)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as sch

from bpkit.errors import BpkitConfigError, check_choice, check_float, check_int

SCHEDULES = ("constant", "step", "multistep", "exponential", "cosine", "cosine_restarts", "warmup_cosine", "wsd",
             "onecycle", "polynomial", "plateau")
DECAYS = ("linear", "cosine", "1-sqrt")
# schedules whose shape depends on the run's length: the total comes from the Trainer when not given
NEEDS_TOTAL = ("cosine", "warmup_cosine", "wsd", "onecycle", "polynomial")


class OneMinusSqrtDecay:
    """LR factor for the 1-sqrt cool-down of WSD (Hägele et al. 2024): ``1 - sqrt(t / n)`` down to ``floor``."""

    def __init__(self, steps: int, floor: float) -> None:
        self.steps, self.floor = steps, floor

    def __call__(self, t: int) -> float:
        frac = min(max(t, 0), self.steps) / self.steps
        return self.floor + (1.0 - self.floor) * (1.0 - math.sqrt(frac))


def warmup_steps_from(total_steps: int, warmup_steps: int | None, warmup_ratio: float | None, key: str = "warmup") -> int:
    """Resolve warm-up given in steps or as a ratio of the total; refuse warm-up longer than training."""
    if warmup_steps is not None and warmup_ratio is not None:
        raise BpkitConfigError(f"{key}_ratio", warmup_ratio, f"null when {key}_steps is given (pick one)")
    if warmup_ratio is not None:
        warmup_steps = int(round(check_float(f"{key}_ratio", warmup_ratio, 0.0, 1.0, high_inclusive=False)
                                 * total_steps))
    warmup_steps = check_int(f"{key}_steps", warmup_steps or 0, minimum=0)
    if warmup_steps >= total_steps:
        raise BpkitConfigError(f"{key}_steps", warmup_steps,
                               f"fewer warm-up steps than the {total_steps} steps of training")
    return warmup_steps


def _warmup(optimizer: Optimizer, steps: int, start_factor: float) -> sch.LRScheduler:
    return sch.LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=steps)


def _then(optimizer: Optimizer, first: sch.LRScheduler | None, steps: int, rest: list[sch.LRScheduler],
          milestones: list[int]) -> sch.LRScheduler:
    schedulers = ([first] if first is not None else []) + rest
    marks = ([steps] if first is not None else []) + milestones
    return schedulers[0] if len(schedulers) == 1 else sch.SequentialLR(optimizer, schedulers, milestones=marks)


def build_scheduler(optimizer: Optimizer, name: str = "constant", *, total_steps: int | None = None,
                    warmup_steps: int | None = None, warmup_ratio: float | None = None,
                    warmup_start_factor: float = 1e-3, min_lr_ratio: float = 0.0, step_size: int = 1000,
                    milestones: Sequence[int] = (), gamma: float = 0.1, restart_steps: int = 1000,
                    restart_mult: int = 1, decay: str = "linear", decay_steps: int | None = None,
                    decay_ratio: float | None = 0.2, max_lr: float | None = None, pct_start: float = 0.3,
                    base_momentum: float = 0.85, max_momentum: float = 0.95, power: float = 1.0,
                    mode: str = "min", factor: float = 0.5, patience: int = 5) -> Any:
    """Build a named LR schedule on ``optimizer``.

    Args:
        name: constant, step, multistep, exponential, cosine, cosine_restarts, warmup_cosine, wsd,
            onecycle, polynomial or plateau.
        total_steps: length of training in scheduler steps; required by cosine, warmup_cosine, wsd,
            onecycle and polynomial (Lightning's ``estimated_stepping_batches`` when the training app builds it).
        warmup_steps: linear warm-up (from ``warmup_start_factor`` x LR) in steps (warmup_cosine, wsd, and any
            schedule via SequentialLR).
        warmup_ratio: the warm-up as a fraction of ``total_steps`` instead of ``warmup_steps``.
        warmup_start_factor: the LR at the start of the warm-up, as a fraction of the LR, in (0, 1].
        min_lr_ratio: the final LR as a fraction of the peak (cosine, warmup_cosine, wsd), in [0, 1].
        step_size: StepLR's period in steps.
        milestones: MultiStepLR's steps.
        gamma: the decay factor of StepLR, MultiStepLR and ExponentialLR (per step).
        restart_steps: CosineAnnealingWarmRestarts' T_0.
        restart_mult: CosineAnnealingWarmRestarts' T_mult.
        decay: WSD's cool-down shape: linear, cosine or 1-sqrt.
        decay_steps: WSD's cool-down length in steps.
        decay_ratio: WSD's cool-down length as a fraction of the steps after the warm-up (when ``decay_steps`` is None).
        max_lr: OneCycleLR's peak LR; defaults to the optimizer's LR.
        pct_start: OneCycleLR's fraction of the cycle spent raising the LR.
        base_momentum: OneCycleLR's lowest momentum (or Adam's beta1), reached at the peak LR: the momentum
            cycles opposite to the LR.
        max_momentum: OneCycleLR's highest momentum (or Adam's beta1).
        power: PolynomialLR's power.
        mode: ReduceLROnPlateau's mode, min or max (step it with the monitored metric).
        factor: ReduceLROnPlateau's factor.
        patience: ReduceLROnPlateau's patience in epochs.

    Raises:
        BpkitConfigError: unknown name, a missing total, warm-up longer than training, a ratio outside 0..1.
    """
    check_choice("scheduler.name", name, SCHEDULES)
    min_lr_ratio = check_float("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
    check_float("warmup_start_factor", warmup_start_factor, 0.0, 1.0, low_inclusive=False)
    if name in NEEDS_TOTAL:
        if total_steps is None:
            raise BpkitConfigError("total_steps", total_steps, f"the number of training steps for schedule '{name}'")
        check_int("total_steps", total_steps, minimum=1)
    lrs = [g["lr"] for g in optimizer.param_groups]

    if name == "constant":
        return sch.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if name == "step":
        return sch.StepLR(optimizer, step_size=check_int("step_size", step_size), gamma=check_float("gamma", gamma, 0.0))
    if name == "multistep":
        ms = [check_int("milestones", int(m)) for m in milestones]
        if not ms or sorted(ms) != ms:
            raise BpkitConfigError("milestones", list(milestones), "a non-empty increasing list of step numbers")
        return sch.MultiStepLR(optimizer, milestones=ms, gamma=check_float("gamma", gamma, 0.0))
    if name == "exponential":
        return sch.ExponentialLR(optimizer, gamma=check_float("gamma", gamma, 0.0, 1.0, low_inclusive=False))
    if name == "cosine_restarts":
        return sch.CosineAnnealingWarmRestarts(optimizer, T_0=check_int("restart_steps", restart_steps),
                                               T_mult=check_int("restart_mult", restart_mult),
                                               eta_min=lrs[0] * min_lr_ratio)
    if name == "plateau":
        check_choice("mode", mode, ("min", "max"))
        return sch.ReduceLROnPlateau(optimizer, mode=mode, factor=check_float("factor", factor, 0.0, 1.0, False, False),
                                     patience=check_int("patience", patience, minimum=0))
    if name == "polynomial":
        return sch.PolynomialLR(optimizer, total_iters=total_steps, power=check_float("power", power, 0.0))
    if name == "onecycle":
        check_float("pct_start", pct_start, 0.0, 1.0, False, False)
        if base_momentum > max_momentum:
            raise BpkitConfigError("base_momentum", base_momentum, f"<= max_momentum ({max_momentum})")
        peak = max_lr if max_lr is not None else lrs
        return sch.OneCycleLR(optimizer, max_lr=peak, total_steps=total_steps, pct_start=pct_start,
                              base_momentum=base_momentum, max_momentum=max_momentum, cycle_momentum=True)

    assert total_steps is not None
    warm = warmup_steps_from(total_steps, warmup_steps, warmup_ratio)
    first = _warmup(optimizer, warm, warmup_start_factor) if warm else None
    eta_min = lrs[0] * min_lr_ratio
    if name in ("cosine", "warmup_cosine"):
        return _then(optimizer, first, warm, [sch.CosineAnnealingLR(optimizer, T_max=total_steps - warm, eta_min=eta_min)],
                     [])
    # wsd: warm-up, stable at the peak, then a cool-down to min_lr_ratio
    check_choice("decay", decay, DECAYS)
    if decay_steps is not None:
        decay_ratio = None
    cool = warmup_steps_from(total_steps - warm, decay_steps, decay_ratio, key="decay") if (decay_steps or decay_ratio) \
        else 0
    if cool == 0:
        raise BpkitConfigError("decay_steps", decay_steps, "at least one cool-down step (or decay_ratio > 0)")
    stable = total_steps - warm - cool
    if decay == "linear":
        tail = sch.LinearLR(optimizer, start_factor=1.0, end_factor=max(min_lr_ratio, 1e-12), total_iters=cool)
    elif decay == "cosine":
        tail = sch.CosineAnnealingLR(optimizer, T_max=cool, eta_min=eta_min)
    else:
        tail = sch.LambdaLR(optimizer, OneMinusSqrtDecay(cool, min_lr_ratio))
    rest = [sch.ConstantLR(optimizer, factor=1.0, total_iters=0), tail] if stable > 0 else [tail]
    return _then(optimizer, first, warm, rest, [warm + stable] if stable > 0 else [])


def scheduler_kwargs() -> tuple[str, ...]:
    """The options :func:`build_scheduler` accepts (for config validation)."""
    import inspect

    return tuple(p for p in inspect.signature(build_scheduler).parameters if p not in ("optimizer", "name"))


def check_schedule_spec(spec: dict[str, Any], total_steps: int | None = None) -> None:
    """Validate a schedule config (``{"name": ..., "interval": ..., **options}``) before training starts,
    by building it on a throw-away optimizer."""
    spec = dict(spec)
    name = spec.pop("name", "constant")
    check_choice("scheduler.name", name, SCHEDULES)
    check_choice("scheduler.interval", spec.pop("interval", "step"), ("step", "epoch"))
    spec.pop("monitor", None)
    unknown = sorted(set(spec) - set(scheduler_kwargs()))
    if unknown:
        raise BpkitConfigError(f"scheduler.{unknown[0]}", spec[unknown[0]], "one of the options " + ", ".join(scheduler_kwargs()))
    if spec.get("total_steps") is None:
        spec["total_steps"] = total_steps
    try:
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), name, **spec)
    except BpkitConfigError as err:
        raise err.with_prefix("scheduler") from None
