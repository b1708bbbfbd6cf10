"""Transfer learning, the framework-free parts: a model's blocks, freezing, named parameter groups (layer-wise
learning-rate decay), the unfreezing schedules, and loading pretrained weights.

A model is cut into **blocks**, ordered from the input to the output; the last one is the **head**, all the others
form the **backbone**. :func:`model_blocks` finds them:

- a model with a ``finetune_blocks()`` method: what it returns (``[(block name, [parameter names]), ...]``, input
  first, head last);
- otherwise the model's direct children in registration order (the order of ``forward`` in bpkit's models): an
  ``nn.ModuleList`` counts one block per entry (``blocks.0``, ``blocks.1``, ...), a recurrent layer (``nn.RNN``,
  ``nn.LSTM``, ``nn.GRU``) one block per stacked layer (``rnn.l0``, ``rnn.l1``), every other child one block; the
  head is the child named ``head`` (else the last block); children without parameters are skipped.

For bpkit's models: :class:`~bpkit.models.MLP` -> ``blocks.0 .. blocks.<depth-2>`` + ``head``;
:class:`~bpkit.models.ResNet` -> ``stem``, ``blocks.0 ..`` + ``head``; :class:`~bpkit.models.RNN` -> ``embed``
(token inputs only), ``rnn.l0 ..`` + ``head``.

Nothing here imports Lightning; the Lightning callbacks that unfreeze during training live in
:mod:`bpkit.callbacks.finetuning`.

Example::

    >>> from bpkit.models import MLP
    >>> model = MLP(64, 10, depth=4, width=16)
    >>> [name for name, _ in model_blocks(model).blocks]
    ['blocks.0', 'blocks.1', 'blocks.2', 'head']
    >>> groups = param_groups(model, FinetuneSpec(mode="llrd", llrd_factor=0.5), lr=1.0)
    >>> [(g["name"], g["lr"]) for g in groups]
    [('blocks.0', 0.125), ('blocks.1', 0.25), ('blocks.2', 0.5), ('head', 1.0)]
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bpkit.errors import BpkitConfigError, check_choice, check_float, check_int

FINETUNE_MODES = ("none", "scratch", "freeze", "backbone", "gradual", "llrd")
"""``none``: train everything (from the pretrained weights when given); ``scratch``: ignore the pretrained weights
(the baseline); ``freeze``: train the head only; ``backbone``: head first, the backbone from ``unfreeze_epoch`` on
with a lower LR; ``gradual``: one more block per epoch from the top (ULMFiT); ``llrd``: everything, each block's LR
``llrd_factor`` times the next one's."""


# ---------------------------------------------------------------- blocks


@dataclass
class ModelBlocks:
    """A model's blocks, input first, head last: ``blocks`` is ``[(name, [(param name, param), ...]), ...]``."""

    blocks: list[tuple[str, list[tuple[str, nn.Parameter]]]]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    @property
    def head(self) -> str:
        return self.blocks[-1][0]

    @property
    def backbone(self) -> list[str]:
        return self.names[:-1]

    def params(self, names: Iterable[str] | None = None) -> list[nn.Parameter]:
        """The parameters of these blocks (all blocks by default), in block order."""
        wanted = set(self.names if names is None else names)
        return [p for name, ps in self.blocks if name in wanted for _, p in ps]

    def block_of(self) -> dict[int, str]:
        """``{id(param): block name}``."""
        return {id(p): name for name, ps in self.blocks for _, p in ps}


_RNN_LAYER = re.compile(r"_l(\d+)(_reverse)?$")


