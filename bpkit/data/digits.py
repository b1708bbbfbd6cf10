"""The 8x8 handwritten digits (1797 images, 10 classes) that scikit-learn ships, bundled here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bpkit.data._base import TensorDataModule
from bpkit.errors import BpkitConfigError, check_int

DIGITS_FILE = Path(__file__).with_name("digits.npz")
SPLIT_SEED = 1234  # the split is fixed: the same test images for every run, whatever the run's seed


class DigitsDataModule(TensorDataModule):
    """Handwritten digits 0-9 as 8x8 grey images scaled to [0, 1]; fixed 1257/270/270 split.

    Layouts: ``flat`` (64-vectors, for MLPs), ``image`` (1x8x8, for CNNs), ``sequence`` (8 rows of
    8 pixels, for RNNs reading the image row by row).

    For transfer learning, a task can be a subset of the digits (``classes``: every split keeps only those; the
    labels stay the digits, so a model keeps its 10 outputs) with few labels (``labels_per_class``: the first
    ``n`` training images of each class in the fixed order; validation and test keep all theirs).

    Args:
        batch_size: samples per batch.
        seed: the shuffling seed (the split itself is fixed).
        num_workers: DataLoader workers.
        layout: auto, flat, image or sequence.
        classes: the digits to keep (default: all ten).
        labels_per_class: training images per class (default: all).

    Example::

        >>> dm = DigitsDataModule(batch_size=32)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.shape
        (torch.Size([32, 64]), torch.Size([32]))
    """

    target_kind = "multiclass"
    layouts = ("flat", "image", "sequence")
    n_split = (1257, 270, 270)

    def __init__(self, batch_size: int = 64, seed: int = 0, num_workers: int = 0, layout: str = "auto",
                 classes: Any = None, labels_per_class: int | None = None) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, layout=layout)
        if classes is not None:
            items = list(classes) if isinstance(classes, (list, tuple)) or hasattr(classes, "__iter__") else None
            if not items or isinstance(classes, str) or \
                    any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 9 for c in items) \
                    or len(set(items)) != len(items):
                raise BpkitConfigError("classes", classes,
                                       "null or a list of distinct digits 0-9, e.g. [5, 6, 7, 8, 9]")
            classes = sorted(items)
        if labels_per_class is not None:
            check_int("labels_per_class", labels_per_class, minimum=1)
        self.classes, self.labels_per_class = classes, labels_per_class

    def make(self, generator: torch.Generator):
        raw = np.load(DIGITS_FILE)
        x = torch.from_numpy(raw["images"].astype(np.float32) / 16.0)
        y = torch.from_numpy(raw["target"].astype(np.int64))
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
        x, y = x[order], y[order]
        if self.classes is None and self.labels_per_class is None:
            return x, y, self.n_split
        bounds = np.cumsum((0, *self.n_split))
        xs, ys, sizes = [], [], []
        wanted = torch.tensor(self.classes if self.classes is not None else list(range(10)))
        for i in range(3):
            xi, yi = x[bounds[i]:bounds[i + 1]], y[bounds[i]:bounds[i + 1]]
            keep = torch.isin(yi, wanted)
            if i == 0 and self.labels_per_class is not None:  # the first n of each class, in the fixed order
                rank = torch.zeros_like(yi)
                for c in wanted.tolist():
                    hit = yi == c
                    rank[hit] = torch.arange(int(hit.sum()))
                keep &= rank < self.labels_per_class
            xs.append(xi[keep])
            ys.append(yi[keep])
            sizes.append(int(keep.sum()))
        return torch.cat(xs), torch.cat(ys), tuple(sizes)

    def _shape_input(self, x: torch.Tensor) -> torch.Tensor:
        return {"flat": x.reshape(-1, 64), "image": x.reshape(-1, 1, 8, 8), "sequence": x.reshape(-1, 8, 8)}[
            self.layout]

    def model_shapes(self) -> dict[str, Any]:
        return {"in_features": 64, "in_channels": 1, "input_size": 8, "out_features": 10, "num_classes": 10}
