"""Undo what a skipped step's forward pass did to the module's buffers.

Dropping a step's update (``p.grad = None``) keeps weights and optimizer state, but the forward pass
that produced the bad gradient has already moved BatchNorm's ``running_mean``/``running_var`` (NaN
when the batch had a NaN). A :class:`BufferGuard` copies every buffer when an optimizer window
starts (buffers are small: a few per normalisation layer) and puts them back when the step is
skipped. One guard per LightningModule is shared by every callback that can skip.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

import torch

from bpkit.callbacks._cadence import batch_step

_GUARDS: "WeakKeyDictionary[Any, BufferGuard]" = WeakKeyDictionary()


class BufferGuard:
    """Keeps a copy of a module's buffers from the start of the current optimizer window.

    Example::

        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> guard = BufferGuard()
        >>> guard.save(bn, key=0)
        >>> _ = bn(torch.full((4, 3), float("nan")))
        >>> guard.restore(bn)
        3
        >>> bool(torch.isfinite(bn.running_mean).all())
        True
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []
        self._key: Any = None
        self._module_id = 0  # an id, not the module: the guard lives in a WeakKeyDictionary keyed by it
        self._saves = 0

    def save(self, module: torch.nn.Module, key: Any) -> None:
        """Copy the buffers once per ``key`` (the first call of an optimizer window; later calls with the same
        key keep the first copy)."""
        if key == self._key:
            return
        self._key = key
        # walking the module tree costs more than copying a few small buffers: walk on the first save, then
        # every 64th (a buffer replaced by a new tensor in between is simply not restored: it is fresh anyway)
        if self._module_id != id(module) or self._saves % 64 == 0:
            self._module_id = id(module)
            buffers = [b for b in module.buffers() if b is not None]
            if len(buffers) != len(self._buffers) or any(a is not b for a, b in zip(buffers, self._buffers)):
                self._buffers = buffers
                self._saved = [torch.empty_like(b) for b in buffers]
        self._saves += 1
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._saved, self._buffers)

    def restore(self, module: torch.nn.Module) -> int:
        """Put the saved buffers back (those that are still the module's); returns how many were restored."""
        if not self._buffers:
            return 0
        current = {id(b) for b in module.buffers() if b is not None}
        pairs = [(b, s) for b, s in zip(self._buffers, self._saved) if id(b) in current]
        if pairs:
            with torch.no_grad():
                torch._foreach_copy_([b for b, _ in pairs], [s for _, s in pairs])
        return len(pairs)


def guard_for(module: Any) -> BufferGuard:
    """The one guard of this module (created on first use; held weakly by the module)."""
    guard = _GUARDS.get(module)
    if guard is None:
        guard = _GUARDS[module] = BufferGuard()
    return guard


def save_for_skip(trainer: Any, pl_module: Any) -> None:
    """Call in ``on_train_batch_start`` by every callback that may skip a step: copies the buffers at the first
    batch of each optimizer window (the micro-batches of one accumulation window share the key)."""
    # the micro-batches of one accumulation window share Lightning's logging step; the next window has the next one
    # (a module without buffers costs a key comparison: save() walks it only every 64th window)
    guard_for(pl_module).save(pl_module, (id(trainer), batch_step(trainer)))


def restore_after_skip(pl_module: Any) -> int:
    """Call when a step is skipped: the buffers go back to their values before the window's forward passes."""
    guard = _GUARDS.get(pl_module)
    return 0 if guard is None else guard.restore(pl_module)
