"""WeightDrift: how far fine-tuning moves each block from its pretrained weights, and when blocks are unfrozen."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from bpkit.callbacks import _sink
from bpkit.callbacks._base import BpkitCallback
from bpkit.callbacks.finetuning import inner_model
from bpkit.finetune import model_blocks
from bpkit.stats.drift import BlockDrift
from bpkit.record import ENTRY_UNFREEZE

"""The run record's entry type of an unfreezing event (to move into :mod:`bpkit.record`)."""


class WeightDrift(BpkitCallback):
    r"""Per-block weight drift ``drift/<block>`` = :math:`\lVert w - w_0\rVert / \lVert w_0\rVert`, and an
    ``unfreeze`` entry in the run record at every step where blocks start training.

    ``w_0`` is the model's weights at the start of the first fit (in ``setup``, before a checkpoint is restored):
    for ``bpkit-train pretrained=...`` the pretrained weights. It is saved in checkpoints, so a resumed run measures
    from the same weights. Blocks are :func:`bpkit.finetune.model_blocks`' (on ``pl_module.model`` when the
    LightningModule wraps one). The drifts are computed on the device at log steps only (a few fused kernels) and
    logged, like every bpkit statistic, at the step of the batch's ``train/loss``.

    The trainable blocks (a block is trainable when any of its tensors has ``requires_grad``) are compared before
    every training batch (attribute reads, no kernel); when blocks became trainable, the run record gets one entry
    ``{"type": "unfreeze", "step": <the step of the first batch they train on>, "data": {"blocks": [...newly
    trainable], "trainable": [...], "frozen": [...still frozen], "epoch": <epoch>, "params": [<parameter names>]}}``.
    Any unfreezing is seen: :class:`~bpkit.callbacks.finetuning.GradualUnfreeze`, Lightning's
    ``BackboneFinetuning``, or the user's own code.

    Args:
        log_every_n_steps: the interval of ``drift/*`` (default: the Trainer's ``log_every_n_steps``).

    Example::

        >>> import lightning.pytorch as pl
        >>> from bpkit.callbacks.weight_drift import WeightDrift
        >>> trainer = pl.Trainer(callbacks=[WeightDrift()], max_steps=1, logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
    """

    who, metric_prefix = "bpkit WeightDrift", "drift"

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__(log_every_n_steps)
        self.drift: BlockDrift | None = None
        self.events: list[dict[str, Any]] = []
        self._params: list[Any] = []
        self._block_names: list[str] = []
        self._param_block: list[int] = []
        self._param_names: list[str] = []
        self._signature: tuple[bool, ...] | None = None
        self._trainable: list[str] | None = None
        self._restored: dict[str, Any] | None = None

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.reset_cadence()
        blocks = model_blocks(inner_model(pl_module))
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self._block_names = blocks.names
        self._params, tags, self._param_block, self._param_names = [], [], [], []
        for i, (name, ps) in enumerate(blocks.blocks):
            for _, p in ps:
                self._params.append(p)
                tags.append(name)
                self._param_block.append(i)
                self._param_names.append(names.get(id(p), "?"))
        self.drift = BlockDrift(self._params, tags)  # the weights before any checkpoint is restored
        self._signature = None
        if self._restored is not None:
            self._apply_restored()

    def _apply_restored(self) -> None:
        state, self._restored = self._restored, None
        if self.drift is not None and "reference" in state:
            self.drift.load_state_dict({"reference": state["reference"]})
        if state.get("trainable") is not None:
            self._trainable = list(state["trainable"])

    def _trainable_blocks(self) -> list[str]:
        on = [False] * len(self._block_names)
        for p, b in zip(self._params, self._param_block):
            on[b] = on[b] or p.requires_grad
        return [n for n, t in zip(self._block_names, on) if t]

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._params:
            return
        signature = tuple(p.requires_grad for p in self._params)
        if signature == self._signature:
            return
        self._signature = signature
        trainable = self._trainable_blocks()
        before = self._trainable
        self._trainable = trainable
        if before is None:  # the first batch of the run: the starting point, not an event
            return
        new = [b for b in trainable if b not in before]
        if not new:
            return
        params = [n for n, p, b in zip(self._param_names, self._params, self._param_block)
                  if self._block_names[b] in new and p.requires_grad]
        entry = {"blocks": new, "trainable": trainable,
                 "frozen": [b for b in self._block_names if b not in trainable],
                 "epoch": int(trainer.current_epoch), "params": params}
        step = self.batch_step(trainer)
        self.events.append({"step": step, **entry})
        _sink.log_record(trainer, ENTRY_UNFREEZE, step, entry)
        _sink.log_scalars(trainer, {"drift/trainable_blocks": float(len(trainable))}, step)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.drift is None or not self.ends_window(trainer, pl_module) or not self.is_log_step(trainer):
            return
        values = self.drift.compute(self._params).tolist()  # a log step: the one read of this interval
        _sink.log_scalars(trainer, {f"drift/{name}": v for name, v in zip(self.drift.names, values)},
                          self.batch_step(trainer))

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "trainable": self._trainable, "events": list(self.events)}
        if self.drift is not None:
            state.update(self.drift.state_dict())
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.events = list(state_dict.get("events", []))
        self._restored = dict(state_dict)
        if self.drift is not None:  # restored after setup (Lightning's order): apply now
            self._apply_restored()
