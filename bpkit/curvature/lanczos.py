"""Extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalization, and Hutchinson's trace
estimator with Rademacher probes, deflated by the Lanczos basis. Pure torch (numpy for the small tridiagonal)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


def rademacher(dim: int, generator: torch.Generator, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A vector of independent +-1 entries, drawn from ``generator`` (a CPU generator: the global RNG is untouched).

    Example::

        >>> v = rademacher(6, torch.Generator().manual_seed(0))
        >>> sorted(set(v.tolist())) <= [-1.0, 1.0], v.shape
        (True, torch.Size([6]))
    """
    bits = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int8)
    return (bits.to(dtype) * 2 - 1).to(device)


@dataclass
class LanczosResult:
    """The extreme Ritz values of a Lanczos run.

    Attributes:
        lambda_max: the largest Ritz value (estimate of the top eigenvalue).
        lambda_min: the smallest (most negative) Ritz value.
        residual_max: ``||A y - theta y||`` of the top Ritz pair: the top eigenvalue is within this of
            ``lambda_max`` (for a symmetric operator some eigenvalue lies within the residual of every Ritz value).
        residual_min: the same for ``lambda_min``.
        iterations: operator applications used.
        converged: both residuals under ``tol`` times the spectral scale ``max(|lambda_max|, |lambda_min|)``.
        basis: the orthonormal Krylov basis, ``(iterations, dim)``, on the operator's device.
        basis_trace: ``trace(Q^T A Q)`` (the sum of the tridiagonal's diagonal).
    """

    lambda_max: float
    lambda_min: float
    residual_max: float
    residual_min: float
    iterations: int
    converged: bool
    basis: torch.Tensor
    basis_trace: float


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, max_iter: int = 20, tol: float = 1e-3,
            generator: torch.Generator | None = None, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32) -> LanczosResult:
    """Top and bottom eigenvalues of the symmetric operator ``matvec`` (``dim`` x ``dim``) by the Lanczos method.

    Full reorthogonalization (twice, against every previous vector) keeps the basis orthonormal, so there are no
    ghost eigenvalues; memory is ``max_iter x dim`` numbers. It stops once both extreme Ritz pairs have a residual
    ``||A y - theta y|| <= tol * max(|theta_max|, |theta_min|)`` (each is then within that of a true eigenvalue),
    when the Krylov space is invariant (exact), or after ``max_iter`` applications. Reads two numbers from the device
    per iteration.

    Args:
        matvec: ``v -> A v`` on flat vectors.
        dim: the operator's size.
        max_iter: at most this many applications (capped at ``dim``).
        tol: relative residual tolerance (see above).
        generator: CPU generator of the Rademacher start vector (default: seeded with 0).
        device: where the vectors live.
        dtype: their dtype.

    Example::

        >>> a = torch.diag(torch.tensor([-3.0, 1.0, 2.0, 5.0]))
        >>> r = lanczos(lambda v: a @ v, 4)
        >>> round(r.lambda_max, 4), round(r.lambda_min, 4), r.iterations
        (5.0, -3.0, 4)
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    k_max = max(1, min(int(max_iter), int(dim)))
    basis = torch.zeros(k_max, dim, device=device, dtype=dtype)
    q = rademacher(dim, generator, device, dtype)
    q = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    beta_prev = 0.0
    q_prev = torch.zeros_like(q)
    theta = np.zeros(1)
    res = np.zeros(1)
    converged = False
    for j in range(k_max):
        basis[j] = q
        w = matvec(q)
        alpha_t = torch.dot(w, q)
        w = w - alpha_t * q - beta_prev * q_prev
        done = basis[: j + 1]
        for _ in range(2):  # classical Gram-Schmidt, twice is enough
            w = w - done.t() @ (done @ w)
        beta_t = w.norm()
        alpha, beta = (float(x) for x in torch.stack([alpha_t, beta_t]).double().cpu().tolist())
        alphas.append(alpha)
        t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta, vecs = np.linalg.eigh(t)
        res = beta * np.abs(vecs[-1, :])
        scale = max(abs(theta[0]), abs(theta[-1]), np.finfo(np.float64).tiny)
        if beta <= 1e-6 * scale or (res[-1] <= tol * scale and res[0] <= tol * scale and j >= 1):
            converged = True
            break
        if j + 1 < k_max:
            betas.append(beta)
            q_prev, q = q, w / beta
            beta_prev = beta
    n = len(alphas)
    scale = max(abs(theta[0]), abs(theta[-1]), np.finfo(np.float64).tiny)
    converged = converged or bool(res[-1] <= tol * scale and res[0] <= tol * scale)
    return LanczosResult(float(theta[-1]), float(theta[0]), float(res[-1]), float(res[0]), n, converged,
                         basis[:n], float(sum(alphas)))


@dataclass
class TraceEstimate:
    """A Hutchinson trace estimate: ``value`` with its standard error ``stderr`` over ``samples`` probes."""

    value: float
    stderr: float
    samples: int


def hutchinson_trace(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, samples: int = 10,
                     generator: torch.Generator | None = None, basis: torch.Tensor | None = None,
                     basis_trace: float = 0.0, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> TraceEstimate:
    """``trace(A)`` by Hutchinson's estimator ``E[z^T A z]`` with Rademacher probes ``z``.

    With an orthonormal ``basis`` ``Q`` (rows) whose ``trace(Q^T A Q)`` is known (``basis_trace``, e.g. from
    :func:`lanczos`), the probes are projected off ``Q`` and the estimate is
    ``basis_trace + mean(z'^T A z')``, ``z' = (I - Q Q^T) z``: still unbiased (``E[z' z'^T] = I - Q Q^T``), with the
    variance of the top eigen-directions removed (the deflation of Hutch++, Meyer et al. 2021). When the basis spans
    the whole space the trace is exact and no probe is used.

    Args:
        matvec: ``v -> A v``.
        dim: the operator's size.
        samples: Rademacher probes (operator applications).
        generator: CPU generator of the probes (default: seeded with 1).
        basis: optional ``(k, dim)`` orthonormal rows to deflate.
        basis_trace: ``trace(Q^T A Q)`` of that basis.
        device: where the vectors live.
        dtype: their dtype.

    Example::

        >>> a = torch.diag(torch.arange(1.0, 6.0))
        >>> hutchinson_trace(lambda v: a @ v, 5, samples=4).value   # a diagonal matrix: exact with +-1 probes
        15.0
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(1)
    if basis is not None and basis.shape[0] >= dim:
        return TraceEstimate(float(basis_trace), 0.0, 0)
    values = []
    for _ in range(int(samples)):
        z = rademacher(dim, generator, device, dtype)
        if basis is not None and basis.shape[0] > 0:
            z = z - basis.t() @ (basis @ z)
        values.append(torch.dot(z, matvec(z)))
    if not values:
        return TraceEstimate(float(basis_trace), float("nan"), 0)
    v = torch.stack(values).double().cpu().numpy()
    stderr = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return TraceEstimate(float(basis_trace + v.mean()), stderr, len(v))