def model_blocks(model: nn.Module) -> ModelBlocks:
    """The blocks of ``model`` (see the module's docstring for the rule).

    Raises:
        BpkitConfigError: when the model has fewer than two blocks (nothing to split into backbone and head).
    """
    named = dict(model.named_parameters())
    custom = getattr(model, "finetune_blocks", None)
    if callable(custom):
        blocks = [(str(name), [(n, named[n]) for n in names]) for name, names in custom()]
    else:
        blocks = []
        head: tuple[str, list] | None = None
        for child_name, child in model.named_children():
            parts: list[tuple[str, list]] = []
            if isinstance(child, nn.ModuleList):
                for i, sub in enumerate(child):
                    parts.append((f"{child_name}.{i}", [(f"{child_name}.{i}.{n}", p)
                                                        for n, p in sub.named_parameters()]))
            elif isinstance(child, nn.RNNBase):
                layers: dict[int, list] = {}
                for n, p in child.named_parameters():
                    m = _RNN_LAYER.search(n)
                    layers.setdefault(int(m.group(1)) if m else 0, []).append((f"{child_name}.{n}", p))
                parts = [(f"{child_name}.l{k}", layers[k]) for k in sorted(layers)]
            else:
                parts = [(child_name, [(f"{child_name}.{n}", p) for n, p in child.named_parameters()])]
            parts = [(n, ps) for n, ps in parts if ps]
            if child_name == "head" and parts:
                head = (child_name, [p for _, ps in parts for p in ps])
            else:
                blocks.extend(parts)
        own = [(n, p) for n, p in model.named_parameters(recurse=False)]
        if own:
            blocks.insert(0, ("_own", own))
        if head is not None:
            blocks.append(head)
    if len(blocks) < 2:
        raise BpkitConfigError("finetune", type(model).__name__,
                               "a model with a backbone and a head (at least two blocks with parameters; "
                               "give the model a finetune_blocks() method)")
    return ModelBlocks(blocks)


def set_trainable(params: Iterable[nn.Parameter], trainable: bool) -> None:
    """``requires_grad`` of every parameter (BatchNorm statistics keep updating: Lightning's ``train_bn``)."""
    for p in params:
        p.requires_grad_(trainable)


# ---------------------------------------------------------------- the options


