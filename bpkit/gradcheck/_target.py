"""The thing under check, as a float64 copy with a fixed loss: ``loss()`` at the current parameters.

Three kinds of input are accepted, recognised by duck typing (no Lightning import):

- an object with ``training_step`` (a LightningModule): the loss is ``training_step(batch, batch_idx)``
  (``training_step(batch)`` when it takes one argument), taken from a tensor, ``dict["loss"]`` or the first
  element of a tuple; a truncated-BPTT module (``bpkit.tbptt.TBPTTModule``) is checked on its first chunk
  that has a loss; other manual-optimization modules cannot be checked this way (their step runs the
  optimizer);
- an ``nn.Module`` with a ``loss_fn``: ``loss_fn(model(x), *rest)`` for a batch ``(x, *rest)``;
- a plain callable: ``fn(*batch)``, checked with respect to its floating-point inputs.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import inspect
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from bpkit.errors import BpkitConfigError
from bpkit.gradcheck.report import GradcheckUnsupported

# Hooks put on a model by monitors and loggers must not fire on the copy; the model's own hooks
# (spectral_norm, old-style weight_norm, user code) are part of its function and are kept.
_FOREIGN_HOOK_PREFIXES = ("bpkit.", "lightning.", "pytorch_lightning.", "lightning_fabric.", "wandb.")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_FLAG_DICTS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


class PromoteFloat32(torch.overrides.TorchFunctionMode):
    """Inside the float64 check, what the model writes as float32 becomes float64.

    Real models cast (``x.float()``, ``x.to(torch.float32)``) and create float32 tensors inside ``forward``
    (``torch.zeros(B, H)`` with the default dtype, ``dtype=torch.float32``): on a float64 copy these either fail
    (``mat1 and mat2 must have the same dtype``) or silently drop to float32 precision, which makes finite
    differences useless. This mode turns those casts and factories into float64 ones, and the default dtype
    is float64 while it is active, so the same code runs end to end in float64.

    Example::

        >>> with PromoteFloat32():
        ...     torch.zeros(2).dtype, torch.ones(2, dtype=torch.float32).dtype, torch.ones(2).double().float().dtype
        (torch.float64, torch.float64, torch.float64)
    """

    def __enter__(self) -> "PromoteFloat32":
        self._default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.set_default_dtype(self._default)
        return super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        elif kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        elif func in (torch.Tensor.to, torch.Tensor.type) and any(a is torch.float32 for a in args[1:]):
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        return func(*args, **kwargs)


def describe(batch: Any) -> str:
    """``(Tensor[64, 64] float32, Tensor[64] int64)``: the structure and shapes of a batch."""
    if isinstance(batch, torch.Tensor):
        return f"Tensor[{', '.join(map(str, batch.shape))}] {str(batch.dtype).replace('torch.', '')}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        inner = ", ".join(describe(v) for v in batch)
        return f"({inner},)" if isinstance(batch, tuple) and len(batch) == 1 else (
            f"({inner})" if isinstance(batch, tuple) else f"[{inner}]")
    return type(batch).__name__


def convert(batch: Any, dtype: torch.dtype, device: torch.device | None) -> Any:
    """A private copy of ``batch``: floating tensors cast to ``dtype``, all tensors moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        out = batch.detach().to(device=device if device is not None else batch.device)
        if out.is_floating_point():
            out = out.to(dtype)
        return out.clone() if out.data_ptr() == batch.data_ptr() else out
    if isinstance(batch, Mapping):
        return {k: convert(v, dtype, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(convert(v, dtype, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(convert(v, dtype, device) for v in batch)
    return batch


def _tensor_leaves(batch: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        yield prefix, batch
    elif isinstance(batch, Mapping):
        for k, v in batch.items():
            yield from _tensor_leaves(v, f"{prefix}.{k}")
    elif isinstance(batch, (tuple, list)):
        for i, v in enumerate(batch):
            yield from _tensor_leaves(v, f"{prefix}.{i}")


def _hook_owner(fn: Any) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    return getattr(fn, "__module__", None) or ""


def copy_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy in ``dtype`` without the hooks of monitors/loggers; the original is not touched.

    Hook callables are shared, not copied (a bound method would otherwise drag its callback, and that
    callback's trainer, into the copy), then the foreign ones are removed from the copy.
    """
    memo: dict[int, Any] = {}
    for m in module.modules():
        for attr in _HOOK_DICTS:
            for fn in getattr(m, attr, {}).values():
                memo[id(fn)] = fn
    trainer = getattr(module, "_trainer", None)
    clone = copy.deepcopy(module, memo)
    for m in clone.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(m, attr, None)
            if not hooks:
                continue
            for key in [k for k, fn in hooks.items() if _hook_owner(fn).startswith(_FOREIGN_HOOK_PREFIXES)]:
                del hooks[key]
                for flag in _HOOK_FLAG_DICTS:
                    getattr(m, flag, {}).pop(key, None)
    if trainer is not None:
        # LightningModule.__getstate__ drops the trainer; training steps that read self.trainer or
        # self.global_step need it back. Logging is switched off below so nothing reaches it.
        object.__setattr__(clone, "_trainer", trainer)
    for name in ("log", "log_dict"):
        if callable(getattr(clone, name, None)):
            object.__setattr__(clone, name, _no_log)
    return clone.to(dtype)


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) and len(out) > 0 else out


def _step_loss(out: Any) -> Any:
    if isinstance(out, Mapping):
        return out.get("loss")
    return _first(out)


def _select(named: list[tuple[str, torch.Tensor]],
            params: str | Sequence[str] | None) -> list[tuple[str, torch.Tensor]]:
    if params is None:
        return named
    globs = [params] if isinstance(params, str) else list(params)
    if not globs or not all(isinstance(g, str) for g in globs):
        raise BpkitConfigError("params", params, "a glob or a list of globs over parameter names, e.g. 'blocks.0.*'")
    chosen = [(n, t) for n, t in named if any(fnmatch.fnmatchcase(n, g) for g in globs)]
    if not chosen:
        names = [n for n, _ in named]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise BpkitConfigError("params", params, f"a glob matching at least one trainable tensor; the names are: "
                                                 f"{shown or '(none)'}")
    return chosen


class Target:
    """The float64 copy, the private batch, the tensors to check and the fixed loss.

    Args:
        obj: the model, LightningModule or function.
        batch: the batch, as the training loop gives it.
        loss_fn: ``loss_fn(output, *rest)`` for an ``nn.Module`` without ``training_step``.
        params: glob(s) over parameter names; ``None`` checks every trainable parameter.
        dtype: the dtype of the copy.
        train: evaluate the copy in training mode (dropout on, BatchNorm with batch statistics).
        seed: the RNG seed set before every evaluation, so dropout draws the same mask each time.
        batch_idx: passed to ``training_step``.
    """

    def __init__(self, obj: Any, batch: Any, *, loss_fn: Callable[..., torch.Tensor] | None, params: Any,
                 dtype: torch.dtype, train: bool, seed: int, batch_idx: int = 0) -> None:
        self.seed = seed
        self.dtype = dtype
        self.module: nn.Module | None = None
        self._weights: dict[int, torch.Tensor] = {}
        if callable(getattr(obj, "training_step", None)) and isinstance(obj, nn.Module):
            self.kind = "training_step"
        elif isinstance(obj, nn.Module):
            self.kind = "module"
        elif callable(obj):
            self.kind = "function"
        else:
            raise BpkitConfigError("model_or_loss_fn", type(obj).__name__,
                                   "an nn.Module (with loss_fn), a LightningModule or a callable")
        self.what = f"{type(obj).__name__}.training_step" if self.kind == "training_step" else type(obj).__name__
        self.batch_desc = describe(batch)
        if self.kind == "function":
            self.fn = obj
            self.batch = convert(batch, dtype, None)
            leaves = [(n, t) for n, t in _tensor_leaves(self.batch, "input") if t.is_floating_point()]
            originals = [t for _, t in _tensor_leaves(batch, "input") if isinstance(t, torch.Tensor)
                         and t.is_floating_point()]
            if any(t.requires_grad for t in originals):
                leaves = [leaf for leaf, t in zip(leaves, originals) if t.requires_grad]
            if isinstance(batch, torch.Tensor):
                leaves = [("input", t) for _, t in leaves]
            if not leaves:
                raise BpkitConfigError("batch", self.batch_desc, "at least one floating-point tensor to differentiate")
            for _, t in leaves:
                t.requires_grad_(True)
            self.named = _select(leaves, params)
        else:
            if loss_fn is not None and not callable(loss_fn):
                raise BpkitConfigError("loss_fn", loss_fn, "a callable loss_fn(output, target)")
            self.tbptt: tuple[int, int, Any] | None = None
            self.takes_batch_idx = True
            if self.kind == "training_step":
                if _is_tbptt(obj):
                    self.what = f"{type(obj).__name__}.training_step (truncated BPTT)"
                elif getattr(obj, "automatic_optimization", True) is False:
                    raise GradcheckUnsupported(
                        "manual optimization (automatic_optimization=False): training_step runs its own backward "
                        "and optimizer steps and returns no loss, so calling it would step your optimizers",
                        "bpkit.gradcheck.check_gradients(model.generator, (z, target), loss_fn=...) or "
                        "bpkit.gradcheck.check_gradients(model.discriminator, (x, labels), "
                        "loss_fn=torch.nn.functional.binary_cross_entropy_with_logits), a sub-module with its loss")
                else:
                    self.takes_batch_idx = _takes_batch_idx(obj.training_step)
            if not any(p.requires_grad for p in obj.parameters()):
                raise GradcheckUnsupported(
                    "the model has no trainable parameters (every parameter has requires_grad=False)",
                    "bpkit.gradcheck.check_gradients(fn, batch) checks a function with respect to the batch's "
                    "floating-point tensors instead")
            try:
                self.module = copy_module(obj, dtype)
            except Exception as exc:
                raise GradcheckUnsupported(
                    f"the module cannot be copied (copy.deepcopy raised {type(exc).__name__}: {exc}); the check "
                    "never runs the training step on your own module, whose state it would change",
                    "bpkit.gradcheck.check_gradients(model.net, (x, y), loss_fn=...) on the network, without what "
                    "cannot be copied (an environment, a file handle)") from exc
            self.module.train(train)
            self.loss_fn = loss_fn
            self.batch_idx = batch_idx
            first = next(self.module.parameters(), None)
            self.batch = convert(batch, dtype, first.device if first is not None else None)
            self.named = _select([(n, p) for n, p in self.module.named_parameters() if p.requires_grad], params)
            if self.kind == "training_step" and _is_tbptt(obj):
                self._first_tbptt_chunk()

    def _first_tbptt_chunk(self) -> None:
        """Pick the first chunk whose step has a loss; the state entering it is computed once and then fixed.

        The chunks before it only advance the (detached) hidden state, as in training, so that state is a
        constant of the check: autograd does not differentiate through it and neither may the finite differences.
        """
        k1 = getattr(self.module, "truncated_bptt_steps", None)
        try:
            chunks = list(self.module.tbptt_split_batch(self.batch, k1)) if k1 is not None else [self.batch]
        except Exception as exc:
            raise BpkitConfigError("batch", self.batch_desc, f"a batch that {type(self.module).__name__}."
                                   f"tbptt_split_batch splits; it raised {type(exc).__name__}: {exc}") from exc
        hiddens: Any = None
        for index, chunk in enumerate(chunks):
            self.batch, self.tbptt = chunk, (index, len(chunks), hiddens)
            if index == len(chunks) - 1:
                return
            with torch.no_grad(), self._precision():
                self._seed()
                _set_tbptt_position(self.module, index, len(chunks))
                out = self.module.training_step(chunk, self.batch_idx, hiddens)
            loss = _step_loss(out)
            if loss is not None:
                return
            hiddens = _detach(out.get("hiddens") if isinstance(out, Mapping) else out[1])

    @property
    def device(self) -> torch.device:
        return self.named[0][1].device

    def _call(self) -> Any:
        if self.kind == "training_step":
            if self.tbptt is not None:
                index, count, hiddens = self.tbptt
                _set_tbptt_position(self.module, index, count)
                return _step_loss(self.module.training_step(self.batch, self.batch_idx, hiddens))
            if self.takes_batch_idx:
                return _step_loss(self.module.training_step(self.batch, self.batch_idx))
            return _step_loss(self.module.training_step(self.batch))
        if self.kind == "function":
            b = self.batch
            if isinstance(b, Mapping):
                out = self.fn(**b)
            else:
                out = self.fn(*b) if isinstance(b, (tuple, list)) else self.fn(b)
            return self._reduce(out)
        b = self.batch
        if isinstance(b, Mapping):
            out, rest = self.module(**b), ()
        elif isinstance(b, (tuple, list)):
            out, rest = self.module(b[0]), tuple(b[1:])
        else:
            out, rest = self.module(b), ()
        out = _first(out)
        return out if self.loss_fn is None else self.loss_fn(out, *rest)

    def _reduce(self, out: Any) -> torch.Tensor:
        """A non-scalar function output becomes a fixed random projection ``sum(w * out)``."""
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        total = None
        for i, o in enumerate(outs):
            if not isinstance(o, torch.Tensor) or not o.is_floating_point():
                continue
            if o.numel() == 1 and len(outs) == 1:
                return o.reshape(())
            if i not in self._weights:
                gen = torch.Generator().manual_seed(self.seed + 7919 * (i + 1))
                self._weights[i] = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
            term = (o * self._weights[i]).sum()
            total = term if total is None else total + term
        return total

    def _seed(self) -> None:
        """The same randomness in every evaluation: torch (CPU and initialised CUDA), Python and NumPy."""
        torch.random.default_generator.manual_seed(self.seed)
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed)

    def _precision(self) -> contextlib.AbstractContextManager:
        """float64 end to end in a float64 check (casts and float32 factories inside the model included)."""
        return PromoteFloat32() if self.dtype == torch.float64 else contextlib.nullcontext()

    def loss(self) -> torch.Tensor:
        """The loss at the current values of the checked tensors, with randomness re-seeded."""
        self._seed()
        with torch.autocast(self.device.type, enabled=False), self._precision():
            out = self._call()
        return out

    def first_loss(self) -> torch.Tensor:
        """:meth:`loss` with grad enabled, turning any failure into an error naming the batch shapes."""
        try:
            with torch.enable_grad():
                loss = self.loss()
        except BpkitConfigError:
            raise
        except Exception as exc:
            raise BpkitConfigError("batch", self.batch_desc, f"a batch that {self.what} accepts; calling it raised "
                                                             f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(loss, torch.Tensor) or not loss.is_floating_point() or loss.numel() != 1:
            got = describe(loss) if isinstance(loss, (torch.Tensor, tuple, list, Mapping)) else repr(loss)
            hint = ("training_step to return the loss (a scalar tensor, dict['loss'] or a tuple starting with it)"
                    if self.kind == "training_step" else
                    "a scalar loss: pass loss_fn, or a model whose output is its loss"
                    if self.kind == "module" else "a function returning floating-point tensors")
            raise BpkitConfigError("loss", got, hint)
        return loss.reshape(())


@contextlib.contextmanager
def frozen_randomness() -> Iterator[None]:
    """Fork the torch CPU and every CUDA RNG, Python's ``random`` and NumPy's global RNG.

    The check re-seeds freely; the caller's streams are as they were afterwards, even on an exception.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _is_tbptt(obj: Any) -> bool:
    """A ``bpkit.tbptt.TBPTTModule`` (duck-typed: the engines do not import Lightning)."""
    return callable(getattr(obj, "tbptt_split_batch", None)) and hasattr(obj, "truncated_bptt_steps")


def _set_tbptt_position(module: nn.Module, index: int, count: int) -> None:
    module.tbptt_split_idx, module.tbptt_num_splits, module.tbptt_recomputing = index, count, False


def _detach(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, Mapping):
        return {k: _detach(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_detach(v) for v in tree)
    return tree


def _takes_batch_idx(step: Callable[..., Any]) -> bool:
    """Lightning's rule: ``batch_idx`` is passed when the step names it or takes two or more positional arguments."""
    try:
        sig = inspect.signature(step)
    except (TypeError, ValueError):
        return True
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in sig.parameters.values() if p.kind in kinds]
    return ("batch_idx" in sig.parameters or len(positional) >= 2
            or any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()))
