"""Truncated backpropagation through time as a plain PyTorch loop: chunks, carried state, one step per chunk.

The framework-free engine under :class:`bpkit.tbptt.TBPTTModule` (which adds Lightning 1.x's contract on
top of it). :class:`TruncatedBPTT` splits a batch into chunks along time, runs a step function on each chunk
with the previous chunk's hidden state detached (any structure: a tensor, LSTM's ``(h, c)``, lists, dicts,
``None``), backpropagates each chunk's loss and steps the optimizer once per chunk (or per group of
``accumulate_chunks``). With ``backprop_steps = k2`` (a multiple of ``k1 = chunk_size``) each update
backpropagates through the last ``k2`` steps by re-running the chunks before it from a stored state.

No Lightning import: use it from a plain loop, from Lightning Fabric (pass ``backward=fabric.backward``),
or through :class:`~bpkit.tbptt.TBPTTModule` in the Trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from bpkit.errors import BpkitConfigError, check_int

__all__ = ["TBPTTResult", "TruncatedBPTT", "backprop_multiple", "chunk_length", "detach_hiddens",
           "parse_step_output", "split_batch", "time_length"]

#: a step function: ``step_fn(chunk, hiddens) -> (loss, hiddens)`` or ``{"loss": loss, "hiddens": hiddens}``
StepFn = Callable[[Any, Any], Any]


def detach_hiddens(hiddens: Any) -> Any:
    """Detach every tensor in a hidden state of any structure (tensor, tuple, list, dict, nesting).

    Example::

        >>> import torch
        >>> h = torch.ones(2, requires_grad=True) * 2
        >>> out = detach_hiddens({"h": (h, [h]), "n": None})
        >>> out["h"][0].requires_grad, out["h"][1][0].requires_grad, out["n"]
        (False, False, None)
    """
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, hiddens)


def time_length(batch: Any, time_dim: int = 1) -> int:
    """The length along ``time_dim`` shared by every tensor of ``batch`` that has that dimension.

    Raises:
        BpkitConfigError: when no tensor has a time dimension, or tensors disagree on its length.

    Example::

        >>> import torch
        >>> time_length((torch.zeros(4, 10, 3), torch.zeros(4)))
        10
    """
    leaves = pytree.tree_leaves(batch)
    shapes = [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor)]
    lengths = {s[time_dim] for s in shapes if len(s) > time_dim}
    if not lengths:
        raise BpkitConfigError("batch", _describe(shapes),
                               f"at least one tensor with a time dimension at dim {time_dim} (batch, time, ...) to "
                               "split for truncated BPTT; set tbptt_time_dim or override tbptt_split_batch")
    if len(lengths) > 1:
        raise BpkitConfigError("batch", _describe(shapes),
                               f"tensors that agree on their length along the time dim {time_dim} "
                               f"(found {sorted(lengths)}); override tbptt_split_batch to say how to split this batch")
    return lengths.pop()


def split_batch(batch: Any, split_size: int, time_dim: int = 1) -> list[Any]:
    """Split a batch into consecutive chunks of exactly ``split_size`` steps along ``time_dim`` (the last shorter).

    Every tensor with a ``time_dim`` dimension is sliced (views, no copy); tensors with fewer dimensions and
    non-tensor leaves are handed unchanged to every chunk. Nested lists, tuples, dicts and named tuples keep
    their structure.

    Raises:
        BpkitConfigError: on ``split_size`` < 1, a batch without a time dimension, or tensors that disagree on it.

    Example::

        >>> import torch
        >>> x, y = torch.zeros(4, 10, 3), torch.zeros(4, 10)
        >>> [tuple(c[0].shape) for c in split_batch((x, y), 4)]
        [(4, 4, 3), (4, 4, 3), (4, 2, 3)]
    """
    check_int("split_size", split_size)
    total = time_length(batch, time_dim)
    leaves, spec = pytree.tree_flatten(batch)
    chunks = []
    for start in range(0, total, split_size):
        stop = min(start + split_size, total)
        cut = [t.narrow(time_dim, start, stop - start) if isinstance(t, torch.Tensor) and t.dim() > time_dim else t
               for t in leaves]
        chunks.append(pytree.tree_unflatten(cut, spec))
    return chunks


def chunk_length(chunk: Any, time_dim: int = 1) -> int:
    """A chunk's number of time steps, its weight in the sequence loss; 1 for a chunk the default rule cannot measure."""
    try:
        return time_length(chunk, time_dim)
    except BpkitConfigError:  # a custom split the default rule cannot measure: weigh chunks equally
        return 1


