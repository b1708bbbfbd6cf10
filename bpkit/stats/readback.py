"""Read many device tensors back to the host in ONE copy.

At log time a callback packs everything it wants to show (norms, flags, histogram counts) into
one float64 buffer on the device, copies it to the host once (non-blocking into pinned memory on
CUDA), and unpacks it into numpy arrays. Nothing else ever leaves the device.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


class Readback:
    """A packed copy of several tensors that is on its way to the host.

    Example::

        >>> import torch
        >>> out = Readback({"a": torch.ones(2), "b": torch.tensor(3)}).result()
        >>> out["a"].tolist(), float(out["b"])
        ([1.0, 1.0], 3.0)
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        self._event = None
        if not tensors:
            self._host = torch.zeros(0, dtype=torch.float64)
            return
        first = next(iter(tensors.values()))
        packed = torch.cat([t.detach().reshape(-1).to(device=first.device, dtype=torch.float64)
                            for t in tensors.values()])
        if packed.is_cuda:
            self._host = torch.empty(packed.shape, dtype=torch.float64, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = packed

    def result(self) -> dict[str, np.ndarray]:
        """Wait for the copy (the one host sync of a log step) and unpack it into numpy arrays."""
        if self._event is not None:
            self._event.synchronize()
        flat = self._host.numpy()
        out, offset = {}, 0
        for key, shape in self._shapes.items():
            n = int(np.prod(shape)) if shape else 1
            out[key] = flat[offset:offset + n].reshape(shape)
            offset += n
        return out


def readback(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Pack, copy once and unpack: ``{name: tensor}`` -> ``{name: numpy array}``."""
    return Readback(tensors).result()
