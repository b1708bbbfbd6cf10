"""Per-step rows of statistics kept on the device until the next read-back."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

MAX_ROWS = 4096
MAX_FLOATS = 1 << 22  # 16 MiB of float32 per buffer at most


class StepRows:
    """A device buffer that collects one row of statistics per step, read back in one copy later.

    Each row is split into parts of given shapes (e.g. ``(N,)`` per-tensor norms, then the ``()``
    total). The views of the parts of a row are made the first time the row is used and kept, so
    writing a step is just the copies into them: no allocation, no indexing, no host read. The rows and the steps they belong to are handed
    over together with :meth:`take` after the buffer was read back (for example with
    :class:`bpkit.stats.readback.Readback`, together with other tensors).

    Args:
        shapes: the shape of each part of a row (``()`` for a scalar).
        capacity: rows held before the buffer must be read back (bounded by 4096 rows and 16 MiB).

    Example::

        >>> import torch
        >>> rows = StepRows([(2,), ()], capacity=8)
        >>> for step, x in ((10, [3.0, 4.0]), (11, [6.0, 8.0])):
        ...     norms, total = rows.push(step, torch.device("cpu"))
        ...     _ = norms.copy_(torch.tensor(x)), total.copy_(norms.norm())
        >>> host = rows.pending().tolist()
        >>> rows.take()[0], host
        ([10, 11], [[3.0, 4.0, 5.0], [6.0, 8.0, 10.0]])
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], capacity: int) -> None:
        self.shapes = [tuple(int(n) for n in shape) for shape in shapes]
        self.widths = [math.prod(shape) for shape in self.shapes]
        self.width = sum(self.widths)
        self.capacity = max(1, min(int(capacity), MAX_ROWS, MAX_FLOATS // max(1, self.width)))
        self.buffer: torch.Tensor | None = None
        self._parts: list[tuple[torch.Tensor, ...]] = []
        self.steps: list[int] = []
        self.tags: list[Any] = []

    def __len__(self) -> int:
        return len(self.steps)

    def must_drain(self, device: torch.device) -> bool:
        """Rows are waiting and the next one does not fit (full, or the statistics moved device)."""
        return bool(self.steps) and (len(self.steps) >= self.capacity or self.buffer.device != device)

    def push(self, step: int, device: torch.device, tag: Any = None) -> tuple[torch.Tensor, ...]:
        """The views of the parts of the float32 row to fill for ``step``; ``tag``: host data kept with it."""
        if self.buffer is None or (not self.steps and self.buffer.device != device):
            self.buffer = torch.empty(self.capacity, self.width, dtype=torch.float32, device=device)
            self._parts = []
        if len(self.steps) >= self.capacity:
            raise RuntimeError("StepRows is full: read it back and take() the rows first")
        parts = self.next_row()
        self.steps.append(step)
        self.tags.append(tag)
        return parts

    def next_row(self) -> tuple[torch.Tensor, ...]:
        """The views of the next free row of the existing buffer, not yet taken: fill it, then :meth:`commit` it
        (nothing is recorded if filling fails)."""
        i = len(self.steps)
        if i == len(self._parts):  # made once per row of the buffer, then reused
            row = self.buffer[i]
            self._parts.append(tuple(part.view(shape) for part, shape in zip(row.split(self.widths), self.shapes)))
        return self._parts[i]

    def commit(self, step: int, tag: Any = None) -> None:
        """Take the row of :meth:`next_row` for ``step``."""
        self.steps.append(step)
        self.tags.append(tag)

    def pending(self) -> torch.Tensor | None:
        """The ``(rows, width)`` view of the rows written since the last :meth:`take`, or ``None``."""
        return self.buffer[: len(self.steps)] if self.steps else None

    def take(self) -> tuple[list[int], list[Any]]:
        """The steps and tags of the pending rows; the buffer is free again."""
        steps, tags = self.steps, self.tags
        self.steps, self.tags = [], []
        return steps, tags
