"""Synthetic tasks generated from a seed: regression, multi-label, the adding and copy problems."""

from __future__ import annotations

import math
from typing import Any

import torch

from bpkit.data._base import TensorDataModule, split_sizes
from bpkit.errors import check_float, check_int


class RegressionDataModule(TensorDataModule):
    """Noisy non-linear regression: ``y = sum_i sin(pi x_i) + 0.5 x_1 x_2 + noise``, x ~ U(-1, 1)^d.

    Example::

        >>> dm = RegressionDataModule(in_features=4, num_train=100, num_val=20, num_test=20)
        >>> dm.split("train")[0][0].shape
        torch.Size([4])
    """

    target_kind = "regression"
    default_loss = "mse"

    def __init__(self, in_features: int = 8, noise: float = 0.1, num_train: int = 2000, num_val: int = 500,
                 num_test: int = 500, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.in_features = check_int("in_features", in_features, minimum=2)
        self.noise = check_float("noise", noise, 0.0)
        self.sizes = split_sizes(num_train, num_val, num_test)

    def make(self, generator: torch.Generator):
        n = sum(self.sizes)
        x = torch.rand(n, self.in_features, generator=generator) * 2 - 1
        y = torch.sin(math.pi * x).sum(1, keepdim=True) + 0.5 * x[:, :1] * x[:, 1:2]
        y = y + self.noise * torch.randn(n, 1, generator=generator)
        return x, y, self.sizes

    def model_shapes(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": 1}


class MultilabelDataModule(TensorDataModule):
    """Multi-label classification: label j is on when a fixed random projection of x exceeds 0.

    Example::

        >>> dm = MultilabelDataModule(num_labels=5, num_train=64, num_val=16, num_test=16)
        >>> dm.split("train")[0][1].shape
        torch.Size([5])
    """

    target_kind = "multilabel"
    default_loss = "multilabel_bce"

    def __init__(self, in_features: int = 20, num_labels: int = 8, num_train: int = 2000, num_val: int = 500,
                 num_test: int = 500, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.in_features = check_int("in_features", in_features)
        self.num_labels = check_int("num_labels", num_labels)
        self.sizes = split_sizes(num_train, num_val, num_test)

    def make(self, generator: torch.Generator):
        n = sum(self.sizes)
        x = torch.randn(n, self.in_features, generator=generator)
        w = torch.randn(self.in_features, self.num_labels, generator=generator)
        hidden = torch.tanh(x @ w) + 0.3 * (x[:, :1] ** 2 - 1)
        return x, (hidden > 0).float(), self.sizes

    def model_shapes(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.num_labels, "num_labels": self.num_labels}


class AddingDataModule(TensorDataModule):
    """The adding problem (Hochreiter & Schmidhuber 1997): a length-``seq_len`` sequence of pairs
    (value in [0, 1], marker); exactly two markers, one in each half; the target is the sum of the
    two marked values. Predicting 1.0 always gives MSE ~0.167; learning the task goes far below.

    Example::

        >>> dm = AddingDataModule(seq_len=20, num_train=64, num_val=16, num_test=16)
        >>> x, y = dm.split("train")[0]
        >>> x.shape, y.shape, float(x[:, 1].sum())
        (torch.Size([20, 2]), torch.Size([1]), 2.0)
    """

    target_kind = "regression"
    layouts = ("sequence", "flat")
    default_loss = "mse"

    def __init__(self, seq_len: int = 50, num_train: int = 4000, num_val: int = 500, num_test: int = 500,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seq_len = check_int("seq_len", seq_len, minimum=2)
        self.sizes = split_sizes(num_train, num_val, num_test)

    def make(self, generator: torch.Generator):
        n, t = sum(self.sizes), self.seq_len
        values = torch.rand(n, t, generator=generator)
        half = t // 2
        first = torch.randint(0, half, (n,), generator=generator)
        second = torch.randint(half, t, (n,), generator=generator)
        markers = torch.zeros(n, t)
        rows = torch.arange(n)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        x = torch.stack([values, markers], dim=-1)
        y = (values * markers).sum(1, keepdim=True)
        return x, y, self.sizes

    def _shape_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if self.layout == "flat" else x

    def model_shapes(self) -> dict[str, Any]:
        return {"input_size": 2, "in_features": 2 * self.seq_len, "out_features": 1}


class CopyDataModule(TensorDataModule):
    """The copy-memory task: ``n_symbols`` random symbols (from ``alphabet`` letters), ``delay`` blanks,
    a go marker, then the net must output the symbols. Inputs are one-hot (alphabet + blank + go);
    targets are class ids per step (blank = ``alphabet`` everywhere but the answer). Chance-level
    cross-entropy is about ``n_symbols * log(alphabet) / (delay + 2 n_symbols)``.

    Example::

        >>> dm = CopyDataModule(delay=10, n_symbols=3, num_train=8, num_val=8, num_test=8)
        >>> x, y = dm.split("train")[0]
        >>> x.shape, y.shape
        (torch.Size([16, 10]), torch.Size([16]))
    """

    target_kind = "sequence_multiclass"
    layouts = ("sequence",)

    def __init__(self, delay: int = 20, n_symbols: int = 5, alphabet: int = 8, num_train: int = 4000,
                 num_val: int = 500, num_test: int = 500, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delay = check_int("delay", delay, minimum=1)
        self.n_symbols = check_int("n_symbols", n_symbols)
        self.alphabet = check_int("alphabet", alphabet, minimum=2)
        self.sizes = split_sizes(num_train, num_val, num_test)

    @property
    def seq_len(self) -> int:
        return self.delay + 2 * self.n_symbols

    def make(self, generator: torch.Generator):
        n, k, a = sum(self.sizes), self.n_symbols, self.alphabet
        blank, go = a, a + 1
        symbols = torch.randint(0, a, (n, k), generator=generator)
        tokens = torch.full((n, self.seq_len), blank)
        tokens[:, :k] = symbols
        tokens[:, k + self.delay - 1] = go
        targets = torch.full((n, self.seq_len), blank)
        targets[:, -k:] = symbols
        x = torch.nn.functional.one_hot(tokens, a + 2).float()
        return x, targets, self.sizes

    def model_shapes(self) -> dict[str, Any]:
        return {"input_size": self.alphabet + 2, "out_features": self.alphabet + 1,
                "num_classes": self.alphabet + 1}
