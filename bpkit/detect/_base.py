"""Shared plumbing of the detectors: on-device state, its checkpoint form, and name formatting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class Detector:
    """A rule over on-device statistics. ``update`` never reads the host; ``pending()`` names the
    tensors to read back at log time and ``alerts(host, ...)`` turns that copy into ``Alert``s and
    clears the events it reported.

    Subclasses list their tensor state in ``_state_names`` and create it in ``_init_state``.
    """

    kind = ""
    _state_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._ready = False
        self._loaded: dict[str, torch.Tensor] | None = None

    def _init_state(self, device: torch.device, num: int) -> None:
        raise NotImplementedError

    def _ensure(self, device: torch.device, num: int = 0) -> None:
        if self._ready:
            return
        self._init_state(device, num)
        if self._loaded is not None:
            for name in self._state_names:
                if name in self._loaded:
                    current = getattr(self, name)
                    value = self._loaded[name].to(device=device, dtype=current.dtype)
                    if value.shape != current.shape:
                        raise ValueError(f"{type(self).__name__}: checkpointed {name} has shape {tuple(value.shape)}, "
                                         f"expected {tuple(current.shape)} (did the monitored parameters change?)")
                    setattr(self, name, value)
            self._loaded = None
        self._ready = True

    def state_dict(self) -> dict[str, Any]:
        if not self._ready:
            return dict(self._loaded or {})
        return {name: getattr(self, name).detach().clone() for name in self._state_names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = {k: torch.as_tensor(v) for k, v in state_dict.items()}
        self._ready = False

    def pending(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _take_events(self, host: Any) -> int:
        """Events counted since the last report (0 if none); clears the ``count``/``first_step`` state."""
        count = int(host["count"])
        if not self._ready or count == 0:
            return 0
        self.count.zero_()
        self.first_step.fill_(-1)
        return count


def join_names(names: Sequence[str], limit: int = 6) -> str:
    """``a, b, c`` or ``a, b, c, ... z (12 in all)`` for long lists."""
    names = list(names)
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit - 1]) + f", ... {names[-1]} ({len(names)} in all)"


def new_event(first_step: torch.Tensor, happened: torch.Tensor) -> torch.Tensor:
    """True where an event happens and none was recorded since the last read."""
    return happened & (first_step < 0)