def backprop_multiple(chunk_size: int | None, backprop_steps: int | None, chunk_key: str = "chunk_size",
                      backprop_key: str = "backprop_steps") -> int:
    """``m = k2 // k1``: how many chunks each update backpropagates through (1 when either is ``None``).

    Raises:
        BpkitConfigError: when ``k2`` is not a multiple of ``k1`` (named by ``backprop_key`` and ``chunk_key``).

    Example::

        >>> backprop_multiple(3, 9), backprop_multiple(3, None)
        (3, 1)
    """
    if chunk_size is None or backprop_steps is None:
        return 1
    if backprop_steps % chunk_size:
        raise BpkitConfigError(backprop_key, backprop_steps,
                               f"a multiple of {chunk_key}={chunk_size} (k2 = m * k1, m >= 1)")
    return backprop_steps // chunk_size


def parse_step_output(output: Any, owner: str = "step_fn") -> tuple[torch.Tensor | None, Any]:
    """``(loss, hiddens)`` from a step's return value: ``{"loss", "hiddens"}`` or a ``(loss, hiddens)`` pair.

    Raises:
        BpkitConfigError: when the value carries no hiddens (the key is ``"<owner> return value"``).

    Example::

        >>> parse_step_output({"loss": None, "hiddens": 1}), parse_step_output((2.0, 3))
        ((None, 1), (2.0, 3))
    """
    if isinstance(output, dict) and output.get("hiddens") is not None and "loss" in output:
        return output["loss"], output["hiddens"]
    if isinstance(output, (tuple, list)) and len(output) == 2 and output[1] is not None:
        return output[0], output[1]
    raise BpkitConfigError(f"{owner} return value", _short(output),
                           "{'loss': loss, 'hiddens': hiddens} or (loss, hiddens) with hiddens not None: "
                           "truncated BPTT carries the returned hiddens into the next chunk")


@dataclass
class TBPTTResult:
    """What :meth:`TruncatedBPTT.run` returns for one batch.

    Attributes:
        loss: the chunk losses averaged, weighted by chunk length (detached, on the device); ``None`` when no
            chunk had a loss.
        hiddens: the state after the last chunk, detached: pass it as ``hiddens=`` to continue a stream.
        num_chunks: chunks the batch was split into.
        num_updates: optimizer steps taken (groups of ``accumulate_chunks`` chunks with a loss).
        chunk_losses: each chunk's loss (detached) in order, ``None`` for a chunk without one.
    """

    loss: torch.Tensor | None
    hiddens: Any
    num_chunks: int
    num_updates: int
    chunk_losses: list[torch.Tensor | None] = field(default_factory=list)