@dataclass
class FinetuneSpec:
    """A ``finetune`` config, validated (:meth:`check`).

    Args:
        mode: one of :data:`FINETUNE_MODES`.
        unfreeze_epoch: ``backbone``: the epoch the backbone starts training; ``gradual``: the epoch the first
            block below the head is unfrozen (one more each ``every_n_epochs``).
        every_n_epochs: ``gradual``: epochs between two unfreezings.
        backbone_lr_ratio: ``backbone``: the backbone's LR at unfreezing, as a fraction of the head's.
        lr_factor: ``gradual``: each newly unfrozen block's LR is this times the LR of the block above it.
        llrd_factor: ``llrd``: each block's LR is this times the next one's (0 < factor <= 1).
    """

    mode: str = "none"
    unfreeze_epoch: int = 1
    every_n_epochs: int = 1
    backbone_lr_ratio: float = 0.1
    lr_factor: float = 1.0
    llrd_factor: float = 0.5

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, max_epochs: int | None = None) -> "FinetuneSpec":
        """Build and validate from a config mapping (keys named ``finetune.<key>`` in errors).

        Example::

            >>> FinetuneSpec.from_config({"mode": "llrd", "llrd_factor": 0.8}).llrd_factor
            0.8
            >>> try:
            ...     FinetuneSpec.from_config({"mode": "gradual", "unfreeze_epoch": 9}, max_epochs=5)
            ... except BpkitConfigError as err:
            ...     print(err.key, err.value)
            finetune.unfreeze_epoch 9
        """
        cfg = dict(cfg or {})
        known = {"mode", "unfreeze_epoch", "every_n_epochs", "backbone_lr_ratio", "lr_factor", "llrd_factor"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise BpkitConfigError(f"finetune.{unknown[0]}", cfg[unknown[0]], "one of the keys " + ", ".join(
                sorted(known)))
        spec = cls(**cfg)
        spec.check(max_epochs)
        return spec

    def check(self, max_epochs: int | None = None) -> "FinetuneSpec":
        try:
            check_choice("mode", self.mode, FINETUNE_MODES)
            check_int("unfreeze_epoch", self.unfreeze_epoch, minimum=0)
            check_int("every_n_epochs", self.every_n_epochs, minimum=1)
            check_float("backbone_lr_ratio", self.backbone_lr_ratio, 0.0, 1.0, low_inclusive=False)
            check_float("lr_factor", self.lr_factor, 0.0, 1.0, low_inclusive=False)
            check_float("llrd_factor", self.llrd_factor, 0.0, 1.0, low_inclusive=False)
        except BpkitConfigError as err:
            raise err.with_prefix("finetune") from None
        if self.mode in ("backbone", "gradual") and max_epochs is not None and max_epochs > 0 \
                and self.unfreeze_epoch >= max_epochs:
            raise BpkitConfigError("finetune.unfreeze_epoch", self.unfreeze_epoch,
                                   f"an epoch below trainer.max_epochs={max_epochs} (0 .. {max_epochs - 1})")
        return self


def param_groups(model: nn.Module, spec: FinetuneSpec, lr: float) -> list[dict[str, Any]]:
    """The optimizer's named parameter groups at the start of training, and the freezing that goes with them.

    ``none``/``scratch``: one group ``all``; ``freeze``/``backbone``/``gradual``: one group ``head`` (the backbone
    is frozen, ``requires_grad=False``; the unfreezing callbacks add a group per unfrozen part later); ``llrd``: one
    group per block, the head at ``lr``, the block below at ``lr * llrd_factor``, the next at ``lr *
    llrd_factor**2``, ... Each group has a ``name`` (the block's), so the learning rate is logged as ``lr/<name>``.

    Example::

        >>> from bpkit.models import MLP
        >>> model = MLP(8, 2, depth=3, width=4)
        >>> [g["name"] for g in param_groups(model, FinetuneSpec(mode="freeze"), lr=0.1)]
        ['head']
        >>> model.blocks[0].linear.weight.requires_grad, model.head.weight.requires_grad
        (False, True)
    """
    blocks = model_blocks(model)
    set_trainable(blocks.params(), True)
    if spec.mode in ("none", "scratch"):
        return [{"name": "all", "params": blocks.params(), "lr": lr}]
    if spec.mode == "llrd":
        n = len(blocks.blocks)
        return [{"name": name, "params": [p for _, p in ps], "lr": lr * spec.llrd_factor ** (n - 1 - i)}
                for i, (name, ps) in enumerate(blocks.blocks)]
    set_trainable(blocks.params(blocks.backbone), False)
    return [{"name": blocks.head, "params": blocks.params([blocks.head]), "lr": lr}]


class GroupedOptimizer:
    """An optimizer factory (``functools.partial(torch.optim.SGD, lr=0.1)``, a Hydra ``_partial_`` config) that
    builds the optimizer on :func:`param_groups` of ``model`` instead of on the parameters it is given: pass it
    where a LightningModule takes its optimizer factory (:class:`bpkit.task.BackpropTask`'s ``optimizer``).

    Args:
        factory: takes parameters (or parameter groups) and returns an optimizer.
        model: the ``nn.Module`` whose blocks make the groups.
        spec: the :class:`FinetuneSpec`.
        lr: the head's learning rate (default: the factory's own ``lr``).

    Example::

        >>> import functools, torch
        >>> from bpkit.models import MLP
        >>> model = MLP(8, 2, depth=3, width=4)
        >>> make = GroupedOptimizer(functools.partial(torch.optim.SGD, lr=0.1), model, FinetuneSpec(mode="llrd"))
        >>> [(g["name"], g["lr"]) for g in make(model.parameters()).param_groups]
        [('blocks.0', 0.025), ('blocks.1', 0.05), ('head', 0.1)]
    """

    def __init__(self, factory: Any, model: nn.Module, spec: FinetuneSpec, lr: float | None = None) -> None:
        self.factory, self.model, self.spec = factory, model, spec
        self.lr = float(lr if lr is not None else factory([nn.Parameter(torch.zeros(1))]).defaults["lr"])

    def __call__(self, params: Any = None) -> torch.optim.Optimizer:
        return self.factory(param_groups(self.model, self.spec, self.lr))


def gradual_schedule(blocks: ModelBlocks, spec: FinetuneSpec) -> dict[int, list[str]]:
    """``{epoch: [blocks unfrozen at its start]}``: ``backbone`` all at ``unfreeze_epoch``; ``gradual`` one block
    from the top every ``every_n_epochs`` epochs from ``unfreeze_epoch`` on (ULMFiT).

    Example::

        >>> from bpkit.models import MLP
        >>> gradual_schedule(model_blocks(MLP(8, 2, depth=4)), FinetuneSpec(mode="gradual", unfreeze_epoch=1))
        {1: ['blocks.2'], 2: ['blocks.1'], 3: ['blocks.0']}
    """
    if spec.mode == "backbone":
        return {spec.unfreeze_epoch: list(blocks.backbone)}
    if spec.mode == "gradual":
        top_down = list(reversed(blocks.backbone))
        return {spec.unfreeze_epoch + i * spec.every_n_epochs: [name] for i, name in enumerate(top_down)}
    return {}


# ---------------------------------------------------------------- pretrained weights


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` did: tensors ``loaded``, ``missing`` (in the model, not in the file: they keep
    their initial values), ``unexpected`` (in the file, not in the model), ``mismatched`` (``{name: (file shape,
    model shape)}``; skipped), and the key ``prefix`` stripped from the file's names."""

    path: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: dict[str, tuple[list[int], list[int]]]
    prefix: str = ""

    def summary(self, limit: int = 6) -> str:
        """One line for a person (long lists are cut after ``limit`` names)."""

        def names(xs: list[str]) -> str:
            return ", ".join(xs[:limit]) + (f" (+{len(xs) - limit} more)" if len(xs) > limit else "")

        total = len(self.loaded) + len(self.missing)
        parts = [f"pretrained {self.path}: loaded {len(self.loaded)}/{total} tensors"
                 + (f" (prefix '{self.prefix}' stripped)" if self.prefix else "")]
        if self.missing:
            parts.append(f"missing (left as initialised): {names(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected (ignored): {names(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} {list(a)} in the file vs {list(b)}" for k, (a, b) in self.mismatched.items()]
            parts.append(f"shape-mismatched (skipped): {names(shown)}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "loaded": self.loaded, "missing": self.missing, "unexpected": self.unexpected,
                "mismatched": {k: [list(a), list(b)] for k, (a, b) in self.mismatched.items()},
                "prefix": self.prefix}


_EXPECTED = "a Lightning checkpoint (.ckpt) or a state_dict saved with torch.save"


def read_state_dict(path: str | os.PathLike, key: str = "pretrained") -> dict[str, torch.Tensor]:
    """The tensors of a Lightning checkpoint (its ``state_dict``) or of a plain ``state_dict`` file, read with
    ``torch.load(weights_only=True)``: no code stored in the file runs.

    Raises:
        BpkitConfigError: naming ``key``, the path and what is wrong (missing, a directory, unreadable, not written
            by ``torch.save``, needs pickled code, holds no tensors).
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise BpkitConfigError(key, str(path), f"{_EXPECTED}: {p} does not exist")
    if not p.is_file():
        raise BpkitConfigError(key, str(path), f"{_EXPECTED}: {p} is not a file")
    try:
        with open(p, "rb") as f:
            head = f.read(1)
    except OSError as exc:
        raise BpkitConfigError(key, str(path), f"a readable file: {exc.strerror or exc}") from None
    if not (zipfile.is_zipfile(p) or head == b"\x80"):
        raise BpkitConfigError(key, str(path), f"{_EXPECTED}: {p} was not written by torch.save")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        what = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise BpkitConfigError(key, str(path), f"{_EXPECTED} that torch.load(weights_only=True) reads: this one needs "
                               f"pickled Python objects ({what[:160]}); bpkit never runs code from a weights file: "
                               "save its state_dict (torch.save(model.state_dict(), path))") from None
    except Exception as exc:  # a truncated or corrupt archive
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise BpkitConfigError(key, str(path), f"{_EXPECTED}: {p} cannot be read ({detail})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        found = f"a {type(obj).__name__}" + (f" with keys {', '.join(map(str, list(obj)[:5]))}"
                                            if isinstance(obj, Mapping) else "")
        raise BpkitConfigError(key, str(path), f"{_EXPECTED}: {p} holds {found}, not names -> tensors")
    return dict(state)


def _best_prefix(file_keys: Iterable[str], model_keys: set[str]) -> str:
    """The prefix whose removal matches the most of the file's names with the model's (``model.`` for a
    checkpoint of :class:`bpkit.task.BackpropTask`, ``""`` for a plain state_dict, ``_orig_mod.`` ...)."""
    keys = list(file_keys)
    candidates = {""}
    for k in keys:
        parts = k.split(".")
        for i in range(1, min(len(parts), 4)):
            candidates.add(".".join(parts[:i]) + ".")
    def score(prefix: str) -> int:
        return sum(1 for k in keys if k.startswith(prefix) and k[len(prefix):] in model_keys)
    return max(sorted(candidates, key=len), key=score)


def load_pretrained(model: nn.Module, path: str | os.PathLike, strict: bool = False,
                    key: str = "pretrained", skip: Iterable[str] | str | None = None) -> PretrainedReport:
    """Load pretrained weights into ``model`` (a Lightning checkpoint or a ``state_dict`` file).

    The file's names are matched with the model's after removing the prefix that matches the most of them (a
    LightningModule's attribute, ``model.`` for bpkit's task). Tensors whose shape differs from the model's are
    skipped, not loaded.

    Args:
        model: the ``nn.Module`` to load into.
        path: the file.
        strict: fail unless every tensor of the model is loaded and every tensor of the file is used (``skip``
            excepted).
        key: the config key named in errors.
        skip: glob(s) over the model's names of tensors not to load (e.g. ``head.*``: a new head for a new task);
            they are reported as missing.

    Returns:
        A :class:`PretrainedReport`.

    Raises:
        BpkitConfigError: a bad file (see :func:`read_state_dict`), no weight tensor (2-D or more) that fits the
            model (a checkpoint of another model), or, with ``strict``, any missing, unexpected or mismatched tensor.

    Example::

        >>> import tempfile, os, torch
        >>> from bpkit.models import MLP
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save(MLP(8, 3, depth=3, width=4).state_dict(), path)
        >>> report = load_pretrained(MLP(8, 5, depth=3, width=4), path)
        >>> len(report.loaded), sorted(report.mismatched)
        (4, ['head.bias', 'head.weight'])
    """
    import fnmatch

    from bpkit.errors import check_globs

    globs = check_globs(f"{key}_skip", skip)
    state = read_state_dict(path, key)
    own = model.state_dict()
    prefix = _best_prefix(state, set(own))
    skipped = {k for k in own if any(fnmatch.fnmatchcase(k, g) for g in globs)}
    loaded, mismatched, take = [], {}, {}
    unexpected = []
    for k, v in state.items():
        name = k[len(prefix):] if k.startswith(prefix) else None
        if name in skipped:
            continue
        if name is None or name not in own:
            unexpected.append(k)
        elif tuple(v.shape) != tuple(own[name].shape):
            mismatched[name] = (list(v.shape), list(own[name].shape))
        else:
            take[name] = v
    loaded = [k for k in own if k in take]
    missing = [k for k in own if k not in take]
    report = PretrainedReport(str(path), loaded, missing, unexpected, mismatched, prefix)
    matrices = sum(1 for v in state.values() if v.dim() >= 2)
    if not take or (matrices and not any(v.dim() >= 2 for v in take.values())):
        # nothing, or a bias or two of the same size by chance: a checkpoint of another model
        what = f"{len(state)} tensors" if not matrices else f"{matrices} weight tensors (2-D and more)"
        raise BpkitConfigError(key, str(path), f"weights of this model ({type(model).__name__}): none of the file's "
                               f"{what} fits ({report.summary(limit=3)})")
    if strict and ([k for k in missing if k not in skipped] or unexpected or mismatched):
        raise BpkitConfigError(key, str(path), f"weights that fit this model exactly (pretrained_strict=true): "
                               f"{report.summary(limit=3)}")
    with torch.no_grad():
        model.load_state_dict(take, strict=False)
    return report


def with_pretrained_head(model: nn.Module, path: str | os.PathLike, key: str = "pretrained") -> nn.Module:
    """A copy of ``model`` whose head is the one in the pretrained file (tensors of the same shape only): the
    fine-tuned backbone under the source task's own head, to measure how much of the source task it still serves
    (forgetting), whatever happened to the model's head.

    Example::

        >>> import tempfile, os, torch
        >>> from bpkit.models import MLP
        >>> src = MLP(8, 3, depth=3, width=4)
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save(src.state_dict(), path)
        >>> both = with_pretrained_head(MLP(8, 3, depth=3, width=4), path)
        >>> torch.equal(both.head.weight, src.head.weight)
        True
    """
    import copy

    out = copy.deepcopy(model)
    blocks = model_blocks(out)
    head = {n for n, _ in dict(blocks.blocks)[blocks.head]}
    state = read_state_dict(path, key)
    own = out.state_dict()
    prefix = _best_prefix(state, set(own))
    take = {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and k[len(prefix):] in head and v.shape == own[k[len(prefix):]].shape}
    with torch.no_grad():
        out.load_state_dict(take, strict=False)
    return out
