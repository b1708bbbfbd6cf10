"""Weight drift per block: how far fine-tuning moved each part of a model from its pretrained weights.

``drift(block) = ||w - w_ref|| / ||w_ref||`` over all the block's tensors together (the L2 norm of the
concatenation), computed on the device in a fixed number of fused kernels; nothing is read to the host.
Pure torch: never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from bpkit.stats.norms import foreach_norms, group_norms


class BlockDrift:
    """Per-block drift of a set of tensors from a reference copy taken at construction.

    Args:
        params: the tensors, in any order.
        blocks: the block of each tensor (same length as ``params``).
        reference: the reference values (same shapes as ``params``); default: a copy of ``params`` now.
        eps: added to the reference norm (a block whose reference is all zeros).

    Example::

        >>> import torch
        >>> w = [torch.ones(4), torch.ones(2)]
        >>> drift = BlockDrift(w, ["a", "b"])
        >>> _ = w[0].mul_(1.5)
        >>> drift.compute(w)
        tensor([0.5000, 0.0000])
        >>> drift.names
        ['a', 'b']
    """

    def __init__(self, params: Sequence[torch.Tensor], blocks: Sequence[str],
                 reference: Sequence[torch.Tensor] | None = None, eps: float = 1e-12) -> None:
        if len(params) != len(blocks):
            raise ValueError(f"BlockDrift: {len(params)} tensors but {len(blocks)} block names")
        self.names: list[str] = list(dict.fromkeys(blocks))
        index = {name: i for i, name in enumerate(self.names)}
        self._index_cpu = torch.tensor([index[b] for b in blocks], dtype=torch.long)
        self._index: torch.Tensor | None = None
        src = params if reference is None else reference
        self.reference = [r.detach().clone() for r in src]
        for r, p in zip(self.reference, params):
            if r.shape != p.shape:
                raise ValueError(f"BlockDrift: a reference of shape {tuple(r.shape)} for a tensor of {tuple(p.shape)}")
        self.eps = eps
        self._ref_norms: torch.Tensor | None = None

    def _to(self, device: torch.device) -> None:
        if self._index is None or self._index.device != device:
            self.reference = [r.to(device) for r in self.reference]
            self._index = self._index_cpu.to(device)
            self._ref_norms = group_norms(foreach_norms(self.reference), self._index, len(self.names))

    @torch.no_grad()
    def compute(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(num_blocks,)`` float32 drifts, on the tensors' device (in the order of :attr:`names`)."""
        if not params:
            return torch.zeros(0)
        self._to(params[0].device)
        diffs = torch._foreach_sub([p.detach() for p in params], self.reference)
        dist = group_norms(foreach_norms(diffs), self._index, len(self.names))
        return dist / (self._ref_norms + self.eps)

    def state_dict(self) -> dict[str, object]:
        return {"reference": [r.detach().cpu() for r in self.reference]}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        ref = state.get("reference")
        if isinstance(ref, list) and len(ref) == len(self.reference) and \
                all(a.shape == b.shape for a, b in zip(ref, self.reference)):
            device = self.reference[0].device if self.reference else torch.device("cpu")
            self.reference = [r.to(device) for r in ref]
            self._index = None
