"""A strided sample of a tensor's elements, for statistics whose exact counts are not needed (histograms).

A histogram of every element of every tensor at every step is a full pass (bit tricks, a table, a
``bincount``) over the model: on a CPU several times the cost of reading the tensors once. A sample of a few
thousand elements per tensor gives the same picture at a fraction of the cost: the counts are then estimates
(scaled to the tensor's size), while norms, maxima, zero and non-finite detection elsewhere stay exact.

The sample is every ``stride``-th run of ``run`` contiguous elements (up to 32, a power of two that divides the
tensor's size: whole cache lines, which a CPU reads several times faster than scattered single elements), from an
offset that moves by one run at each call (``phase``): over ``stride`` consecutive calls every element is counted
exactly once. ``stride`` is a prime that divides none of the tensor's dimensions, so the sample walks across rows
and columns (a stride of exactly one row would count a single column).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


MAX_RUN = 32  # contiguous elements per run of a sample


@lru_cache(maxsize=1024)
def sample_layout(shape: tuple[int, ...], max_samples: int) -> tuple[int, int]:
    """``(run, stride)`` of :func:`strided_sample`: ``(1, 1)`` (everything) when the tensor has at most
    ``max_samples`` elements; else runs of the largest power of two up to :data:`MAX_RUN` that divides the size (and
    ``max_samples``), and a stride in runs, the smallest prime at least ``numel / max_samples`` that divides none of
    ``shape``'s dimensions.

    Example::

        >>> sample_layout((512, 512), 4096), sample_layout((10, 7), 4096), sample_layout((999, 7), 100)
        ((32, 67), (1, 1), (1, 71))
    """
    numel = math.prod(shape)
    if numel <= max_samples:
        return 1, 1
    run = 1
    while run < MAX_RUN and numel % (2 * run) == 0 and max_samples >= 2 * run:
        run *= 2
    stride = max(2, -(-numel // max_samples))
    while not _is_prime(stride) or any(d % stride == 0 for d in shape if d > 1):
        stride += 1
    return run, stride


def strided_sample(tensor: torch.Tensor, max_samples: int, phase: int = 0) -> torch.Tensor:
    """About ``max_samples`` elements of ``tensor`` (at most that many plus one run), a view (a copy only when
    ``tensor`` is not contiguous) of shape ``(runs, run)``: every ``stride``-th run (:func:`sample_layout`) from run
    ``phase % stride``. The whole tensor, flat, when it is that small. ``tensor.numel() / result.numel()`` is the
    factor that scales counts over the sample to the tensor.

    Example::

        >>> import torch
        >>> x = torch.arange(100_000.0).view(200, 500)
        >>> s = strided_sample(x, 1000)
        >>> s.shape, s[:2, :3].tolist()
        (torch.Size([31, 32]), [[0.0, 1.0, 2.0], [3232.0, 3233.0, 3234.0]])
        >>> strided_sample(x, 1000, phase=1)[0, :2].tolist()
        [32.0, 33.0]
    """
    flat = tensor.detach().reshape(-1)
    run, stride = sample_layout(tuple(tensor.shape), int(max_samples))
    if stride == 1:
        return flat
    runs = flat.numel() // run
    first = phase % stride
    count = (runs - first + stride - 1) // stride
    return flat.as_strided((count, run), (stride * run, 1), flat.storage_offset() + first * run)
