"""Recurrent networks whose hidden state can be carried across chunks (truncated BPTT)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bpkit.errors import BpkitConfigError, check_choice, check_float, check_int
from bpkit.models._common import INITS

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
OUTPUTS = ("last", "all")


class RNN(nn.Module):
    """A recurrent network (vanilla tanh/ReLU RNN, LSTM or GRU) with a linear head.

    ``forward(x, hidden=None)`` returns ``(output, hidden)``: pass ``hidden`` back in to carry the
    state from one chunk of a sequence to the next.

    Args:
        cell: rnn_tanh, rnn_relu, lstm or gru.
        input_size: features per time step (ignored when ``vocab_size`` is set).
        hidden_size: units per layer.
        num_layers: stacked recurrent layers.
        out_features: head output size.
        init: scheme for the input-to-hidden weights (default, xavier, he, orthogonal).
        recurrent_scale: when set, every hidden-to-hidden weight (per gate) is initialised orthogonal and
            multiplied by this number, which is then its spectral radius (every eigenvalue of an orthogonal
            matrix has modulus 1); > 1 makes gradients explode through time, < 1 vanish (Pascanu et al. 2013).
        output: ``last`` (head on the last step: (B, out)) or ``all`` (every step: (B, T, out)).
        vocab_size: if set, inputs are token ids (B, T) embedded to ``input_size``.
        dropout: dropout between stacked recurrent layers (``num_layers > 1``).
        forget_bias: LSTM only: when set, the forget-gate bias of every layer is this number (``bias_ih`` holds
            it, ``bias_hh``'s forget part is 0); 1 keeps the cell's memory at the start of training (Gers et al.
            2000; Jozefowicz et al. 2015), 0 halves it at every step. ``None``: the ``init`` scheme's.

    Example::

        >>> import torch
        >>> net = RNN("lstm", input_size=2, hidden_size=16, out_features=1)
        >>> y, h = net(torch.randn(4, 10, 2))
        >>> y.shape, h[0].shape
        (torch.Size([4, 1]), torch.Size([1, 4, 16]))
    """

    input_kind = "sequence"

    def __init__(self, cell: str = "lstm", input_size: int = 1, hidden_size: int = 64, num_layers: int = 1,
                 out_features: int = 1, init: str = "default", recurrent_scale: float | None = None,
                 output: str = "last", vocab_size: int | None = None, dropout: float = 0.0,
                 forget_bias: float | None = None) -> None:
        super().__init__()
        check_choice("cell", cell, CELLS)
        check_choice("init", init, INITS)
        check_choice("output", output, OUTPUTS)
        check_int("input_size", input_size)
        check_int("hidden_size", hidden_size)
        check_int("num_layers", num_layers)
        check_int("out_features", out_features)
        if recurrent_scale is not None:
            check_float("recurrent_scale", recurrent_scale, 0.0, low_inclusive=False)
        if vocab_size is not None:
            check_int("vocab_size", vocab_size)
        if forget_bias is not None:
            check_float("forget_bias", forget_bias)
            if cell != "lstm":
                raise BpkitConfigError("forget_bias", forget_bias, f"null for cell={cell} (only an LSTM has a "
                                       "forget gate)")
        self.cell, self.output = cell, output
        self.embed = nn.Embedding(vocab_size, input_size) if vocab_size else None
        kwargs: dict[str, Any] = dict(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers,
                                      batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        if cell == "lstm":
            self.rnn = nn.LSTM(**kwargs)
        elif cell == "gru":
            self.rnn = nn.GRU(**kwargs)
        else:
            self.rnn = nn.RNN(nonlinearity=cell.split("_")[1], **kwargs)
        self.head = nn.Linear(hidden_size, out_features)
        self._init(init, recurrent_scale)
        if forget_bias is not None:
            with torch.no_grad():
                for name, p in self.rnn.named_parameters():
                    if name.startswith("bias"):
                        p[hidden_size:2 * hidden_size].fill_(float(forget_bias) if name.startswith("bias_ih") else 0.0)

    @property
    def gates(self) -> int:
        return {"lstm": 4, "gru": 3}.get(self.cell, 1)

    def _init(self, init: str, recurrent_scale: float | None) -> None:
        hidden = self.rnn.hidden_size
        with torch.no_grad():
            for name, p in self.rnn.named_parameters():
                if name.startswith("weight_ih") and init != "default":
                    for chunk in p.split(hidden):
                        if init == "he":
                            nn.init.kaiming_normal_(chunk, nonlinearity="relu")
                        elif init == "xavier":
                            nn.init.xavier_normal_(chunk)
                        else:
                            nn.init.orthogonal_(chunk)
                elif name.startswith("weight_hh") and recurrent_scale is not None:
                    for chunk in p.split(hidden):
                        nn.init.orthogonal_(chunk)
                        chunk.mul_(recurrent_scale)
                elif name.startswith("bias") and init != "default":
                    p.zero_()
                    if self.cell == "lstm":  # forget-gate bias 1 (Jozefowicz et al. 2015)
                        p[hidden:2 * hidden].fill_(0.5)

    def forward(self, x: torch.Tensor, hidden: Any = None) -> tuple[torch.Tensor, Any]:
        if self.embed is not None:
            x = self.embed(x.long())
        if x.dim() != 3:
            raise ValueError(f"RNN expects input of shape (batch, time, features); got shape {tuple(x.shape)}")
        out, hidden = self.rnn(x, hidden)
        if self.output == "last":
            out = out[:, -1]
        return self.head(out), hidden