class TruncatedBPTT:
    r"""Truncated BPTT(``k1``, ``k2``) over a batch: split along time, carry detached state, step per chunk.

    Per batch, :meth:`run` zeroes the optimizers' gradients, then for each chunk ``n``: calls
    ``step_fn(chunk, hiddens)`` (``hiddens`` is the starting state for the first chunk, then the previous
    chunk's returned state, detached), backpropagates the returned loss (divided by the group size when
    accumulating), and after every ``accumulate_chunks`` chunks with a loss runs ``step()`` and
    ``zero_grad()`` on each optimizer and calls ``on_update()``. A step may return ``loss=None`` to only
    advance the state (sequence-level targets: only the last chunk has a loss).

    During a call of ``step_fn``, :attr:`index` is the chunk's index, :attr:`num_chunks` the batch's number of
    chunks and :attr:`recomputing` is ``True`` on the re-runs of ``backprop_steps > chunk_size`` (whose losses
    are ignored: do not update metrics there).

    Args:
        chunk_size: ``k1``, time steps per chunk (an integer >= 1); ``None`` runs the batch as one chunk.
        backprop_steps: ``k2``, time steps each update backpropagates through, a multiple of ``k1``; ``None``
            means ``k1`` (plain TBPTT(k)).
        accumulate_chunks: chunks whose gradients are summed (each loss divided by their count) before one
            optimizer step; the last group of a batch may be smaller.
        time_dim: the time dimension of the batch's tensors (1: batch first).

    Raises:
        BpkitConfigError: on a bad option (the message names the key and the value), a batch without a time
            dimension, a step whose return value carries no hiddens, or a loss that does not require grad.

    Example::

        >>> import torch
        >>> from bpkit.tbptt import TruncatedBPTT
        >>> _ = torch.manual_seed(0)
        >>> rnn, head = torch.nn.GRU(2, 8, batch_first=True), torch.nn.Linear(8, 1)
        >>> opt = torch.optim.SGD([*rnn.parameters(), *head.parameters()], lr=0.1)
        >>> def step(chunk, hiddens):
        ...     x, y = chunk
        ...     out, hiddens = rnn(x, hiddens)
        ...     return torch.nn.functional.mse_loss(head(out), y), hiddens
        >>> tbptt = TruncatedBPTT(chunk_size=4)
        >>> x, y = torch.randn(3, 10, 2), torch.randn(3, 10, 1)
        >>> result = tbptt.run((x, y), step, opt)  # chunks of 4, 4 and 2 steps: one optimizer step each
        >>> result.num_chunks, result.num_updates, result.hiddens.requires_grad
        (3, 3, False)
        >>> result = tbptt.run((x, y), step, opt, hiddens=result.hiddens)  # a stream: continue from the state
    """

    def __init__(self, chunk_size: int | None, backprop_steps: int | None = None, accumulate_chunks: int = 1,
                 time_dim: int = 1) -> None:
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size)
        self.backprop_steps = None if backprop_steps is None else check_int("backprop_steps", backprop_steps)
        self.multiple = backprop_multiple(self.chunk_size, self.backprop_steps)
        self.accumulate_chunks = check_int("accumulate_chunks", accumulate_chunks)
        self.time_dim = check_int("time_dim", time_dim, minimum=0)
        #: the chunk being run, the batch's number of chunks, and whether the chunk is a re-run (``k2 > k1``)
        self.index = 0
        self.num_chunks = 0
        self.recomputing = False

    def split(self, batch: Any) -> list[Any]:
        """The batch's chunks of ``chunk_size`` steps (see :func:`split_batch`); ``[batch]`` without a chunk size."""
        if self.chunk_size is None:
            return [batch]
        return split_batch(batch, self.chunk_size, self.time_dim)

    def run(self, batch: Any, step_fn: StepFn, optimizer: Any = None, *, hiddens: Any = None,
            chunks: Sequence[Any] | None = None, backward: Callable[[torch.Tensor], Any] | None = None,
            on_update: Callable[[], Any] | None = None,
            on_chunk_loss: Callable[[torch.Tensor, int], Any] | None = None,
            owner: str = "step_fn") -> TBPTTResult:
        """Train on one batch, chunk by chunk.

        Args:
            batch: the batch (any structure of tensors); split by :meth:`split` unless ``chunks`` is given.
            step_fn: ``step_fn(chunk, hiddens)`` returning ``(loss, hiddens)`` or ``{"loss", "hiddens"}``;
                ``loss`` may be ``None`` (the chunk only advances the state), ``hiddens`` may not.
            optimizer: an optimizer or a sequence of them (anything with ``step()`` and ``zero_grad()``), or
                ``None`` to leave the step to ``on_update``.
            hiddens: the state the first chunk starts from (``None``: the model's default), detached here.
            chunks: the batch already split (a custom split); ``batch`` then only names the batch.
            backward: called with each loss to backpropagate (default ``loss.backward()``; Lightning's
                ``manual_backward`` or Fabric's ``backward`` for AMP scaling).
            on_update: called after each optimizer step (an LR scheduler step, a counter).
            on_chunk_loss: called with each chunk's detached loss and the chunk's index, after its backward.
            owner: the name used for the step function in error messages.

        Returns:
            A :class:`TBPTTResult`: the length-weighted sequence loss, the last state (detached), counts.

        Raises:
            BpkitConfigError: on an empty split, a return value without hiddens, or a loss that does not
                require grad.
        """
        chunks = list(self.split(batch) if chunks is None else chunks)
        if not chunks:
            raise BpkitConfigError("chunks", "[]", "at least one chunk")
        optimizers = _as_list(optimizer)
        backward = backward if backward is not None else _backward
        num, m, acc = len(chunks), self.multiple, self.accumulate_chunks
        self.num_chunks = num
        lengths = [chunk_length(c, self.time_dim) for c in chunks]
        for opt in optimizers:
            opt.zero_grad()

        start = detach_hiddens(hiddens)
        state = start
        seq_sum: torch.Tensor | None = None
        seq_weight = 0
        updates = 0
        losses: list[torch.Tensor | None] = []
        group_has_loss = False
        try:
            for n in range(num):
                first = max(0, n - m + 1)
                state, next_start, loss = start, start, None
                for j in range(first, n + 1):  # j < n: re-runs from the stored state of the k2 window
                    self.index, self.recomputing = j, j < n
                    loss, state = parse_step_output(step_fn(chunks[j], state), owner)
                    if j == first and n - m + 2 > first:  # the next window starts right after this chunk
                        next_start = detach_hiddens(state)
                self.recomputing = False
                group_start = n - n % acc
                group_len = min(acc, num - group_start)
                if loss is not None:
                    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                        raise BpkitConfigError(f"{owner} loss", _short(loss),
                                               "a tensor that requires grad (or None to skip the chunk)")
                    backward(loss / group_len if group_len > 1 else loss)
                    group_has_loss = True
                    detached = loss.detach()
                    seq_sum = detached * lengths[n] if seq_sum is None else seq_sum + detached * lengths[n]
                    seq_weight += lengths[n]
                    if on_chunk_loss is not None:
                        on_chunk_loss(detached, n)
                    losses.append(detached)
                else:
                    losses.append(None)
                if n == group_start + group_len - 1 and group_has_loss:
                    for opt in optimizers:
                        opt.step()
                        opt.zero_grad()
                    updates += 1
                    if on_update is not None:
                        on_update()
                    group_has_loss = False
                start = next_start
        finally:
            self.recomputing = False
        seq_loss = seq_sum / seq_weight if seq_sum is not None else None
        return TBPTTResult(seq_loss, detach_hiddens(state), num, updates, losses)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(chunk_size={self.chunk_size}, backprop_steps={self.backprop_steps}, "
                f"accumulate_chunks={self.accumulate_chunks}, time_dim={self.time_dim})")


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


def _as_list(optimizer: Any) -> list[Any]:
    if optimizer is None:
        return []
    if isinstance(optimizer, (list, tuple)):
        return list(optimizer)
    return [optimizer]


def _describe(shapes: list[tuple[int, ...]]) -> str:
    return "tensors of shapes " + ", ".join(str(s) for s in shapes) if shapes else "no tensors"


def _batch_size(batch: Any) -> int | None:
    for t in pytree.tree_leaves(batch):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return None


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {type(v).__name__}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return type(value).__name__ + " of " + ", ".join(type(v).__name__ for v in value)
    return type(value).__name__
