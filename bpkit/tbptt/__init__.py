"""Truncated backpropagation through time: a framework-free engine and Lightning 1.x's contract on top of it.

- :mod:`bpkit.tbptt.engine` (pure torch, no Lightning import): :class:`TruncatedBPTT` splits a batch into
  chunks along time, carries the hidden state detached across them and steps the optimizer per chunk;
  :func:`split_batch`, :func:`detach_hiddens`, :func:`time_length` are its building blocks. Use it from a
  plain PyTorch loop or Lightning Fabric.
- :mod:`bpkit.tbptt.module`: :class:`TBPTTModule` (``truncated_bptt_steps``,
  ``training_step(batch, batch_idx, hiddens)``, ``tbptt_split_batch``) and :class:`TBPTTTask`, loaded on
  first use so that importing the engine does not load Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bpkit.tbptt.engine import (
    TBPTTResult,
    TruncatedBPTT,
    backprop_multiple,
    chunk_length,
    detach_hiddens,
    parse_step_output,
    split_batch,
    time_length,
)

if TYPE_CHECKING:  # for type checkers and static doc tools; at run time loaded lazily by __getattr__
    from bpkit.tbptt.module import SCHEDULER_PER, TBPTTModule, TBPTTTask

__all__ = ["SCHEDULER_PER", "TBPTTModule", "TBPTTResult", "TBPTTTask", "TruncatedBPTT", "backprop_multiple",
           "chunk_length", "detach_hiddens", "parse_step_output", "split_batch", "time_length"]

_LIGHTNING_NAMES = ("SCHEDULER_PER", "TBPTTModule", "TBPTTTask")


def __getattr__(name: str) -> Any:
    # the Lightning part is imported on first use: `from bpkit.tbptt import TruncatedBPTT` stays Lightning-free
    if name in _LIGHTNING_NAMES:
        from bpkit.tbptt import module

        return getattr(module, name)
    raise AttributeError(f"module 'bpkit.tbptt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LIGHTNING_NAMES))
