"""What a gradient check found: one row per parameter tensor, printable and loggable."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


class GradcheckError(AssertionError):
    """Raised by :meth:`GradcheckReport.raise_if_failed` (and by ``GradientCheck(on_failure="raise")``)."""


class GradcheckUnsupported(ValueError):
    """The loss cannot be checked by finite differences as given; nothing is wrong with the gradient.

    Raised by :func:`bpkit.gradcheck.check_gradients` for a loss that is not a deterministic function of the
    weights (randomness the check cannot fix, an environment, a state that changes with every call), a
    manual-optimization ``training_step`` (it would step the optimizers), a model without trainable
    parameters, or one that cannot be copied. ``GradientCheck`` turns it into a warning and a skipped check.

    Attributes:
        reason: why, in plain words.
        hint: how to check by hand instead.
    """

    def __init__(self, reason: str, hint: str) -> None:
        self.reason = reason
        self.hint = hint
        super().__init__(f"{reason}. To check by hand: {hint}")


@dataclass
class ParamCheck:
    """The check of one parameter tensor (or one input tensor when a plain function is checked).

    ``rel_error`` is ``max_k |numeric_k - autograd_k| / (scale_k + atol / rtol)`` over the probes ``k``
    (directions or elements), so the tensor passes exactly when ``rel_error <= rtol``. The scale of a
    directional probe is the larger of the gradient's norm and the numeric slope; the scale of an
    element probe is the larger of the two values of that element.

    ``inconclusive`` (float32 and lower only): the tensor did not pass, but finite differences at two step
    sizes disagree with each other as much as with autograd, so round-off, not the backward, explains the
    difference. It is not a failure (``passed`` stays ``False``; the report's ``failed`` leaves it out).
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    probes: int
    grad_norm: float
    max_abs_error: float
    rel_error: float
    passed: bool
    reason: str
    inconclusive: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


@dataclass
class BatchIndependenceReport:
    """Whether the output of sample ``i`` depends on the input of any other sample ``j != i``.

    ``samples`` holds one entry per probed sample: ``sample``, ``own_grad_norm`` (norm of the gradient
    of its output with respect to its own input), ``max_leak`` (the largest gradient norm reaching
    another sample's input), ``worst_other`` (that sample's index) and ``leaking`` (how many other
    samples receive a gradient above the tolerance). ``origin`` says where the mixing happens when it fails:
    the first module (in forward order) whose output mixes samples while its input does not, or the two modules
    between which the parent's forward mixes them.
    """

    batch_size: int
    input_shape: tuple[int, ...]
    tol: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    origin: str | None = None
    """Where the mixing happens when the check fails (the module, or the two modules it happens between)."""

    @property
    def passed(self) -> bool:
        return all(s["leaking"] == 0 for s in self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "batch_size": self.batch_size, "input_shape": list(self.input_shape),
                "tol": self.tol, "samples": [dict(s) for s in self.samples], "origin": self.origin}

    def __str__(self) -> str:
        head = (f"batch independence: {'ok' if self.passed else 'FAILED'} "
                f"(input {tuple(self.input_shape)}, tol {self.tol:g} x own gradient)")
        lines = [head]
        for s in self.samples:
            if s["leaking"]:
                lines.append(f"  output of sample {s['sample']} has a gradient on the inputs of {s['leaking']} other "
                             f"sample(s) (largest: sample {s['worst_other']}, norm {s['max_leak']:.3g} vs own "
                             f"{s['own_grad_norm']:.3g}): something mixes samples (a view/reshape instead of a "
                             f"transpose/permute, or a reduction over the batch dimension)")
            else:
                lines.append(f"  output of sample {s['sample']} depends on its own input only")
        if self.origin:
            lines.append(f"  where: {self.origin}")
        return "\n".join(lines)


@dataclass
class GradcheckReport:
    """The result of :func:`bpkit.gradcheck.check_gradients`.

    Attributes:
        params: one :class:`ParamCheck` per checked tensor, in ``named_parameters()`` order.
        mode, eps, rtol, atol, dtype: how the check was run.
        loss: the loss at the unperturbed point.
        evaluations: loss evaluations used (forward passes; the autograd pass counts as one).
        seconds: wall time of the check.
        batch_independence: the batch-independence result, when it was asked for.
        unchecked: the selected tensors left out when ``max_seconds`` ran out (most informative first).
        total_elements: elements of all selected tensors, checked or not.
        max_seconds: the time budget the check ran under (``None``: none).
        notes: remarks on how the check ran (a float32 fallback, the TBPTT chunk checked).

    Example::

        >>> import torch
        >>> from bpkit.gradcheck import check_gradients
        >>> report = check_gradients(torch.nn.Linear(3, 2), (torch.randn(4, 3), torch.randn(4, 2)),
        ...                          loss_fn=torch.nn.functional.mse_loss)
        >>> report.passed, [p.name for p in report.params]
        (True, ['weight', 'bias'])
    """

    mode: str
    eps: float
    rtol: float
    atol: float
    dtype: str
    loss: float
    evaluations: int
    seconds: float
    params: list[ParamCheck] = field(default_factory=list)
    batch_independence: BatchIndependenceReport | None = None
    unchecked: list[str] = field(default_factory=list)
    total_elements: int | None = None
    max_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        ok = all(p.passed or p.inconclusive for p in self.params)
        return ok and (self.batch_independence is None or self.batch_independence.passed)

    @property
    def failed(self) -> list[str]:
        """Names of the tensors whose gradient is wrong (inconclusive ones are not)."""
        return [p.name for p in self.params if not p.passed and not p.inconclusive]

    @property
    def inconclusive(self) -> list[str]:
        """Names of the tensors whose check could not decide in this dtype (see :class:`ParamCheck`)."""
        return [p.name for p in self.params if p.inconclusive]

    @property
    def checked_tensors(self) -> int:
        return len(self.params)

    @property
    def total_tensors(self) -> int:
        return len(self.params) + len(self.unchecked)

    @property
    def checked_elements(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def complete(self) -> bool:
        """Whether every selected tensor was checked (``max_seconds`` did not cut the check short)."""
        return not self.unchecked

    @property
    def coverage(self) -> str:
        """``checked 12 of 89 tensors (3.1 M of 25 M elements) in 5.0 s``, plus what was left out."""
        total = self.total_elements if self.total_elements is not None else self.checked_elements
        text = (f"checked {self.checked_tensors} of {self.total_tensors} tensors ({_count(self.checked_elements)} of "
                f"{_count(total)} elements) in {self.seconds:.1f} s")
        if self.unchecked:
            text += (f"; the rest were not checked (max_seconds={self.max_seconds:g}): "
                     + ", ".join(self.unchecked[:5]) + (", ..." if len(self.unchecked) > 5 else ""))
        return text

    @property
    def suspect(self) -> str | None:
        """The failing tensor registered last, i.e. usually the one nearest the loss.

        A wrong backward corrupts the gradient of its own parameters and, through its input
        gradient, of every parameter before it; the one nearest the loss is where to look first.
        """
        failed = self.failed
        return failed[-1] if failed else None

    @property
    def max_rel_error(self) -> float:
        errors = [p.rel_error for p in self.params]
        if any(math.isnan(e) for e in errors):
            return math.nan
        return max(errors, default=0.0)

    def raise_if_failed(self) -> None:
        """Raise :class:`GradcheckError` with the table when the check failed."""
        if not self.passed:
            raise GradcheckError(str(self))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (floats may be nan/inf) for loggers and the run record."""
        return {
            "passed": self.passed, "mode": self.mode, "eps": self.eps, "rtol": self.rtol, "atol": self.atol,
            "dtype": self.dtype, "loss": self.loss, "evaluations": self.evaluations, "seconds": self.seconds,
            "max_rel_error": self.max_rel_error, "failed": self.failed, "suspect": self.suspect,
            "params": [p.to_dict() for p in self.params],
            "batch_independence": None if self.batch_independence is None else self.batch_independence.to_dict(),
            "inconclusive": self.inconclusive, "checked_tensors": self.checked_tensors,
            "total_tensors": self.total_tensors, "checked_elements": self.checked_elements,
            "total_elements": self.total_elements, "unchecked": list(self.unchecked),
            "max_seconds": self.max_seconds, "coverage": self.coverage, "notes": list(self.notes),
        }

    def __str__(self) -> str:
        n_failed = len(self.failed)
        verdict = "passed" if n_failed == 0 else f"FAILED for {n_failed} of {len(self.params)} tensors"
        if self.inconclusive:
            verdict += f" ({len(self.inconclusive)} inconclusive in {self.dtype})"
        lines = [f"gradient check {verdict}: mode={self.mode} eps={self.eps:g} rtol={self.rtol:g} "
                 f"atol={self.atol:g} {self.dtype}, loss {self.loss:.6g}, {self.evaluations} evaluations, "
                 f"{self.seconds:.2f} s"]
        if self.unchecked:
            lines.append(self.coverage)
        lines.extend(self.notes)
        rows = [("parameter", "shape", "probes", "grad norm", "rel. error", "result", "reason")]
        for p in self.params:
            result = "ok" if p.passed else ("inconclusive" if p.inconclusive else "FAIL")
            rows.append((p.name, "x".join(map(str, p.shape)) or "scalar", str(p.probes), f"{p.grad_norm:.3g}",
                         f"{p.rel_error:.2e}", result, "" if p.passed else p.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + ("  " + r[6] if r[6] else ""))
        if n_failed:
            lines.append(f"suspect: {self.suspect} (the failing tensor nearest the loss; failures registered "
                         f"before it may be inherited through its input gradient)")
        if self.batch_independence is not None:
            lines.append(str(self.batch_independence))
        return "\n".join(lines)


def _count(n: int) -> str:
    """``3.1 M``, ``25 k``, ``812``: an element count for a one-line summary."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2g} {unit}" if n < 10 * size else f"{n / size:.0f} {unit}"
    return str(n)
