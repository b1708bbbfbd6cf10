"""Character-level language modelling over any text file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bpkit.data._base import TensorDataModule
from bpkit.errors import BpkitConfigError, check_float, check_int

DEFAULT_TEXT = Path(__file__).parent / "texts" / "backprop.txt"


class CharLMDataModule(TensorDataModule):
    """Next-character prediction: windows of ``seq_len`` character ids; targets shifted by one.

    The vocabulary is the sorted set of characters of the file. The last ``val_fraction`` of the
    text is validation (and test), so no window of the training part overlaps them.

    Args:
        text_file: path of a UTF-8 text file; default a small text bundled with bpkit.
        seq_len: characters per window.

    Example::

        >>> dm = CharLMDataModule(seq_len=32)
        >>> x, y = dm.split("train")[0]
        >>> x.shape, bool((x[1:] == y[:-1]).all())
        (torch.Size([32]), True)
    """

    target_kind = "sequence_multiclass"
    layouts = ("sequence",)

    def __init__(self, text_file: str | None = None, seq_len: int = 64, val_fraction: float = 0.1,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        path = Path(text_file).expanduser() if text_file else DEFAULT_TEXT
        if not path.is_file():
            raise BpkitConfigError("text_file", str(text_file), "an existing UTF-8 text file")
        self.text = path.read_text(encoding="utf-8")
        self.seq_len = check_int("seq_len", seq_len, minimum=2)
        self.val_fraction = check_float("val_fraction", val_fraction, 0.0, 0.5, low_inclusive=False)
        self.vocab = sorted(set(self.text))
        if len(self.text) < 4 * (self.seq_len + 1):
            raise BpkitConfigError("text_file", str(path), f"a text of at least {4 * (self.seq_len + 1)} characters "
                                   f"for seq_len={self.seq_len} (it has {len(self.text)})")

    def make(self, generator: torch.Generator):
        index = {c: i for i, c in enumerate(self.vocab)}
        ids = torch.tensor([index[c] for c in self.text], dtype=torch.long)
        cut = int(len(ids) * (1 - self.val_fraction))
        train, val = self._windows(ids[:cut]), self._windows(ids[cut:])
        n_val = len(val[0]) // 2
        x = torch.cat([train[0], val[0]])
        y = torch.cat([train[1], val[1]])
        return x, y, (len(train[0]), n_val, len(val[0]) - n_val)

    def _windows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = (len(ids) - 1) // self.seq_len
        x = ids[: n * self.seq_len].reshape(n, self.seq_len)
        y = ids[1: n * self.seq_len + 1].reshape(n, self.seq_len)
        return x, y

    def model_shapes(self) -> dict[str, Any]:
        v = len(self.vocab)
        return {"vocab_size": v, "input_size": 32, "out_features": v, "num_classes": v}
