"""Shared base for bpkit's DataModules: tensors made once, deterministic for a seed."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from bpkit.errors import BpkitConfigError, check_int

TARGET_KINDS = ("regression", "binary", "multiclass", "multilabel", "sequence_multiclass")
LAYOUTS = ("flat", "image", "sequence")


class TensorDataModule(pl.LightningDataModule):
    """A DataModule over in-memory tensors: subclasses implement :meth:`make` returning
    ``(x, y)`` for all samples, and this base splits them into train/val/test deterministically.

    Attributes every subclass sets, read by the training app to size the model and pick the loss:
    ``target_kind`` (one of regression, binary, multiclass, multilabel, sequence_multiclass),
    ``layouts`` (input layouts the data can take) and :meth:`model_shapes`.
    """

    target_kind = "multiclass"
    layouts: tuple[str, ...] = ("flat",)
    default_loss = "cross_entropy"

    def __init__(self, batch_size: int = 64, seed: int = 0, num_workers: int = 0, layout: str = "auto") -> None:
        super().__init__()
        check_int("batch_size", batch_size)
        check_int("num_workers", num_workers, minimum=0)
        if layout != "auto" and layout not in self.layouts:
            raise BpkitConfigError("layout", layout, "one of auto, " + ", ".join(self.layouts))
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.layout = self.layouts[0] if layout == "auto" else layout
        self._splits: dict[str, TensorDataset] | None = None

    # -- to implement -------------------------------------------------------------------------
    def make(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """Return ``(x, y, (n_train, n_val, n_test))`` for all samples, in split order."""
        raise NotImplementedError

    def model_shapes(self) -> dict[str, Any]:
        """Keyword arguments that size a model for this data (in_features, out_features, ...)."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def use_layout(self, kind: str) -> None:
        """Switch the input layout to what a model takes (``flat``, ``image`` or ``sequence``)."""
        if kind not in self.layouts:
            raise BpkitConfigError("data", type(self).__name__,
                                   f"data whose inputs can be laid out as '{kind}' for this model; "
                                   f"this data offers {', '.join(self.layouts)}")
        if kind != self.layout:
            self.layout = kind
            self._splits = None

    def _shape_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        g = torch.Generator().manual_seed(int(self.seed))
        x, y, (n_train, n_val, n_test) = self.make(g)
        x = self._shape_input(x)
        bounds = [0, n_train, n_train + n_val, n_train + n_val + n_test]
        self._splits = {name: TensorDataset(x[bounds[i]:bounds[i + 1]], y[bounds[i]:bounds[i + 1]])
                        for i, name in enumerate(("train", "val", "test"))}

    def split(self, name: str) -> TensorDataset:
        self.setup()
        assert self._splits is not None
        return self._splits[name]

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(int(self.seed) + 1)
        return DataLoader(self.split(name), batch_size=self.batch_size, shuffle=shuffle, generator=g,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def split_sizes(num_train: int, num_val: int, num_test: int) -> tuple[int, int, int]:
    check_int("num_train", num_train)
    check_int("num_val", num_val)
    check_int("num_test", num_test, minimum=0)
    return num_train, num_val, num_test
