"""Unfreezing during training, on Lightning's ``BaseFinetuning``: :class:`BackboneUnfreeze` (Lightning's
``BackboneFinetuning`` on bpkit's blocks: the head first, the backbone from an epoch on at a lower learning rate)
and :class:`GradualUnfreeze` (one block per epoch from the top, as ULMFiT).

Both find the model's blocks with :func:`bpkit.finetune.model_blocks` (on ``pl_module.model`` when the
LightningModule wraps one, as :class:`bpkit.task.BackpropTask` does, else on the LightningModule), so the
LightningModule needs no ``backbone`` attribute. Each unfrozen part gets its own **named** parameter group
(``backbone``, or the block's name: ``blocks.2``), so its learning rate is logged as its own ``lr/<name>`` series.
The optimizer must start with the trainable parameters only (``bpkit-train`` builds it so; in your own
``configure_optimizers``: ``filter(lambda p: p.requires_grad, self.parameters())``).

Unlike ``BaseFinetuning.unfreeze_and_add_param_group`` (which leaves out any parameter *equal in value* to one
already in the optimizer, e.g. two zero-initialised biases), parameters are matched by identity. A run resumed
from a checkpoint gets the same blocks unfrozen and the same parameter groups as the uninterrupted run.

The run record's ``unfreeze`` entries (the step and the blocks) are written by
:class:`bpkit.callbacks.weight_drift.WeightDrift`, which sees any change of ``requires_grad``, these callbacks' or
anyone else's.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks.finetuning import BackboneFinetuning, BaseFinetuning
from torch import nn
from typing_extensions import override

from bpkit.callbacks._base import BpkitCallback
from bpkit.errors import check_float, check_int
from bpkit.finetune import ModelBlocks, model_blocks, set_trainable


def inner_model(pl_module: Any) -> nn.Module:
    """The ``nn.Module`` whose blocks are meant: ``pl_module.model`` when it is one, else the LightningModule."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


class _BlockUnfreezing(BpkitCallback):
    """What both unfreezing callbacks share: the blocks, the unfreezing itself, and resuming."""

    metric_prefix = "finetune"

    def _init_blocks(self) -> None:
        self.unfrozen: list[str] = []
        self._blocks: ModelBlocks | None = None

    def blocks(self, pl_module: Any) -> ModelBlocks:
        if self._blocks is None:
            self._blocks = model_blocks(inner_model(pl_module))
        return self._blocks

    def _unfreeze(self, pl_module: Any, optimizer: Any, names: list[str], group: str, lr: float) -> None:
        """Make these blocks trainable and add their parameters (those not in the optimizer yet, by identity) as one
        parameter group ``group`` at ``lr``."""
        blocks = self.blocks(pl_module)
        params = blocks.params(names)
        set_trainable(params, True)
        present = {id(p) for g in optimizer.param_groups for p in g["params"]}
        new = [p for p in params if id(p) not in present]
        if new:
            optimizer.add_param_group({"name": group, "params": new, "lr": float(lr)})
        self.unfrozen.extend(n for n in names if n not in self.unfrozen)

    @override
    def freeze_before_training(self, pl_module: Any) -> None:
        blocks = self.blocks(pl_module)
        set_trainable(blocks.params(blocks.backbone), False)

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # BaseFinetuning puts back the parameter groups of a resumed run (names and LRs included); the blocks that
        # were unfrozen must also train again (setup() froze the whole backbone)
        BaseFinetuning.on_fit_start(self, trainer, pl_module)
        set_trainable(self.blocks(pl_module).params(self.unfrozen), True)

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._blocks = None
        self.reset_cadence()
        BaseFinetuning.setup(self, trainer, pl_module, stage)

    def _head_lr(self, optimizer: Any, pl_module: Any) -> float:
        head = self.blocks(pl_module).head
        for g in optimizer.param_groups:
            if g.get("name") == head:
                return float(g["lr"])
        return float(optimizer.param_groups[0]["lr"])

    def _own_state(self) -> dict[str, Any]:
        return {**BpkitCallback.state_dict(self), "unfrozen": list(self.unfrozen)}

    def _load_own_state(self, state_dict: dict[str, Any]) -> None:
        BpkitCallback.load_state_dict(self, state_dict)
        self.unfrozen = list(state_dict.get("unfrozen", []))


