"""Hessian-vector products by double backward, on a flat view of a list of parameters. Pure torch."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class HessianOperator:
    """``v -> H v`` for the Hessian ``H`` of a scalar loss with respect to ``params``, by double backward.

    The gradient is built once with ``create_graph=True``; every :meth:`matvec` is then one backward pass through
    that graph (Pearlmutter's trick: ``H v = d(g . v)/dw``), about the cost of two backward passes of the model.
    Vectors are flat (the parameters concatenated in order). ``.grad`` of the parameters is never touched
    (``torch.autograd.grad``, not ``backward``). With ``diag`` (a flat positive vector ``d``) the operator is
    ``D H D`` with ``D = diag(d)``: the symmetric form of a diagonally preconditioned Hessian ``P^{-1} H`` with
    ``d = P^{-1/2}`` (same eigenvalues).

    Args:
        loss: a scalar tensor with a graph to ``params``.
        params: the parameters (tensors with ``requires_grad``); one that does not reach the loss has zero rows.
        diag: optional flat scaling vector (see above).

    Raises:
        RuntimeError: from autograd when an operation of the loss has no double backward.

    Example::

        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> op = HessianOperator((3 * w[0] ** 2 + w[0] * w[1]), [w])   # H = [[6, 1], [1, 0]]
        >>> op.matvec(torch.tensor([1.0, 0.0]))
        tensor([6., 1.])
        >>> op.grad_norm, op.dim, op.hvps
        (tensor(8.0623), 2, 1)
    """

    def __init__(self, loss: torch.Tensor, params: Sequence[torch.Tensor], diag: torch.Tensor | None = None) -> None:
        self.params = [p for p in params]
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        flat = []
        for p, g in zip(self.params, grads):
            flat.append(torch.zeros(p.numel(), device=p.device, dtype=p.dtype) if g is None else g.reshape(-1))
        self.grad = torch.cat(flat)  # with a graph
        self.dim = int(self.grad.numel())
        self.device, self.dtype = self.grad.device, self.grad.dtype
        self.diag = diag
        self.hvps = 0
        self._connected = self.grad.requires_grad

    @property
    def grad_norm(self) -> torch.Tensor:
        """``||g||`` of the loss's gradient (of the unpreconditioned loss), on the device."""
        return self.grad.detach().norm()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` (or ``D H D v``) for a flat vector ``v``."""
        self.hvps += 1
        v = v.to(device=self.device, dtype=self.dtype)
        if self.diag is not None:
            v = v * self.diag
        if not self._connected:  # a loss linear in the parameters: H = 0
            return torch.zeros_like(v)
        hv = torch.autograd.grad(self.grad, self.params, grad_outputs=v, retain_graph=True, allow_unused=True)
        out = torch.cat([torch.zeros(p.numel(), device=self.device, dtype=self.dtype) if h is None else h.reshape(-1)
                         for p, h in zip(self.params, hv)])
        return out * self.diag if self.diag is not None else out
