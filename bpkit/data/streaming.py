"""Consecutive windows over one long sequence, for truncated BPTT with the state carried across batches.

The long sequence (a text file read through a memory map, or any 1-D/2-D array) is cut into
``batch_size`` parallel streams; batch ``i`` holds window ``i`` of every stream, so batch ``i + 1``
continues each row of batch ``i`` and an RNN can carry its hidden state from one batch to the next
(``TBPTTModule.tbptt_carry_hiddens``). Only the current window is ever read into memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from bpkit.errors import BpkitConfigError, check_choice, check_float, check_int

DEFAULT_TEXT = Path(__file__).parent / "texts" / "backprop.txt"
VOCABS = ("text", "bytes")
_BLOCK = 1 << 16  # bytes per block when scanning a file for its vocabulary (bincount makes it 8x)


class StreamWindows:
    """An iterable of ``(x, y)`` batches: consecutive windows of ``batch_size`` parallel streams of one sequence.

    The sequence is trimmed to ``batch_size * world_size`` streams of ``L`` steps each; rank ``r`` reads streams
    ``r * batch_size`` to ``(r + 1) * batch_size``. Window ``i`` is ``x = stream[:, i*window : (i+1)*window]``
    (the last one shorter) and, without ``targets``, ``y`` is the same window shifted by one step (next-token
    prediction). Each batch is read from ``inputs`` when it is produced, so memory is ``O(batch_size * window)``
    however long the sequence (``inputs`` can be a ``numpy.memmap``).

    It is resumable: ``state_dict()``/``load_state_dict()`` hold the next window to train on, which Lightning
    saves in its checkpoints; ``progress`` (a callable returning the number of batches trained in this epoch)
    makes that exact despite Lightning fetching one batch ahead.

    Args:
        inputs: the sequence, shape ``(N,)`` (token ids) or ``(N, features)``; a tensor or numpy array/memmap.
        batch_size: parallel streams per batch (>= 1).
        window: time steps per batch (>= 1).
        targets: optional sequence aligned with ``inputs`` (``y`` is read at the same positions); default
            next-step prediction on ``inputs``.
        lookup: optional 1-D table applied to the raw values (e.g. bytes -> vocabulary ids).
        rank: this process's rank; world_size: number of processes (each reads its own streams).
        progress: optional callable returning batches already trained in the current epoch.

    Raises:
        BpkitConfigError: on a bad size, or a sequence too short for one window of every stream.

    Example::

        >>> import torch
        >>> batches = StreamWindows(torch.arange(41), batch_size=2, window=8)
        >>> x, y = next(iter(batches))
        >>> len(batches), x.tolist()[1], y.tolist()[1]
        (3, [20, 21, 22, 23, 24, 25, 26, 27], [21, 22, 23, 24, 25, 26, 27, 28])
    """

    def __init__(self, inputs: Any, batch_size: int, window: int, targets: Any = None, lookup: Any = None,
                 rank: int = 0, world_size: int = 1, progress: Callable[[], int] | None = None) -> None:
        self.batch_size = check_int("batch_size", batch_size)
        self.window = check_int("window", window)
        self.world_size = check_int("world_size", world_size)
        self.rank = check_int("rank", rank, minimum=0)
        if self.rank >= self.world_size:
            raise BpkitConfigError("rank", rank, f"an integer < world_size={world_size}")
        self.inputs, self.targets = inputs, targets
        if targets is not None and len(targets) != len(inputs):
            raise BpkitConfigError("targets", f"length {len(targets)}", f"the length of inputs ({len(inputs)})")
        self.lookup = None if lookup is None else torch.as_tensor(np.asarray(lookup))
        self.progress = progress
        streams = self.batch_size * self.world_size
        shift = 1 if targets is None else 0
        self.stream_len = len(inputs) // streams
        self.steps = self.stream_len - shift  # time steps of each stream that have a target
        if self.steps < 1:
            raise BpkitConfigError("inputs", f"a sequence of {len(inputs)} steps",
                                   f"at least {2 * streams} steps for batch_size={batch_size} x "
                                   f"world_size={world_size}")
        self._start = 0
        self._yielded = 0

    def __len__(self) -> int:
        return -(-self.steps // self.window)

    def _read(self, source: Any, rows: range, start: int, stop: int) -> torch.Tensor:
        parts = [source[r * self.stream_len + start: r * self.stream_len + stop] for r in rows]
        if isinstance(source, torch.Tensor):
            out = torch.stack(parts)
        else:
            out = torch.from_numpy(np.stack(parts))
        if self.lookup is not None:
            out = self.lookup[out.long()]
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start, self._start = (self._start if self._start < len(self) else 0), 0
        rows = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for i in range(start, len(self)):
            a, b = i * self.window, min((i + 1) * self.window, self.steps)
            x = self._read(self.inputs, rows, a, b)
            y = self._read(self.inputs, rows, a + 1, b + 1) if self.targets is None else \
                self._read(self.targets, rows, a, b)
            self._yielded = i + 1
            yield x, y

    def state_dict(self) -> dict[str, int]:
        return {"window": int(self.progress()) if self.progress is not None else self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._start = int(state.get("window", 0))


def scan_vocabulary(data: np.ndarray) -> np.ndarray:
    """The sorted distinct byte values of ``data``, counted block by block (memory bounded by the block)."""
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, len(data), _BLOCK):
        counts += np.bincount(np.asarray(data[start:start + _BLOCK]), minlength=256)
    return np.flatnonzero(counts)


class StreamingTextDataModule(pl.LightningDataModule):
    """Byte-level language modelling over one long text file, read in consecutive windows (truncated BPTT).

    The file is memory-mapped, never loaded: each batch reads ``batch_size`` windows of ``window + 1`` bytes.
    Training batches continue each other row by row (train with ``TBPTTTask(carry_hiddens=True)`` or
    ``TBPTTModule.tbptt_carry_hiddens = True``); the last ``val_fraction`` of the file is the validation and
    test stream. Tokens are bytes (a UTF-8 character outside ASCII is several tokens); the vocabulary is the
    bytes that occur in the file (``vocab="text"``) or all 256 (``vocab="bytes"``). The training loader is
    resumable: a checkpoint taken mid-epoch resumes at the next window.

    Args:
        text_file: path of the text; default a small text bundled with bpkit.
        batch_size: parallel streams (rows) per batch.
        window: time steps per batch; split further into chunks of ``truncated_bptt_steps`` by the module.
        val_fraction: tail of the file kept for validation/test, in (0, 0.5].
        vocab: ``text`` or ``bytes``.

    Raises:
        BpkitConfigError: on a missing file, a bad option, or a text too short for the streams.

    Example::

        >>> dm = StreamingTextDataModule(batch_size=4, window=32)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all()), dm.vocab_size <= 256
        (torch.Size([4, 32]), True, True)
    """

    target_kind = "sequence_multiclass"
    layouts = ("sequence",)
    default_loss = "cross_entropy"

    def __init__(self, text_file: str | None = None, batch_size: int = 32, window: int = 128,
                 val_fraction: float = 0.1, vocab: str = "text") -> None:
        super().__init__()
        path = Path(text_file).expanduser() if text_file else DEFAULT_TEXT
        if not path.is_file() or path.stat().st_size == 0:
            raise BpkitConfigError("text_file", str(text_file), "an existing, non-empty text file")
        self.path = path
        self.batch_size = check_int("batch_size", batch_size)
        self.window = check_int("window", window)
        self.val_fraction = check_float("val_fraction", val_fraction, 0.0, 0.5, low_inclusive=False)
        self.vocab = check_choice("vocab", vocab, VOCABS)
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self.cut = int(len(self.data) * (1 - self.val_fraction))
        need = 2 * self.batch_size
        if self.cut < need or len(self.data) - self.cut < need:
            raise BpkitConfigError("text_file", str(path), f"a text of at least {int(need / self.val_fraction) + need} "
                                   f"bytes for batch_size={batch_size}, val_fraction={val_fraction} "
                                   f"(it has {len(self.data)})")
        if self.vocab == "bytes":
            self.symbols = np.arange(256)
        else:
            self.symbols = scan_vocabulary(self.data)
        self.lookup = np.zeros(256, dtype=np.int64)
        self.lookup[self.symbols] = np.arange(len(self.symbols))

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def decode(self, ids: Any) -> str:
        """Token ids back to text (bytes decoded as UTF-8, invalid sequences replaced)."""
        return bytes(self.symbols[np.asarray(ids, dtype=np.int64)].astype(np.uint8).tolist()).decode("utf-8", "replace")

    def model_shapes(self) -> dict[str, Any]:
        v = self.vocab_size
        return {"vocab_size": v, "input_size": 32, "out_features": v, "num_classes": v}

    def use_layout(self, kind: str) -> None:
        if kind not in self.layouts:
            raise BpkitConfigError("data", type(self).__name__,
                                   f"data whose inputs can be laid out as '{kind}' for this model; "
                                   "this data offers sequence")

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _trained(self) -> int:
        # batches Lightning has run this epoch: the loader itself is one batch ahead (prefetching)
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _stream(self, data: np.ndarray, progress: Callable[[], int] | None = None) -> StreamWindows:
        rank, world = self._rank()
        return StreamWindows(data, self.batch_size, self.window, lookup=self.lookup, rank=rank, world_size=world,
                             progress=progress)

    def train_dataloader(self) -> StreamWindows:
        return self._stream(self.data[:self.cut], self._trained if self.trainer is not None else None)

    def val_dataloader(self) -> StreamWindows:
        return self._stream(self.data[self.cut:])

    def test_dataloader(self) -> StreamWindows:
        return self._stream(self.data[self.cut:])