class GradualUnfreeze(_BlockUnfreezing, BaseFinetuning):
    """Gradual unfreezing (Howard & Ruder 2018, ULMFiT): the head trains alone until ``unfreeze_epoch``; then, at the
    start of every ``every_n_epochs``-th epoch, the next block below joins, each in its own parameter group named
    after the block, at ``lr_factor`` times the learning rate of the block above it.

    Args:
        unfreeze_epoch: the epoch at whose start the top block of the backbone is unfrozen.
        every_n_epochs: epochs between two unfreezings.
        lr_factor: a newly unfrozen block's LR relative to the block above it (ULMFiT's discriminative
            fine-tuning uses 1/2.6); 1.0: all at the head's LR.

    Raises:
        BpkitConfigError: a negative epoch, an interval below 1, a factor outside (0, 1].

    Example::

        >>> import lightning.pytorch as pl
        >>> from bpkit.callbacks.finetuning import GradualUnfreeze
        >>> cb = GradualUnfreeze(unfreeze_epoch=1, lr_factor=0.5)
        >>> trainer = pl.Trainer(callbacks=[cb], max_epochs=4, logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
    """

    who = "bpkit GradualUnfreeze"

    def __init__(self, unfreeze_epoch: int = 1, every_n_epochs: int = 1, lr_factor: float = 1.0) -> None:
        _BlockUnfreezing.__init__(self)
        BaseFinetuning.__init__(self)
        self.unfreeze_epoch = check_int("unfreeze_epoch", unfreeze_epoch, minimum=0)
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, minimum=1)
        self.lr_factor = check_float("lr_factor", lr_factor, 0.0, 1.0, low_inclusive=False)
        self._init_blocks()

    def schedule(self, pl_module: Any) -> dict[int, str]:
        """``{epoch: block}``: the block unfrozen at the start of each epoch."""
        top_down = list(reversed(self.blocks(pl_module).backbone))
        return {self.unfreeze_epoch + i * self.every_n_epochs: name for i, name in enumerate(top_down)}

    @override
    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
        for at, name in sorted(self.schedule(pl_module).items()):
            if at <= epoch and name not in self.unfrozen:  # <=: an epoch missed (resumed later) catches up
                above = [g for g in optimizer.param_groups if g.get("name") in self.unfrozen]
                lr = (float(above[-1]["lr"]) if above else self._head_lr(optimizer, pl_module)) * self.lr_factor
                self._unfreeze(pl_module, optimizer, [name], name, lr)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**BaseFinetuning.state_dict(self), **self._own_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        BaseFinetuning.load_state_dict(self, state_dict)
        self._load_own_state(state_dict)


class BackboneUnfreeze(_BlockUnfreezing, BackboneFinetuning):
    """Lightning's ``BackboneFinetuning`` on bpkit's blocks: the head trains alone until ``unfreeze_backbone_at_epoch``;
    then the whole backbone joins as one parameter group ``backbone`` at ``backbone_initial_ratio_lr`` times the
    head's LR (or ``backbone_initial_lr``), multiplied by ``lambda_func(epoch + 1)`` (default 2) every epoch after,
    until it reaches the head's LR (``should_align``).

    Args:
        unfreeze_backbone_at_epoch: the epoch at whose start the backbone is unfrozen.
        backbone_initial_ratio_lr: the backbone's initial LR as a fraction of the head's.
        backbone_initial_lr: the backbone's initial LR (overrides the ratio).
        lambda_func: the per-epoch multiplier of the backbone's LR after unfreezing.
        should_align: stop growing the backbone's LR at the head's.

    Example::

        >>> from bpkit.callbacks.finetuning import BackboneUnfreeze
        >>> BackboneUnfreeze(unfreeze_backbone_at_epoch=2).unfreeze_backbone_at_epoch
        2
    """

    who = "bpkit BackboneUnfreeze"

    def __init__(self, unfreeze_backbone_at_epoch: int = 10, backbone_initial_ratio_lr: float = 0.1,
                 backbone_initial_lr: float | None = None, lambda_func: Any = None, should_align: bool = True,
                 ) -> None:
        _BlockUnfreezing.__init__(self)
        kwargs: dict[str, Any] = {} if lambda_func is None else {"lambda_func": lambda_func}
        BackboneFinetuning.__init__(
            self, unfreeze_backbone_at_epoch=check_int("unfreeze_backbone_at_epoch", unfreeze_backbone_at_epoch, 0),
            backbone_initial_ratio_lr=check_float("backbone_initial_ratio_lr", backbone_initial_ratio_lr, 0.0, 1.0,
                                                  low_inclusive=False),
            backbone_initial_lr=None if backbone_initial_lr is None else
            check_float("backbone_initial_lr", backbone_initial_lr, 0.0, low_inclusive=False),
            should_align=should_align, **kwargs)
        self._init_blocks()

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        _BlockUnfreezing.on_fit_start(self, trainer, pl_module)  # no `backbone` attribute needed

    @override
    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
        backbone = self.blocks(pl_module).backbone
        if epoch >= self.unfreeze_backbone_at_epoch and not set(backbone) <= set(self.unfrozen):
            current = self._head_lr(optimizer, pl_module)
            lr = self.backbone_initial_lr if self.backbone_initial_lr is not None else \
                current * self.backbone_initial_ratio_lr
            self.previous_backbone_lr = lr
            self._unfreeze(pl_module, optimizer, backbone, "backbone", lr)
        elif epoch > self.unfreeze_backbone_at_epoch:  # Lightning's LR growth of the last group (the backbone's)
            BackboneFinetuning.finetune_function(self, pl_module, epoch, optimizer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**BackboneFinetuning.state_dict(self), **self._own_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        BackboneFinetuning.load_state_dict(self, state_dict)
        self._load_own_state(state_dict)
