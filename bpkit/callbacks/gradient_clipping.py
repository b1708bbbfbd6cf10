"""GradientClipping: clip (or skip) each optimizer step's gradients with a named policy, and log what it did."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from typing_extensions import override

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback

from bpkit.alert import Alert
from bpkit.callbacks import _sink, _step_cache
from bpkit.clip import POLICIES, ClipPolicy, make_policy
from bpkit.errors import BpkitConfigError, check_choice, check_int
from bpkit.stats import norms as _norms
from bpkit.stats.readback import readback
from bpkit.stats.sharded import ShardReduce, coalesce_grads_


class GradientClipping(Callback):
    r"""Clip gradients with one of bpkit's policies, in automatic and manual optimization.

    Runs in ``on_before_optimizer_step``: after AMP unscaling, once per optimizer step under gradient
    accumulation, and also in manual optimization (where ``Trainer(gradient_clip_val=...)`` is not
    allowed), so truncated BPTT can clip too. When a :class:`~bpkit.callbacks.GradientMonitor` placed
    before it has published this step's norms, the total norm is reused, not recomputed; otherwise it
    is computed in one fused pass. Nothing is read to the host except on logging steps, and for
    ``policy="skip"`` one 1-element read per step to decide whether to drop the update.

    Logged every ``log_every_n_steps`` optimizer steps (default: the Trainer's), through bpkit's sink:
    ``clip/norm_pre`` and ``clip/norm_post`` (total gradient norm of that step before/after clipping),
    ``clip/threshold`` (the norm, value or AGC factor above which the policy acts on that step) and
    ``clip/clipped`` (fraction of optimizer steps since the last log that were clipped or skipped). With
    several optimizers the keys end in ``/opt{i}``.

    Args:
        policy: ``norm``, ``value``, ``agc``, ``autoclip``, ``zclip`` or ``skip`` (see :mod:`bpkit.clip`).
        log_every_n_steps: logging interval in optimizer steps (>= 1); ``None`` uses the Trainer's; 0 logs nothing.
        \**policy_kwargs: the policy's arguments, e.g. ``max_norm=1.0`` for ``norm``.

    Raises:
        BpkitConfigError: on an unknown policy or a bad policy argument (at construction), and at setup when
            the Trainer also clips (``gradient_clip_val``) or AGC is given a model without parameters.

    Example::

        from lightning.pytorch import Trainer
        from bpkit.callbacks import GradientMonitor, GradientClipping

        trainer = Trainer(callbacks=[GradientMonitor(), GradientClipping("zclip", z_thresh=2.5)])
    """

    def __init__(self, policy: str = "norm", log_every_n_steps: int | None = None, **policy_kwargs: Any) -> None:
        self.policy = check_choice("policy", policy, POLICIES)
        # plain containers (Hydra passes ListConfig), so that the checkpointed state stays plain Python
        self.policy_kwargs = {k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
                              for k, v in policy_kwargs.items()}
        make_policy(policy, **policy_kwargs)  # validate every argument now, not at the first step
        if log_every_n_steps is not None:
            check_int("log_every_n_steps", log_every_n_steps, 0)
        self.log_every_n_steps = log_every_n_steps
        self.alerts: list[Alert] = []
        self._policies: dict[int, ClipPolicy] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        self._steps: dict[int, int] = {}  # optimizer steps seen, per optimizer
        self._since: dict[int, int] = {}  # steps since the last log
        self._clipped: dict[int, torch.Tensor] = {}  # on-device count of clipped steps since the last log
        self._orders: dict[int, list[torch.Tensor]] = {}

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
        # the module's parameter order (as GradientMonitor publishes), so that the step cache hits
        order = self._orders.get(id(optimizer))
        if order is None:
            in_opt = [p for group in optimizer.param_groups for p in group["params"]]
            ids = {id(p) for p in in_opt}
            order = [p for p in pl_module.parameters() if id(p) in ids]
            seen = {id(p) for p in order}
            order += [p for p in in_opt if id(p) not in seen]
            self._orders[id(optimizer)] = order
        return order

    def _every(self, trainer: "pl.Trainer") -> int:
        return trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps

    @staticmethod
    def _total_norm(trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any,
                    params: list[torch.Tensor], grads: list[torch.Tensor],
                    norm_type: float) -> tuple[torch.Tensor, float | None]:
        """The total norm on the device, and on the host when GradientMonitor already read it this step."""
        entry = _step_cache.lookup(pl_module, trainer, optimizer, params, norm_type)
        if entry is not None:
            return entry.total, entry.total_host
        return _norms.total_norm(_norms.foreach_norms(grads, norm_type), norm_type), None

    @override
    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: torch.optim.Optimizer) -> None:
        params = [p for p in self._order(pl_module, optimizer) if p.grad is not None]
        if not params:
            return
        coalesce_grads_(params)
        full_grads = [p.grad for p in params]
        sharded = ShardReduce.of(full_grads)
        index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)
        policy = self._policy(index, pl_module)
        # policies act on what this rank holds: FSDP2 local shards, sparse gradients' values (views)
        grads = policy.pieces(full_grads)
        if sharded is not None and self.policy == "agc":
            raise BpkitConfigError("policy", "agc", "a policy other than agc with sharded (FSDP) parameters: "
                                                    "AGC's per-unit norms would need the full tensors")
        self._steps[index] = self._steps.get(index, 0) + 1
        every = self._every(trainer)
        log_now = every > 0 and self._steps[index] % every == 0

        total, total_host = None, None
        if policy.needs_total_norm or log_now:
            total, total_host = self._total_norm(trainer, pl_module, optimizer, params, full_grads, policy.norm_type)
        policy.total_host = total_host
        # a skip decided by another rank must leave this rank's statistics as that rank's: keep them to redo
        before = policy.state_dict() if self.policy == "skip" and trainer.world_size > 1 else None
        result = policy.apply(params, grads, total if policy.needs_total_norm else None)

        flag = result.clipped.to(torch.float32)
        if sharded is not None and not policy.needs_total_norm:  # value clipping: clipped on any shard
            flag = sharded.any(result.clipped).to(torch.float32)
        if result.skip is not None:
            skipped, here = self._maybe_skip(trainer, params, result)
            if skipped and not here and before is not None:
                # another rank skipped: fold this step as a skipped one (a non-finite norm is never folded)
                policy.load_state_dict(before)
                policy.apply(params, [], torch.full_like(result.norm_pre, float("nan")))
            flag = torch.full_like(flag, float(skipped))  # the decision taken (across ranks), from the host

        count = self._clipped.get(index)
        self._clipped[index] = flag if count is None else count.to(flag.device) + flag
        self._since[index] = self._since.get(index, 0) + 1
        if log_now:
            self._log(trainer, index, result, total, full_grads, policy.norm_type)

    def _maybe_skip(self, trainer: "pl.Trainer", params: list[torch.Tensor], result: Any) -> tuple[bool, bool]:
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
        norm, threshold = float(values["norm"]), float(values["threshold"])
        if not here:
            alert = Alert("spike", int(trainer.global_step), "total gradient norm", norm, threshold,
                          f"another rank's gradient norm was non-finite or an outlier (this rank's: {norm:.4g}): "
                          "this update was skipped on every rank")
        elif math.isfinite(norm):
            alert = Alert("spike", int(trainer.global_step), "total gradient norm", norm, threshold,
                          f"gradient norm {norm:.4g} is an outlier (threshold {threshold:.4g}): this update was skipped")
        else:
            alert = Alert("nonfinite", int(trainer.global_step), "total gradient norm", norm, threshold,
                          f"gradient norm is {norm}: this update was skipped")
        self.alerts.append(alert)
        _sink.log_alert(trainer, alert)
        return True, here

    def _log(self, trainer: "pl.Trainer", index: int, result: Any, total: torch.Tensor | None,
             grads: list[torch.Tensor], norm_type: float) -> None:
        norm_pre = result.norm_pre if result.norm_pre is not None else total
        norm_post = result.norm_post
        if norm_post is None:
            norm_post = _norms.total_norm(_norms.foreach_norms(grads, norm_type), norm_type)
        fraction = self._clipped[index] / self._since[index]
        values = readback({"norm_pre": norm_pre, "norm_post": norm_post, "threshold": result.threshold,
                           "clipped": fraction})
        suffix = f"/opt{index}" if len(trainer.optimizers) > 1 else ""
        _sink.log_scalars(trainer, {f"clip/{k}{suffix}": float(v) for k, v in values.items()}, trainer.global_step)
        self._clipped[index] = torch.zeros_like(self._clipped[index])
        self._since[index] = 0

    @override
    def state_dict(self) -> dict[str, Any]:
        policies = {i: p.state_dict() for i, p in self._policies.items()}
        policies.update({i: s for i, s in self._pending.items() if i not in policies})
        return {
            "policy": self.policy,
            "policy_kwargs": dict(self.policy_kwargs),
            "policies": policies,
            "steps": dict(self._steps),
            "since": dict(self._since),
            "clipped": {i: t.detach().clone() for i, t in self._clipped.items()},
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
        self._clipped = dict(state_dict.get("clipped", {}))
