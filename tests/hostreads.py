"""Count device-to-host reads made by bpkit code (test helper).

Wraps ``Tensor.item``, ``tolist``, ``cpu``, ``numpy``, ``__bool__``, ``__float__``, ``__int__``
and ``__index__`` and counts the calls whose immediate Python caller is a file inside the ``bpkit``
package. On the CPU these reads are free, so this counter is how CPU tests prove that a step
would not synchronise a GPU.

Example::

    with HostReadCounter() as reads:
        trainer.fit(...)
    assert reads.count == 0, reads.sites
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import torch

import bpkit

_PKG_DIR = os.path.dirname(os.path.abspath(bpkit.__file__))
_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostReadCounter:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.count = 0
        self.sites: Counter[str] = Counter()
        self._originals: dict[str, object] = {}

    def _wrap(self, name: str, original):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            if counter.enabled:
                frame = sys._getframe(1)
                filename = os.path.abspath(frame.f_code.co_filename)
                if filename.startswith(_PKG_DIR):
                    counter.count += 1
                    counter.sites[f"{os.path.relpath(filename, _PKG_DIR)}:{frame.f_lineno} {name}"] += 1
            return original(tensor, *args, **kwargs)

        return wrapper

    def __enter__(self) -> "HostReadCounter":
        for name in _METHODS:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
