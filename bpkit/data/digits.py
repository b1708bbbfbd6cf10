"""The 8x8 handwritten digits (1797 images, 10 classes) that scikit-learn ships, bundled here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bpkit.data._base import TensorDataModule

DIGITS_FILE = Path(__file__).with_name("digits.npz")
SPLIT_SEED = 1234  # the split is fixed: the same test images for every run, whatever the run's seed


class DigitsDataModule(TensorDataModule):
    """Handwritten digits 0-9 as 8x8 grey images scaled to [0, 1]; fixed 1257/270/270 split.

    Layouts: ``flat`` (64-vectors, for MLPs), ``image`` (1x8x8, for CNNs), ``sequence`` (8 rows of
    8 pixels, for RNNs reading the image row by row).

    Example::

        >>> dm = DigitsDataModule(batch_size=32)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.shape
        (torch.Size([32, 64]), torch.Size([32]))
    """

    target_kind = "multiclass"
    layouts = ("flat", "image", "sequence")
    n_split = (1257, 270, 270)

    def make(self, generator: torch.Generator):
        raw = np.load(DIGITS_FILE)
        x = torch.from_numpy(raw["images"].astype(np.float32) / 16.0)
        y = torch.from_numpy(raw["target"].astype(np.int64))
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
        return x[order], y[order], self.n_split

    def _shape_input(self, x: torch.Tensor) -> torch.Tensor:
        return {"flat": x.reshape(-1, 64), "image": x.reshape(-1, 1, 8, 8), "sequence": x.reshape(-1, 8, 8)}[
            self.layout]

    def model_shapes(self) -> dict[str, Any]:
        return {"in_features": 64, "in_channels": 1, "input_size": 8, "out_features": 10, "num_classes": 10}
