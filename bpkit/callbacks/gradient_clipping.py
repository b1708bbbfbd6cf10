"""GradientClipping: clip (or skip) each optimizer step's gradients with a named policy, and log what it did."""

from __future__ import annotations

import math
import statistics
import warnings
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from typing_extensions import override

import lightning.pytorch as pl

from bpkit.alert import Alert
from bpkit.callbacks import _buffers, _sink
from bpkit.callbacks._base import BpkitCallback
from bpkit.callbacks.gradient_monitor import GradientMonitor
from bpkit.clip import POLICIES, ClipPolicy, make_policy
from bpkit.probe.gradient import StepNorms
from bpkit.record import ENTRY_CLIP_SUMMARY, WHERE_TOTAL_NORM
from bpkit.errors import BpkitConfigError, check_choice
from bpkit.stats import norms as _norms
from bpkit.stats.readback import readback
from bpkit.stats.sharded import ShardReduce, coalesce_grads_


class GradientClipping(BpkitCallback):
    """Clip gradients with one of bpkit's policies, in automatic and manual optimization.

    Runs in ``on_before_optimizer_step``: after AMP unscaling, once per optimizer step under gradient
    accumulation, and also in manual optimization (where ``Trainer(gradient_clip_val=...)`` is not
    allowed), so truncated BPTT can clip too. When the Trainer also has a :class:`~bpkit.callbacks.GradientMonitor`
    (before or after this callback in the list), the monitor measures the step's gradients before they are clipped
    and this callback reuses its total norm; otherwise the norm is computed in one fused pass. Nothing is read to the host except on logging steps and once at the end of
    training, and for ``policy="skip"`` one 1-element read per step to decide whether to drop the update
    (a skipped step also puts back the module's buffers, e.g. BatchNorm running statistics, as they were
    before that step's forward pass). Parameters added to the optimizer mid-run (``BackboneFinetuning``,
    ``optimizer.add_param_group``) or unfrozen (``requires_grad`` turned on) are clipped from their first
    gradient on.

    An intervention, not a monitor: it changes the gradients where its rule fires. ``zclip`` (no cap by
    default) and ``skip`` act on outliers only and leave calm steps exactly as they are; ``norm`` and
    ``value`` act wherever the bound you chose is exceeded, and ``agc``/``autoclip`` at their published
    defaults act on most steps by design. The callback counts the steps it clipped (on the device), and at
    the end of training writes a ``clip_summary`` entry to the run record and warns when it clipped more
    than half of at least 20 steps: a bound below the typical gradient norm rescales every update.

    Logged at the steps where Lightning logs the batch's ``train/*`` metrics (every ``log_every_n_steps``
    batches, default: the Trainer's), through bpkit's sink: ``clip/norm_pre`` and ``clip/norm_post`` (total
    gradient norm of that step before/after clipping), ``clip/threshold`` (the norm, value or AGC factor above
    which the policy acts on that step), ``clip/clipped`` (fraction of optimizer steps since the last log that
    were clipped or skipped) and ``clip/clipped_total`` (the same over the whole run). With several optimizers
    the keys end in ``/opt{i}``.

    Args:
        policy: ``norm``, ``value``, ``agc``, ``autoclip``, ``zclip`` or ``skip`` (see :mod:`bpkit.clip`).
        log_every_n_steps: logging interval in batches (>= 1), Lightning's rule; ``None`` uses the Trainer's;
            0 logs no statistics (the end-of-run summary is still written).
        **policy_kwargs: the policy's arguments, e.g. ``max_norm=1.0`` for ``norm``.

    Raises:
        BpkitConfigError: on an unknown policy or a bad policy argument (at construction), and at setup when
            the Trainer also clips (``gradient_clip_val``) or AGC is given a model without parameters.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from bpkit.callbacks import GradientMonitor, GradientClipping
        >>> trainer = Trainer(callbacks=[GradientMonitor(), GradientClipping("zclip", z_thresh=2.5)], logger=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
    """

    who, metric_prefix = "bpkit GradientClipping", "clip"
    #: a run clipped "most steps" when more than this fraction of at least ``MIN_STEPS_TO_WARN`` steps was clipped
    MOST_STEPS = 0.5
    MIN_STEPS_TO_WARN = 20
    #: how many pre-clip norms of log steps are kept for the typical (median) norm
    KEEP_NORMS = 1024

    def __init__(self, policy: str = "norm", log_every_n_steps: int | None = None, **policy_kwargs: Any) -> None:
        self.policy = check_choice("policy", policy, POLICIES)
        # plain containers (Hydra passes ListConfig), so that the checkpointed state stays plain Python
        self.policy_kwargs = {k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
                              for k, v in policy_kwargs.items()}
        make_policy(policy, **policy_kwargs)  # validate every argument now, not at the first step
        super().__init__(log_every_n_steps)
        self._policies: dict[int, ClipPolicy] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        self._steps: dict[int, int] = {}  # optimizer steps seen, per optimizer
        self._since: dict[int, int] = {}  # steps since the last log
        self._clipped: dict[int, torch.Tensor] = {}  # on-device count of clipped steps over the whole run
        self._clipped_at_log: dict[int, int] = {}  # that count as read at the last log step (host)
        self._log_norms: dict[int, deque[float]] = {}  # pre-clip total norms read at log steps (host)
        self._bound: dict[int, torch.Tensor | float] = {}  # the last step's threshold (a device tensor, unread)
        self._orders: dict[int, tuple[tuple, list[torch.Tensor]]] = {}
        self._summary_due = False  # steps were taken in this fit and the summary is not written yet

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(policy=self.policy)

    def policy_for(self, index: int = 0) -> ClipPolicy | None:
        """The policy object of optimizer ``index`` (created at its first step), for inspection."""
        return self._policies.get(index)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if clip_val is not None and clip_val != 0:
            raise BpkitConfigError(
                "Trainer(gradient_clip_val)", clip_val,
                "None when the GradientClipping callback is used (two clippers would act on the same gradients); "
                "remove it and use GradientClipping('norm', max_norm=...) or GradientClipping('value', clip_value=...)")
        self._orders = {}
        self.reset_cadence()
        if self.policy == "agc":  # fail now on a model without parameters or a bad exclude name
            make_policy(self.policy, **self.policy_kwargs).bind(pl_module)

    def _policy(self, index: int, pl_module: "pl.LightningModule") -> ClipPolicy:
        policy = self._policies.get(index)
        if policy is None:
            policy = make_policy(self.policy, **self.policy_kwargs).bind(pl_module)
            if index in self._pending:
                policy.load_state_dict(self._pending.pop(index))
            self._policies[index] = policy
        return policy

    def _order(self, pl_module: "pl.LightningModule", optimizer: Any) -> list[torch.Tensor]:
        """Every parameter of ``optimizer`` (frozen ones too: the per-step ``p.grad is not None`` filter picks the
        ones with a gradient), in the module's order, as GradientMonitor measures them, so that its norms can be reused.

        Rebuilt when the optimizer's parameter groups change (``add_param_group``, a group's list replaced or
        grown): the key costs a loop over the groups, not over the parameters.
        """
        key = tuple((id(group["params"]), len(group["params"])) for group in optimizer.param_groups)
        cached = self._orders.get(id(optimizer))
        if cached is not None and cached[0] == key:
            return cached[1]
        in_opt = [p for group in optimizer.param_groups for p in group["params"]]
        ids = {id(p) for p in in_opt}
        order = [p for p in pl_module.parameters() if id(p) in ids]
        seen = {id(p) for p in order}
        order += [p for p in in_opt if id(p) not in seen]
        self._orders[id(optimizer)] = (key, order)
        return order

    @staticmethod
    def _shared_norms(trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> list[StepNorms]:
        """The norms every GradientMonitor of the Trainer computed for this step. Asking makes a monitor placed
        after this callback compute them now, on the gradients before clipping (and act first: a step it skips
        has no gradients left to clip), so the order of the callbacks does not matter."""
        shared = []
        for callback in getattr(trainer, "callbacks", None) or []:
            if isinstance(callback, GradientMonitor):
                entry = callback.step_norms(trainer, pl_module, optimizer)
                if entry is not None:
                    shared.append(entry)
        return shared

    @staticmethod
    def _total_norm(shared: list[StepNorms], params: list[torch.Tensor], grads: list[torch.Tensor],
                    norm_type: float) -> tuple[torch.Tensor, float | None]:
        """The total norm on the device (a monitor's when it covers exactly these gradients), and on the host when
        the monitor already read it this step."""
        if shared:
            ids = tuple(id(p) for p in params)
            for entry in shared:
                if entry.norm_type == float(norm_type) and entry.param_ids == ids:
                    return entry.total, entry.total_host
        return _norms.total_norm(_norms.foreach_norms(grads, norm_type), norm_type), None

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.reset_cadence()
        self.log_interval(trainer)  # warns now (once per Trainer) when log_every_n_steps=0 turns logging off
        self._summary_due = False

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self.policy == "skip":  # a skipped step puts back what its forward pass did to the buffers
            _buffers.save_for_skip(trainer, pl_module)

    @override
    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: torch.optim.Optimizer) -> None:
        shared = self._shared_norms(trainer, pl_module, optimizer)
        params = [p for p in self._order(pl_module, optimizer) if p.grad is not None]
        if not params:
            return
        coalesce_grads_(params)
        full_grads = [p.grad for p in params]
        sharded = ShardReduce.of(full_grads)
        index = self.optimizer_index(trainer, optimizer)
        policy = self._policy(index, pl_module)
        # policies act on what this rank holds: FSDP2 local shards, sparse gradients' values (views)
        grads = policy.pieces(full_grads)
        if sharded is not None and self.policy == "agc":
            raise BpkitConfigError("policy", "agc", "a policy other than agc with sharded (FSDP) parameters: "
                                                    "AGC's per-unit norms would need the full tensors")
        self._steps[index] = self._steps.get(index, 0) + 1
        self._summary_due = True
        log_now = self.is_log_step(trainer)

        total, total_host = None, None
        if policy.needs_total_norm or log_now:
            total, total_host = self._total_norm(shared, params, full_grads, policy.norm_type)
        policy.total_host = total_host
        # a skip decided by another rank must leave this rank's statistics as that rank's: keep them to redo
        before = policy.state_dict() if self.policy == "skip" and trainer.world_size > 1 else None
        result = policy.apply(params, grads, total if policy.needs_total_norm else None)

        flag = result.clipped
        if sharded is not None and not policy.needs_total_norm:  # value clipping: clipped on any shard
            flag = sharded.any(result.clipped)
        if result.skip is not None:
            skipped, here = self._maybe_skip(trainer, pl_module, params, result)
            if skipped and not here and before is not None:
                # another rank skipped: fold this step as a skipped one (a non-finite norm is never folded)
                policy.load_state_dict(before)
                policy.apply(params, [], torch.full_like(result.norm_pre, float("nan")))
            flag = torch.full_like(result.skip, skipped)  # the decision taken (across ranks), from the host

        count = self._clipped.get(index)
        if count is None or count.device != flag.device:
            count = torch.zeros((), dtype=torch.int64, device=flag.device) if count is None else count.to(flag.device)
            self._clipped[index] = count
        count.add_(flag.to(torch.int64))  # the run's count of clipped steps: one tiny kernel, no read
        self._bound[index] = result.threshold
        self._since[index] = self._since.get(index, 0) + 1
        if log_now:
            self._log(trainer, index, result, total, full_grads, policy.norm_type)

    def _maybe_skip(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", params: list[torch.Tensor],
                    result: Any) -> tuple[bool, bool]:
        """(the decision agreed by all ranks, this rank's own wish)."""
        # the one host read of this policy: the decision, packed with what the alert needs
        values = readback({"skip": result.skip, "norm": result.norm_pre, "threshold": result.threshold})
        here = decision = bool(values["skip"])
        if trainer.world_size > 1:
            decision = trainer.strategy.reduce_boolean_decision(decision, all=False)
        if not decision:
            return False, here
        for p in params:
            p.grad = None  # torch optimizers skip parameters without a gradient: no update, no state change
        _buffers.restore_after_skip(pl_module)  # and the forward pass's changes to buffers (BatchNorm) are undone
        norm, threshold = float(values["norm"]), float(values["threshold"])
        if not here:
            alert = Alert("spike", self.batch_step(trainer), WHERE_TOTAL_NORM, norm, threshold,
                          f"another rank's gradient norm was non-finite or an outlier (this rank's: {norm:.4g}): "
                          "this update was skipped on every rank")
        elif math.isfinite(norm):
            alert = Alert("spike", self.batch_step(trainer), WHERE_TOTAL_NORM, norm, threshold,
                          f"gradient norm {norm:.4g} is an outlier (threshold {threshold:.4g}): this update was skipped")
        else:
            alert = Alert("nonfinite", self.batch_step(trainer), WHERE_TOTAL_NORM, norm, threshold,
                          f"gradient norm is {norm}: this update was skipped")
        self.emit(trainer, [alert])
        return True, here

    def _log(self, trainer: "pl.Trainer", index: int, result: Any, total: torch.Tensor | None,
             grads: list[torch.Tensor], norm_type: float) -> None:
        norm_pre = result.norm_pre if result.norm_pre is not None else total
        norm_post = result.norm_post
        if norm_post is None:
            norm_post = _norms.total_norm(_norms.foreach_norms(grads, norm_type), norm_type)
        values = readback({"norm_pre": norm_pre, "norm_post": norm_post, "threshold": result.threshold,
                           "count": self._clipped[index]})
        count = int(values["count"])
        since = self._since[index]
        fraction = (count - self._clipped_at_log.get(index, 0)) / since
        self._clipped_at_log[index] = count
        self._since[index] = 0
        pre = float(values["norm_pre"])
        if math.isfinite(pre):
            self._log_norms.setdefault(index, deque(maxlen=self.KEEP_NORMS)).append(pre)
        scalars = {"norm_pre": pre, "norm_post": float(values["norm_post"]), "threshold": float(values["threshold"]),
                   "clipped": fraction, "clipped_total": count / max(self._steps[index], 1)}
        suffix = f"/opt{index}" if self.several_optimizers(trainer) else ""
        _sink.log_scalars(trainer, {f"clip/{k}{suffix}": v for k, v in scalars.items()}, self.batch_step(trainer))

    # ---------------------------------------------------------------- the end-of-run summary

    def _bound_text(self, bound: float | None) -> str:
        kwargs = make_policy(self.policy, **self.policy_kwargs).config()
        b = "unknown" if bound is None else f"{bound:.4g}"
        if self.policy == "autoclip":
            return f"the {kwargs['percentile']:g}th percentile of recent norms, {b}"
        if self.policy == "agc":
            return f"clip_factor={kwargs['clip_factor']:g} of each unit's weight norm"
        if self.policy == "value":
            return f"clip_value={kwargs['clip_value']:g} per element"
        if self.policy == "norm" or (self.policy == "zclip" and kwargs.get("max_norm") is not None
                                     and bound is not None and bound >= kwargs["max_norm"]):
            return f"max_norm={kwargs['max_norm']:g}"
        return b

    def _message(self, steps: int, clipped: int, typical: float | None, bound: float | None) -> str:
        """The plain warning of a run that clipped (or skipped) most of its steps."""
        pct = round(100 * clipped / steps)
        typ = "unknown: no log step" if typical is None else f"{typical:.4g}"
        head = f"bpkit GradientClipping({self.policy}): "
        if self.policy == "skip":
            return (head + f"skipped {pct}% of {steps} steps: the threshold ({self._bound_text(bound)}) is below the "
                    f"typical gradient norm ({typ}) or the gradients are non-finite; most updates are dropped, not "
                    "only spikes. Raise z_thresh, find where the non-finite values start (GradientMonitor), or remove "
                    "the callback.")
        remedy = {
            "norm": "Raise max_norm, use policy='zclip' without a cap, or remove the callback.",
            "zclip": "Raise max_norm or set max_norm=None (the z-score rule alone acts on spikes only), or remove "
                     "the callback.",
            "value": "Raise clip_value, use policy='zclip' without a cap, or remove the callback.",
            "agc": "Raise clip_factor (the published 0.01 suits batches of thousands), use policy='zclip' without a "
                   "cap, or remove the callback.",
            "autoclip": "Raise percentile (the published 10 clips about 90% of steps by design), use policy='zclip' "
                        "without a cap, or remove the callback.",
        }[self.policy]
        typical_of = "gradient-to-weight ratio" if self.policy == "agc" else \
            "largest gradient element" if self.policy == "value" else "gradient norm"
        typ_text = f" (total norm {typ})" if self.policy in ("agc", "value") else f" ({typ})"
        return (head + f"clipped {pct}% of {steps} steps: the bound ({self._bound_text(bound)}) is below the typical "
                f"{typical_of}{typ_text}; this rescales every update, not only spikes. {remedy}")

    def _write_summary(self, trainer: "pl.Trainer") -> None:
        """One ``clip_summary`` record entry per optimizer (one host read for all), and the warning when most
        steps were clipped."""
        if not self._summary_due:
            return
        self._summary_due = False
        indices = sorted(i for i in self._steps if self._steps[i] > 0)
        if not indices:
            return
        tensors = {f"count{i}": self._clipped[i] for i in indices if i in self._clipped}
        tensors.update({f"bound{i}": torch.as_tensor(self._bound[i]) for i in indices
                        if isinstance(self._bound.get(i), torch.Tensor)})
        values = readback(tensors) if tensors else {}
        step = self.batch_step(trainer)
        for i in indices:
            steps = self._steps[i]
            clipped = int(values[f"count{i}"]) if f"count{i}" in values else 0
            bound = float(values[f"bound{i}"]) if f"bound{i}" in values else self._bound.get(i)
            bound = bound if isinstance(bound, float) and math.isfinite(bound) else None
            norms = self._log_norms.get(i)
            typical = float(statistics.median(norms)) if norms else None
            fraction = clipped / steps
            message = self._message(steps, clipped, typical, bound) if fraction > self.MOST_STEPS else None
            data = {"policy": self.policy, "optimizer": i, "steps": steps, "clipped": clipped, "fraction": fraction,
                    "typical_norm": typical, "bound": bound, "message": message}
            _sink.log_record(trainer, ENTRY_CLIP_SUMMARY, step, data)
            if message is not None and steps >= self.MIN_STEPS_TO_WARN and getattr(trainer, "is_global_zero", True):
                warnings.warn(message, UserWarning, stacklevel=2)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._write_summary(trainer)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._write_summary(trainer)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._write_summary(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        policies = {i: p.state_dict() for i, p in self._policies.items()}
        policies.update({i: s for i, s in self._pending.items() if i not in policies})
        return {
            **super().state_dict(),
            "policy": self.policy,
            "policy_kwargs": dict(self.policy_kwargs),
            "policies": policies,
            "steps": dict(self._steps),
            "since": dict(self._since),
            "clipped_total": {i: t.detach().clone() for i, t in self._clipped.items()},
            "clipped_at_log": dict(self._clipped_at_log),
            "log_norms": {i: list(d) for i, d in self._log_norms.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("policy", self.policy) != self.policy:
            raise BpkitConfigError("policy", self.policy,
                                   f"{state_dict['policy']!r}, the policy of the checkpoint being resumed")
        self._policies = {}
        self._pending = dict(state_dict.get("policies", {}))
        self._steps = dict(state_dict.get("steps", {}))
        self._since = dict(state_dict.get("since", {}))
        if "clipped_total" in state_dict:
            self._clipped = {i: torch.as_tensor(t).to(torch.int64).clone()
                             for i, t in state_dict["clipped_total"].items()}
            self._clipped_at_log = dict(state_dict.get("clipped_at_log", {}))
        else:  # a checkpoint of an older bpkit: it kept the count since the last log only
            self._clipped = {i: torch.as_tensor(t).round().to(torch.int64)
                             for i, t in state_dict.get("clipped", {}).items()}
            self._clipped_at_log = {}
        self._log_norms = {i: deque(v, maxlen=self.KEEP_NORMS) for i, v in state_dict.get("log_norms", {}).items()}
        super().load_state_dict(state_dict)
