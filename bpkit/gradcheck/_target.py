"""The thing under check, as a float64 copy with a fixed loss: ``loss()`` at the current parameters.

Three kinds of input are accepted, recognised by duck typing (no Lightning import):

- an object with ``training_step`` (a LightningModule): the loss is ``training_step(batch, batch_idx)``,
  taken from a tensor, ``dict["loss"]`` or the first element of a tuple;
- an ``nn.Module`` with a ``loss_fn``: ``loss_fn(model(x), *rest)`` for a batch ``(x, *rest)``;
- a plain callable: ``fn(*batch)``, checked with respect to its floating-point inputs.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bpkit.errors import BpkitConfigError

# Hooks put on a model by monitors and loggers must not fire on the copy; the model's own hooks
# (spectral_norm, old-style weight_norm, user code) are part of its function and are kept.
_FOREIGN_HOOK_PREFIXES = ("bpkit.", "lightning.", "pytorch_lightning.", "lightning_fabric.", "wandb.")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_FLAG_DICTS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


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
            self.module = copy_module(obj, dtype)
            self.module.train(train)
            self.loss_fn = loss_fn
            self.batch_idx = batch_idx
            first = next(self.module.parameters(), None)
            self.batch = convert(batch, dtype, first.device if first is not None else None)
            self.named = _select([(n, p) for n, p in self.module.named_parameters() if p.requires_grad], params)

    @property
    def device(self) -> torch.device:
        return self.named[0][1].device

    def _call(self) -> Any:
        if self.kind == "training_step":
            return _step_loss(self.module.training_step(self.batch, self.batch_idx))
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

    def loss(self) -> torch.Tensor:
        """The loss at the current values of the checked tensors, with randomness re-seeded."""
        torch.manual_seed(self.seed)
        with torch.autocast(self.device.type, enabled=False):
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
    """Fork the CPU and every CUDA RNG: the check re-seeds freely, the caller's streams are unchanged."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield
