"""GradientProbe: every layer's gradient at every optimizer step, nearly free, with pathology detection.

The framework-free engine of :class:`bpkit.callbacks.GradientMonitor`: the same statistics, rules, actions and
metric names in a plain PyTorch loop, in Lightning Fabric, or driven by the callback. No Lightning import.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from bpkit.alert import Alert
from bpkit.detect import (ExplodingDetector, ExplodingGradientError, NonFiniteDetector, NonFiniteGradientError,
                          SpikeDetector, SteadyExplosionDetector, VanishingDetector)
from bpkit.detect.nonfinite import nonfinite_message
from bpkit.errors import BpkitConfigError, check_choice, check_float, check_int
from bpkit.probe.origin import locate_nonfinite
from bpkit.record import WHERE_TOTAL_NORM
from bpkit.stats.grads import GradStats, grad_stats
from bpkit.stats.histograms import LogHistogramSpec, log_histograms
from bpkit.stats.norms import group_norms
from bpkit.stats.readback import Readback
from bpkit.stats.sharded import _plain
from bpkit.stats.step_rows import StepRows
from bpkit.stats.updates import snapshot, update_norms, update_ratios

ACTIONS = ("warn", "skip", "stop", "raise")


def _is_not_none(value: Any) -> bool:
    return value is not None
GROUP_BY = ("parameter", "module")


def _detector_kwargs(key: str, value: Any, cls: type) -> dict[str, Any] | None:
    """``True`` -> defaults, ``False``/``None`` -> off, a mapping -> keyword arguments (validated)."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise BpkitConfigError(key, value, "true, false or a mapping of detector options")
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "name")]
    for k in value:
        if k not in allowed:
            raise BpkitConfigError(f"{key}.{k}", value[k], "an option among " + ", ".join(allowed))
    try:
        cls(**dict(value))
    except BpkitConfigError as err:
        raise err.with_prefix(key) from None
    return dict(value)


HIST_EVERY_LOG = 10
"""The default histogram cadence of a long (or unbounded) run, in log intervals: W&B's ``watch`` takes 1000 steps."""
HIST_MIN_SNAPSHOTS = 8
"""The default cadence gives a run of known length at least this many histogram snapshots (when it has as many
log steps)."""


def histogram_every_log(total_steps: float | None, interval: int) -> int:
    """The default histogram cadence, in log intervals: every 10th log step of a long run, more often in a short one
    so it still gets about :data:`HIST_MIN_SNAPSHOTS` snapshots, never more often than every log step.

    Args:
        total_steps: the run's optimizer steps (``None`` or infinite: unknown).
        interval: the log interval in steps (``0``: no periodic logging).

    Example::

        >>> histogram_every_log(50, 10), histogram_every_log(160, 10), histogram_every_log(100_000, 50)
        (1, 2, 10)
    """
    if interval <= 0 or total_steps is None or not math.isfinite(total_steps) or total_steps <= 0:
        return HIST_EVERY_LOG
    log_steps = int(total_steps) // interval
    return max(1, min(HIST_EVERY_LOG, log_steps // HIST_MIN_SNAPSHOTS))


class _Plan:
    """What the monitor watches for one optimizer, and the detectors' state for it."""

    def __init__(self, params: list[torch.Tensor], names: list[str], group_by: str, device: torch.device,
                 covers_all: bool, interval: int, check_every: int) -> None:
        self.params, self.names, self.covers_all = params, names, covers_all
        self.grouped = group_by == "module"
        if self.grouped:
            self.units: list[str] = []
            index = []
            for name in names:
                unit = name.rsplit(".", 1)[0] if "." in name else "(root)"
                if unit not in self.units:
                    self.units.append(unit)
                index.append(self.units.index(unit))
        else:
            self.units, index = list(names), list(range(len(names)))
        self.unit_of_host = np.array(index, dtype=np.int64)
        self.unit_of = torch.as_tensor(index, dtype=torch.int64, device=device)
        # the vanishing rule looks at weight matrices/kernels only: a bias or a norm scale can have a
        # near-zero gradient by construction (a bias right before batch norm gets exactly zero)
        self.vanishing_eligible = self.units_present(np.array([p.dim() >= 2 for p in params]))
        self.detectors: dict[str, Any] = {}
        width = len(self.units)
        # one row per optimizer step (unit norms, total) and per check step (unit and weight norms),
        # read back at the next log step and replayed through the detectors there
        self.rows = StepRows([(width,), ()], interval + 2)
        self.checks = StepRows([(width,), (width,)], interval // check_every + 3)
        self.param_ids = tuple(id(p) for p in params)
        self.weight_norms: torch.Tensor | None = None  # per unit, from the last step that computed them
        self.pending: dict[str, torch.Tensor] | None = None
        self.snapshot: torch.Tensor | None = None
        self.snapshot_buffer: torch.Tensor | None = None  # kept between logging steps on a CPU only
        self.snapshot_params: list[torch.Tensor] = []
        self.snapshot_units: torch.Tensor | None = None
        self.optimizer_size = 0  # parameters in the optimizer's groups when the plan was made
        # host bookkeeping of the replay: which units ever got a non-zero gradient, and for how many steps a
        # unit had a gradient that was exactly zero (structurally unused parameters, not vanishing ones)
        self.nonzero = np.zeros(len(self.units), dtype=bool)
        self.zero_steps = np.zeros(len(self.units), dtype=np.int64)
        self.unused_flagged = np.zeros(len(self.units), dtype=bool)
        self.trainable: np.ndarray | None = None  # per unit at the pending log step; None: all
        self.present_masks: dict[tuple[bool, ...], tuple[torch.Tensor, np.ndarray]] = {}
        self.fast: bool | None = None  # GradientProbe._quick_step applies (None: not known yet)
        self.checks_rules = True  # the vanishing or steady rule runs on check steps
        self.actions: list[tuple[str, str]] | None = None  # (rule, action) pairs that decide on the step itself
        self.world = 1  # processes that take the step's decisions together

    def units_of(self, stats: GradStats) -> GradStats:
        return stats.grouped(self.unit_of, len(self.units)) if self.grouped else stats

    def units_present(self, present: np.ndarray) -> np.ndarray:
        """Per unit: does any of its tensors have the property (host booleans per tensor)."""
        if not self.grouped:
            return present.astype(bool)
        hits = np.zeros(len(self.units), dtype=np.int64)
        np.add.at(hits, self.unit_of_host, present.astype(np.int64))
        return hits > 0


@dataclass
class StepNorms:
    """The gradient norms of one optimizer step as the probe computed them, for a clipper to reuse.

    Attributes:
        param_ids: ``id`` of each parameter, in the order of ``per_tensor``.
        per_tensor: ``(N,)`` L2 norm of each gradient, on the device.
        total: ``()`` L2 norm of all of them together, on the device.
        total_host: the same number on the host when the probe read it anyway (its non-finite action), else ``None``.
        norm_type: always ``2.0``.
    """

    param_ids: tuple[int, ...]
    per_tensor: torch.Tensor
    total: torch.Tensor
    total_host: float | None = None
    norm_type: float = 2.0


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside the wrappers that prefix parameter names: Lightning Fabric's ``_FabricModule``
    (``_forward_module.``), DDP/DataParallel (``module.``) and ``torch.compile`` (``_orig_mod.``)."""
    for _ in range(8):
        inner = getattr(model, "_original_module", None)  # Fabric
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)  # torch.compile
        if not isinstance(inner, torch.nn.Module) and isinstance(
                model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            inner = model.module
        if not isinstance(inner, torch.nn.Module) or inner is model:
            return model
        model = inner
    return model


def _dist_world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _dist_sum(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.clone()
    torch.distributed.all_reduce(out)
    return out


def _dist_any(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


class GradientProbe:
    r"""Per-layer gradient statistics at every optimizer step, computed on the device in a few fused kernels and
    read back once per log interval, with vanishing / exploding / non-finite / spike / unused detection.

    Call :meth:`step` after ``backward()`` (and after AMP unscaling) and before ``optimizer.step()``, once per
    optimizer step; it returns ``False`` when the step must be skipped (a non-finite gradient with
    ``on_nonfinite="skip"``/``"stop"``, an exploding one with ``on_exploding="skip"``/``"stop"``): the probe has then
    already set the gradients to ``None``, so even an ``optimizer.step()`` leaves the weights and the optimizer state
    as they were. Call :meth:`flush` at log steps (:meth:`is_log_step`): the one host read, which returns a flat dict
    of metrics (``grad/norm_total``, ``grad/norm/<name>``, ``grad/max/<name>``, ``weight/norm/<name>``,
    ``update/ratio/<name>``, ``grad/alert/<kind>`` (alerts since the last flush), ``grad/skipped_steps``: the keys
    GradientMonitor logs; with several optimizers ``grad/opt<i>/norm_total`` and ``grad/norm/opt<i>/<name>``), puts the
    histograms in :attr:`histograms`, and appends new alerts to :attr:`alerts`. Between log steps nothing is read
    from the device (except the one number an action needs per step).

    The options ``per_layer``, ``histograms``, ``update_ratio``, ``histogram_every_n_steps``, ``include``,
    ``exclude``, ``group_by``, ``on_nonfinite``, ``on_exploding``, ``vanishing``, ``exploding``, ``spike``,
    ``check_every_n_steps``, ``histogram_range``, ``bins_per_decade``, ``steady`` and ``histogram_samples`` are
    those of :class:`bpkit.callbacks.GradientMonitor`.

    Args:
        model: an ``nn.Module`` (Fabric's, DDP's and ``torch.compile``'s wrappers are looked through, so names are
            the user's) or an iterable of ``(name, parameter)`` pairs; ``None``: given later with :meth:`bind`.
        log_every_n_steps: the log interval (Lightning's rule: step ``s`` logs when ``(s + 1) % n == 0``; ``0``: never).
        optimizers: with more than one optimizer (a GAN), the list of them: each optimizer's step then watches its
            own parameters and the metrics are named ``grad/opt<i>/...``.
        total_steps: the run's length in optimizer steps when known (sets the default histogram cadence).

    Raises:
        BpkitConfigError: on a bad option, or (at the first step) an include/exclude glob that matches nothing.
        NonFiniteGradientError, ExplodingGradientError: with ``on_nonfinite="raise"`` / ``on_exploding="raise"``.

    Example::

        >>> import torch
        >>> from bpkit import GradientProbe
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> probe = GradientProbe(model, log_every_n_steps=5, histograms=False)
        >>> for step in range(10):
        ...     x = torch.randn(16, 4)
        ...     loss = model(x).pow(2).mean()
        ...     loss.backward()
        ...     if step == 3:
        ...         model[0].weight.grad[0, 0] = float("nan")  # a planted NaN
        ...     if probe.step(step, loss=loss):
        ...         opt.step()
        ...     opt.zero_grad()
        ...     if probe.is_log_step(step):
        ...         metrics = probe.flush()
        >>> sorted(k for k in metrics if k.startswith("grad/norm"))[:2]
        ['grad/norm/0.bias', 'grad/norm/0.weight']
        >>> probe.skipped_steps, [a.kind for a in probe.alerts]
        (1, ['nonfinite'])
    """

    def __init__(self, model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]] | None, log_every_n_steps: int = 50,
                 per_layer: bool = True, histograms: bool = True, update_ratio: bool = True,
                 histogram_every_n_steps: int | None = None, include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None, group_by: str = "parameter",
                 on_nonfinite: str = "skip", on_exploding: str = "warn",
                 vanishing: bool | Mapping[str, Any] = True, exploding: bool | Mapping[str, Any] = True,
                 spike: bool | Mapping[str, Any] = True, check_every_n_steps: int = 10,
                 histogram_range: Sequence[float] = (-12.0, 4.0), bins_per_decade: int = 2,
                 steady: bool | Mapping[str, Any] = True, optimizers: Sequence[Any] | None = None,
                 total_steps: float | None = None, histogram_samples: int | None = None) -> None:
        from bpkit.errors import check_bool, check_globs

        self.model: torch.nn.Module | None = None
        self._named: list[tuple[str, torch.Tensor]] | None = None
        self.per_layer = check_bool("per_layer", per_layer)
        self.histograms = check_bool("histograms", histograms)
        if histogram_every_n_steps is not None:
            check_int("histogram_every_n_steps", histogram_every_n_steps, 1)
        self.histogram_every_n_steps = histogram_every_n_steps
        self.update_ratio = check_bool("update_ratio", update_ratio)
        if histogram_samples is not None:
            check_int("histogram_samples", histogram_samples, 1)
        self.histogram_samples = histogram_samples
        self._histograms_taken = 0  # the sampled histograms' phase
        self.include = check_globs("include", include)
        self.exclude = check_globs("exclude", exclude)
        self.group_by = check_choice("group_by", group_by, GROUP_BY)
        self.check_every_n_steps = check_int("check_every_n_steps", check_every_n_steps, 1)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ACTIONS)
        self.on_exploding = check_choice("on_exploding", on_exploding, ACTIONS)
        self._vanishing = _detector_kwargs("vanishing", vanishing, VanishingDetector)
        self._exploding = _detector_kwargs("exploding", exploding, ExplodingDetector)
        self._spike = _detector_kwargs("spike", spike, SpikeDetector)
        self._steady = _detector_kwargs("steady", steady, SteadyExplosionDetector)
        if on_exploding != "warn" and self._exploding is None:
            raise BpkitConfigError("on_exploding", on_exploding, "'warn' when the exploding detector is off")
        if not isinstance(histogram_range, Sequence) or isinstance(histogram_range, str) or len(histogram_range) != 2:
            raise BpkitConfigError("histogram_range", histogram_range, "a (low, high) pair of log10 values")
        low = check_float("histogram_range[0]", histogram_range[0])
        high = check_float("histogram_range[1]", histogram_range[1], low, low_inclusive=False)
        self.hist_spec = LogHistogramSpec(low, high, check_int("bins_per_decade", bins_per_decade, 1))
        self.optimizers: list[Any] = list(optimizers or [])
        self.alerts: list[Alert] = []
        self.last_histograms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.skipped_steps = 0
        self.should_stop = False
        self.last_norms: StepNorms | None = None
        self.flushed_step: int | None = None
        #: sums a tensor over the processes (default: torch.distributed when it runs with more than one)
        self.reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
        #: "did any process decide so?" (default: torch.distributed when it runs with more than one)
        self.reduce_any: Callable[[bool], bool] | None = None
        self.world_size: int | None = None  # None: torch.distributed's
        self._new_alerts: list[Alert] = []
        self._since_flush: list[Alert] = []  # counted in the next flush's grad/alert/<kind>
        self._plans: dict[int, _Plan] = {}
        self._plan_by_opt: dict[int, _Plan] = {}
        self._loaded: dict[str, Any] = {}
        self._loss_spike: SpikeDetector | None = None if self._spike is None else \
            SpikeDetector(("loss", "grad_norm_total"), **self._spike)
        self._totals: list[torch.Tensor] = []
        # the loss of each step and its total norm, kept as tensors until the next read-back: steps, losses, totals
        self._loss_refs: tuple[list[int], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
        self._unused_after = 10  # steps with an exactly zero gradient before a tensor is called unused
        self._last_step = 0  # the step of the last optimizer step seen
        self._pending_step: int | None = None  # the step whose statistics wait to be flushed
        self._recent: dict[int, dict[str, Any]] = {}  # the last steps replayed, for a crash report
        self._checked = False
        self.log_every_n_steps = 50
        self.configure(log_every_n_steps, total_steps)
        if model is not None:
            self.bind(model)

    # ---------------------------------------------------------------- configuration

    def bind(self, model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]]) -> "GradientProbe":
        """Watch this model (or these named parameters); the rules' state and the alerts are kept. Returns the
        probe. (A callback makes its probe when it is constructed, and binds it to the LightningModule at setup.)"""
        if isinstance(model, torch.nn.Module):
            self.model, self._named = unwrap_model(model), None
        else:
            try:
                named = [(str(n), p) for n, p in model]
            except (TypeError, ValueError):
                raise BpkitConfigError("model", type(model).__name__,
                                       "an nn.Module or an iterable of (name, parameter) pairs") from None
            if not named or not all(isinstance(p, torch.Tensor) for _, p in named):
                raise BpkitConfigError("model", type(model).__name__,
                                       "an nn.Module or a non-empty iterable of (name, parameter) pairs")
            self.model, self._named = None, named
        self._checked = False
        self._plans.clear()
        self._plan_by_opt.clear()
        return self

    def configure(self, log_every_n_steps: int | None = None, total_steps: float | None = None,
                  accumulate: int = 1) -> None:
        """Set the log interval (``0``: no periodic flush), the run's length (for the default histogram cadence)
        and the micro-batches per optimizer step (sizes the loss buffer) before the first step."""
        if log_every_n_steps is not None:
            self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 0)
        self._hist_every_log = histogram_every_log(total_steps, self.log_every_n_steps)
        self._rows_capacity = (self.log_every_n_steps or 50) + 2  # with no periodic log: read back when full
        if not len(getattr(self, "_loss_rows", ())):
            self._loss_rows = StepRows([(), ()], self._rows_capacity * max(1, int(accumulate or 1)))

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """Every parameter the probe could watch, frozen ones included, with the user's names."""
        return list(self.model.named_parameters()) if self.model is not None else list(self._named or [])

    def selected(self) -> list[tuple[str, torch.Tensor]]:
        """The parameters that include/exclude select (frozen ones too: one unfrozen later is watched from its
        first gradient)."""
        return [(n, p) for n, p in self.named_parameters()
                if (not self.include or any(fnmatch.fnmatchcase(n, g) for g in self.include))
                and not any(fnmatch.fnmatchcase(n, g) for g in self.exclude)]

    def has_trainable(self) -> bool:
        """Does any watched parameter require a gradient?"""
        return any(p.requires_grad for _, p in self.named_parameters())

    def check_selection(self) -> None:
        """Raise :class:`BpkitConfigError` for an include/exclude glob that matches no parameter name, or a selection
        that leaves nothing (names of frozen parameters count: a glob may name layers unfrozen later)."""
        self._checked = True
        names = [n for n, _ in self.named_parameters()]
        if not names:
            raise BpkitConfigError("model", "no parameters", "a model with at least one parameter")
        for key, globs in (("include", self.include), ("exclude", self.exclude)):
            for g in globs:
                if not any(fnmatch.fnmatchcase(n, g) for n in names):
                    raise BpkitConfigError(key, g, f"a glob matching at least one parameter name (e.g. {names[0]!r})")
        if not self.selected():
            raise BpkitConfigError("include", list(self.include), "a selection that leaves at least one parameter "
                                                                  "after exclude")

    # ---------------------------------------------------------------- cadence

    def is_log_step(self, step: int) -> bool:
        """Does ``step`` log (Lightning's rule: ``(step + 1) % log_every_n_steps == 0``; never with ``0``)?"""
        return self.log_every_n_steps > 0 and (step + 1) % self.log_every_n_steps == 0

    def is_histogram_step(self, step: int) -> bool:
        """Histograms on this step: ``histogram_every_n_steps`` when given, else the first log step and every
        ``histogram_every_log(...)``-th log step."""
        if not self.histograms or self.log_every_n_steps <= 0:
            return False
        if self.histogram_every_n_steps:
            return (step + 1) % self.histogram_every_n_steps == 0
        if (step + 1) % self.log_every_n_steps:
            return False
        index = (step + 1) // self.log_every_n_steps  # 1 for the first log step
        return index == 1 or index % self._hist_every_log == 0

    # ---------------------------------------------------------------- plans

    def _index_of(self, optimizer: Any) -> int:
        for i, opt in enumerate(self.optimizers):
            if opt is optimizer or getattr(optimizer, "_optimizer", None) is opt:
                return i
        return len(self._plans) if len(self.optimizers) > 1 else 0

    def _plan(self, optimizer: Any) -> _Plan | None:
        key = id(optimizer)
        plan = self._plan_by_opt.get(key)
        size = sum([len(group["params"]) for group in optimizer.param_groups]) if optimizer is not None else -1
        if plan is not None and plan.optimizer_size == size:
            return plan
        if not self._checked:
            self.check_selection()
        index = self._index_of(optimizer) if optimizer is not None else 0
        selected = self.selected()
        if optimizer is not None and len(self.optimizers) > 1:  # each optimizer's plan watches its own parameters
            in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
            selected = [(n, p) for n, p in selected if id(p) in in_opt]
        if not selected:
            return None
        if plan is not None and [n for n, _ in selected] == plan.names:
            plan.optimizer_size = size  # a group was added, the watched tensors are the same: keep the plan
            return plan
        if plan is not None:
            self._drain()  # the old plan's buffered steps go through its detectors before it is replaced
            self._plans.pop(index, None)
        # every parameter is in the plan: the tensors with a gradient are then all the gradients
        covers_all = len(selected) == len(self.named_parameters())
        plan = _Plan([p for _, p in selected], [n for n, _ in selected], self.group_by, selected[0][1].device,
                     covers_all, self._rows_capacity - 2, self.check_every_n_steps)
        plan.optimizer_size = size
        # processes that decide together: known when the plan is made (torch.distributed starts before training)
        plan.world = self._world()
        plan.checks_rules = self._vanishing is not None or self._steady is not None
        if self._vanishing is not None:
            plan.detectors["vanishing"] = VanishingDetector(**self._vanishing)
        if self._exploding is not None:
            plan.detectors["exploding"] = ExplodingDetector(**self._exploding)
        plan.detectors["nonfinite"] = NonFiniteDetector()
        if self._steady is not None:
            plan.detectors["steady"] = SteadyExplosionDetector(**self._steady)
        saved = self._loaded.get("plans", {}).pop(index, None)
        if saved is not None and list(saved["units"]) != plan.units:
            import warnings

            warnings.warn(f"bpkit GradientProbe: the checkpoint's state watched {len(saved['units'])} tensors, "
                          f"this run watches {len(plan.units)}; the detectors start afresh.", UserWarning, stacklevel=3)
            saved = None
        if saved is not None:
            for kind, det in plan.detectors.items():
                if kind in saved["detectors"]:
                    det.load_state_dict(saved["detectors"][kind])
        self._plans[index] = plan
        self._plan_by_opt[key] = plan
        return plan

    # ---------------------------------------------------------------- the step

    def step(self, step: int, loss: torch.Tensor | float | None = None, optimizer: Any = None,
             replay: Callable[[], Any] | None = None) -> bool:
        """The statistics of this optimizer step's gradients, on the device; the rules decide.

        Args:
            step: the step number (the one the metrics of this batch are logged at).
            loss: this step's loss (for the spike rule); leave it out and call :meth:`observe_loss` instead when
                the loss is known only later.
            optimizer: the optimizer about to step (needed with several optimizers, and to drop the gradients of
                exactly its parameters on a skipped step).
            replay: a function that runs this step's forward pass again and returns its loss (e.g.
                ``lambda: loss_fn(model(x), y)``). On a non-finite step that the probe skips, stops or raises on, it
                is replayed once with hooks on every module to find where the first NaN/Inf appears: the alert's
                ``origin`` and message name the module and the samples (:func:`bpkit.probe.origin.locate_nonfinite`).
                Healthy steps never call it.

        Returns:
            ``False`` when the step must be skipped (its gradients are already set to ``None``), else ``True``.
        """
        ok = self._quick_step(step, optimizer, replay)
        if ok is None:
            with torch.no_grad():
                self.last_norms = None
                plan = self._plan(optimizer)
                ok = True if plan is None else self._step(plan, int(step), optimizer, replay)
        if loss is not None:
            self.observe_loss(step, loss)
        return ok

    def _quick_step(self, step: int, optimizer: Any, replay: Callable[[], Any] | None) -> bool | None:
        """The common step once its plan is known to be plain (:meth:`_is_plain`): the norms into the step's row
        with as little Python as the kernels allow (on a small model the Python is most of the cost).
        ``None``: take the general path (a log, histogram or early check step, a changed optimizer, a gradient that
        is missing or of another kind, a full buffer)."""
        plan = self._plan_by_opt.get(id(optimizer))
        if plan is None or plan.fast is not True:
            return None
        after, every = step + 1, self.log_every_n_steps
        if every and (after % every == 0 or (self.histograms and self.histogram_every_n_steps
                                             and after % self.histogram_every_n_steps == 0)):
            return None
        check = plan.checks_rules and step % self.check_every_n_steps == 0
        if check and (plan.weight_norms is None or len(plan.checks.steps) >= plan.checks.capacity):
            return None
        if optimizer is not None and sum([len(g["params"]) for g in optimizer.param_groups]) != plan.optimizer_size:
            return None
        rows = plan.rows
        if len(rows.steps) >= rows.capacity:
            return None
        row_norms, row_total = rows.next_row()
        try:  # a missing gradient (TypeError), one on another device or needing autograd (RuntimeError)
            torch.stack(torch._foreach_norm([p.grad for p in plan.params], 2.0, dtype=torch.float32), out=row_norms)
        except (TypeError, RuntimeError):
            return None
        torch.linalg.vector_norm(row_norms, 2.0, out=row_total)
        rows.commit(step)
        if check:
            check_norms, check_weights = plan.checks.push(step, row_norms.device, plan.vanishing_eligible)
            check_norms.copy_(row_norms)
            check_weights.copy_(plan.weight_norms)
        self._last_step = step
        self.last_norms = StepNorms(plan.param_ids, row_norms, row_total)
        self._totals.append(row_total)
        actions = plan.actions
        if not actions:
            return True
        total_host = None
        if actions[-1][0] != "exploding":  # the exploding rule reads its buffered history instead
            total_host = self._read_total(row_total)
            if plan.world == 1 and math.isfinite(total_host):
                return True
        with torch.no_grad():
            return self._decide(plan, step, optimizer, replay, row_total, GradStats(row_norms, row_total),
                                row_norms.device, total_host)

    @staticmethod
    def _is_plain(plan: _Plan) -> bool:
        """Does the short path (:meth:`_quick_step`) apply to this plan: every watched tensor with a plain dense
        gradient on one device, per tensor (no grouping, every parameter watched)? Decided from the gradients once
        per plan, and again after each step the general path takes; not decided while a gradient is missing."""
        if plan.fast is None:
            grads = [p.grad for p in plan.params]
            if not all(map(_is_not_none, grads)):
                return False
            device = grads[0].device
            plan.fast = (not plan.grouped and plan.covers_all and _plain(grads) and _plain(plan.params)
                         and all(g.device == device and g.layout == torch.strided for g in grads))
        return plan.fast

    def _step(self, plan: _Plan, step: int, optimizer: Any, replay: Callable[[], Any] | None) -> bool:
        self._last_step = step
        if self._is_plain(plan):
            ok = self._quick_step(step, optimizer, replay)
            if ok is not None:
                return ok
        plan.fast = None if plan.fast is not False else False
        present = tuple(p.grad is not None for p in plan.params)
        present_mask = None
        if all(present):
            params, present_idx = plan.params, None
        elif any(present):
            params = [p for p, ok in zip(plan.params, present) if ok]
            cached = plan.present_masks.get(present)
            if cached is None:  # frozen or unused tensors: the same few patterns step after step
                cached = (torch.as_tensor([i for i, ok in enumerate(present) if ok], device=params[0].device),
                          np.array(present))
                plan.present_masks[present] = cached
            present_idx, present_mask = cached
        else:
            return True
        grads = [p.grad for p in params]
        hist_step = self.is_histogram_step(step)
        log_step = hist_step or self.is_log_step(step)
        check_step = ("vanishing" in plan.detectors or "steady" in plan.detectors) and \
            (log_step or step % self.check_every_n_steps == 0)
        device = grads[0].device
        if plan.rows.must_drain(device) or plan.checks.must_drain(device):
            self._drain()  # only when a log interval outgrows the buffer
        # the per-step cost of detection: the norms are written into a preallocated device buffer, replayed
        # through the detectors at the next flush
        row_norms, row_total = plan.rows.push(step, device, present_mask)
        direct = present_idx is None and not plan.grouped
        # the vanishing rule compares with the weight norms of the last logging step (weights move ~1e-3 per
        # step, the rule's threshold is 1e-5 of the weight norm): a check step reads no weights
        need_weights = log_step or (check_step and (plan.weight_norms is None or present_idx is not None))
        if log_step and device.type == "cpu" and plan.snapshot_buffer is None and self.update_ratio:
            # one model-sized float32 buffer kept on a CPU for the logging steps' |g| and weight snapshot
            plan.snapshot_buffer = torch.empty(sum(p.numel() for p in params), device=device)
        stats = grad_stats(grads, params if need_weights else None, max_abs=log_step,
                           out=(row_norms, row_total) if direct else None,
                           scratch=plan.snapshot_buffer if log_step else None)
        if plan.covers_all or self._all_with_grad(params):  # every gradient is in `params`: a clipper may reuse them
            self.last_norms = StepNorms(plan.param_ids if present_idx is None else tuple(id(p) for p in params),
                                        stats.norms, stats.total)
        if present_idx is not None:
            stats = self._scatter(stats, present_idx, len(present))
        units = plan.units_of(stats)
        if not direct:
            row_norms.copy_(units.norms)
            row_total.copy_(stats.total)
        if units.weight_norms is not None and present_idx is None:
            plan.weight_norms = units.weight_norms
        if check_step:
            eligible = plan.vanishing_eligible if present_idx is None else \
                plan.vanishing_eligible & plan.units_present(np.array(present))
            check_norms, check_weights = plan.checks.push(step, device, eligible)
            check_norms.copy_(units.norms)
            check_weights.copy_(units.weight_norms if units.weight_norms is not None else plan.weight_norms)
        self._totals.append(stats.total)

        if log_step:
            self._prepare_log(plan, units, grads, params, present_idx, hist_step)
            self._pending_step = step
            # frozen tensors (requires_grad=False) are left out of the per-layer scalars, not logged as zeros
            plan.trainable = None if present_idx is None else \
                plan.units_present(np.array([p.requires_grad for p in plan.params]))

        return self._decide(plan, step, optimizer, replay, stats.total, units, device)

    def _read_total(self, total: torch.Tensor) -> float:
        """The one host read per step that an action costs: the step's total norm (NaN/Inf in any gradient makes it
        NaN/Inf)."""
        total_host = total.item()
        if self.last_norms is not None:
            self.last_norms.total_host = total_host  # lets norm clipping skip a multiply by 1
        return total_host

    def _decide(self, plan: _Plan, step: int, optimizer: Any, replay: Callable[[], Any] | None, total: torch.Tensor,
                units: GradStats, device: torch.device, total_host: float | None = None) -> bool:
        """The actions (skip, stop, raise) decide on this very step; ``False``: the step is skipped."""
        checks = plan.actions
        if checks is None:
            checks = plan.actions = [(kind, action) for kind, action in (("nonfinite", self.on_nonfinite),
                                                                          ("exploding", self.on_exploding))
                                     if action != "warn" and kind in plan.detectors]
        if not checks:
            return True
        # an action decides on this very step: the one host read per step that an action costs
        if checks[-1][0] == "exploding":  # the rule needs its history: read the buffered rows and replay them
            flags = self._drain().get(id(plan), {})
        else:  # NaN/Inf in any gradient makes the total norm NaN/Inf: one number decides
            if total_host is None:
                total_host = self._read_total(total)
            if math.isfinite(total_host) and plan.world == 1:
                return True
            flags = {"nonfinite": not math.isfinite(total_host)}
        for kind, action in checks:
            if self._agree(bool(flags.get(kind, False)), device):
                self._act(plan, kind, action, units, optimizer, replay)
                return False
        return True

    def _world(self) -> int:
        return self.world_size if self.world_size is not None else _dist_world_size()

    def _agree(self, flag: bool, device: torch.device) -> bool:
        """Did any process decide so (every process then acts the same)?"""
        if self.reduce_any is not None:
            return bool(self.reduce_any(flag))
        return _dist_any(flag, device) if _dist_world_size() > 1 else flag

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.reduce_sum is not None:
            return self.reduce_sum(tensor)
        return _dist_sum(tensor) if _dist_world_size() > 1 else tensor

    def _act(self, plan: _Plan, kind: str, action: str, units: GradStats, optimizer: Any,
             replay: Callable[[], Any] | None = None) -> None:
        self._drain()  # the detector sees this step before it names the tensors
        step = self._last_step
        found = plan.detectors[kind].alerts(plan.units)
        if self._world() > 1 and kind == "nonfinite":
            # every process acts (the decision was agreed); the NaN may be on another process's gradients only
            # (e.g. after DDP's all-reduce): every process names the same tensors
            mask = self._sum(units.nonfinite.to(torch.float32))
            bad = [u for u, m in zip(plan.units, Readback({"m": mask}).result()["m"].tolist()) if m > 0]
            if not found or found[0].where != ", ".join(bad):
                found = [Alert("nonfinite", step, ", ".join(bad), 1.0, 0.0, nonfinite_message(bad, step))]
        if not found and kind == "nonfinite":  # every tensor's norm is finite, their total overflowed float32
            found = [Alert("nonfinite", step, WHERE_TOTAL_NORM, 1.0, 0.0,
                           f"the total gradient norm overflowed float32 at step {step} (each tensor's own norm is "
                           "finite); lower the learning rate or clip gradients.")]
        if kind == "nonfinite" and replay is not None and self.model is not None and self._world() == 1:
            origin = locate_nonfinite(self.model, replay)
            if origin is not None:
                found = [replace(a, origin=str(origin), message=f"{a.message} {origin.sentence()}") for a in found]
        self._add_alerts(found)
        if action == "raise":
            error = NonFiniteGradientError if kind == "nonfinite" else ExplodingGradientError
            raise error(found[0].message if found else f"{kind} gradients at step {step}")
        # torch optimizers (and GradScaler.step) skip parameters whose .grad is None: weights and
        # optimizer state stay exactly as they were
        if optimizer is not None:
            dropped = [p for group in optimizer.param_groups for p in group["params"]]
        else:
            dropped = [p for _, p in self.named_parameters()]
        for p in dropped:
            p.grad = None
        self.last_norms = None
        self.skipped_steps += 1
        if action == "stop":
            self.should_stop = True

    def _all_with_grad(self, params: list[torch.Tensor]) -> bool:
        with_grad = [p for _, p in self.named_parameters() if p.grad is not None]
        return len(with_grad) == len(params) and all(a is b for a, b in zip(with_grad, params))

    @staticmethod
    def _scatter(stats: GradStats, idx: torch.Tensor, num: int) -> GradStats:
        """Back to one entry per watched tensor, zeros where a tensor got no gradient this step."""

        def full(v: torch.Tensor) -> torch.Tensor:
            return v.new_zeros(num).index_copy_(0, idx, v)

        return GradStats(full(stats.norms), stats.total, None if stats.weight_norms is None else full(stats.weight_norms),
                         None if stats.max_abs is None else full(stats.max_abs))

    def _prepare_log(self, plan: _Plan, units: GradStats, grads: list[torch.Tensor], params: list[torch.Tensor],
                     present: torch.Tensor | None, histograms: bool) -> None:
        pending = {"norms": units.norms, "max": units.max_abs, "weight": units.weight_norms, "total": units.total}
        seg = plan.unit_of if present is None else plan.unit_of.index_select(0, present)
        if histograms:
            sampled = dict(samples=self.histogram_samples, phase=self._histograms_taken)
            pending["grad_hist"] = log_histograms(grads, self.hist_spec, seg, len(plan.units), **sampled)
            pending["weight_hist"] = log_histograms(params, self.hist_spec, seg, len(plan.units), **sampled)
            self._histograms_taken += 1
        if self.update_ratio:
            plan.snapshot = snapshot(params, plan.snapshot_buffer)
            if plan.snapshot.device.type == "cpu":  # a GPU's caching allocator reuses the memory by itself
                plan.snapshot_buffer = plan.snapshot
            plan.snapshot_params = list(params)
            plan.snapshot_units = seg
        plan.pending = pending

    # ---------------------------------------------------------------- the loss

    def observe_loss(self, step: int, loss: torch.Tensor | float | None) -> None:
        """The loss of the batch whose optimizer step(s) the probe just saw, for the spike rule (on the loss and on
        the total gradient norm of those steps together). No host read."""
        if self._loss_spike is None:
            self._totals.clear()
            return
        totals = self._totals
        if (len(totals) == 1 and type(loss) is torch.Tensor and loss.dim() == 0 and loss.dtype == torch.float32
                and loss.device == totals[0].device and loss.untyped_storage().nbytes() <= 8):
            # the common case launches nothing: the loss tensor and the step's total norm (a view of its row) are
            # kept and stacked at the next read-back (on a small model a copy right after the optimizer step costs
            # tens of microseconds). Not a loss that is a view into a bigger tensor: that would be kept alive too.
            refs = self._loss_refs
            if len(refs[0]) >= self._loss_rows.capacity or (refs[1] and refs[1][0].device != loss.device):
                self._drain()
            refs[0].append(int(step))
            refs[1].append(loss.detach())
            refs[2].append(totals[0])
            totals.clear()
            return
        if isinstance(loss, (int, float)):
            loss = torch.tensor(float(loss))
        has_loss = isinstance(loss, torch.Tensor) and loss.numel() == 1
        if not has_loss and not self._totals:
            return
        ref = loss if has_loss else self._totals[0]
        if len(self._totals) > 1:  # several optimizers stepped: the norm of all their gradients together
            total = torch.stack([t.to(self._totals[0].device) for t in self._totals]).norm()
        else:
            total = self._totals[0] if self._totals else ref.new_full((), float("nan"), dtype=torch.float32)
        rows = self._loss_rows
        if rows.must_drain(total.device):
            self._drain()  # only when a log interval outgrows the buffer
        row_loss, row_total = rows.push(int(step), total.device)
        if has_loss:  # copy_ moves it across devices by itself; a reshape or a .to() costs more than the copy
            row_loss.copy_(loss.detach() if loss.dim() == 0 else loss.detach().reshape(()))
        else:
            row_loss.fill_(float("nan"))
        row_total.copy_(total)
        self._totals.clear()

    # ---------------------------------------------------------------- the replay

    def _pending_rows(self) -> dict[str, torch.Tensor]:
        """Every buffered row not yet replayed through the detectors."""
        out = {}
        for i, plan in self._plans.items():
            for name, rows in (("rows", plan.rows), ("checks", plan.checks)):
                if len(rows):
                    out[f"{i}/{name}"] = rows.pending()
        if len(self._loss_rows):
            out["loss/rows"] = self._loss_rows.pending()
        steps, losses, totals = self._loss_refs
        if steps:
            out["loss/refs"] = torch.stack([torch.stack(losses), torch.stack(totals)], dim=1)
        return out

    def _drain(self) -> dict[int, dict[str, bool]]:
        """Read every buffered row back (one copy) and replay it; what :meth:`_replay` returns."""
        rows = self._pending_rows()
        return self._replay(Readback(rows).result()) if rows else {}

    def _replay(self, host: Mapping[str, np.ndarray]) -> dict[int, dict[str, bool]]:
        """Feed the read-back rows to the detectors in step order. Returns, per plan (by ``id``), the
        non-finite and exploding flags of its last step."""
        flags: dict[int, dict[str, bool]] = {}
        for i, plan in self._plans.items():
            width, det = len(plan.units), plan.detectors
            if f"{i}/rows" in host:
                steps, masks = plan.rows.take()
                rows = host[f"{i}/rows"]
                # every row through the rules at once (each rule gives the state of feeding them one by one)
                last = {"nonfinite": det["nonfinite"].update_many(~np.isfinite(rows[:, :width]), steps)}
                if "exploding" in det:
                    last["exploding"] = det["exploding"].update_many(rows[:, width], rows[:, :width], steps)
                flags[id(plan)] = last
                # unused-tensor bookkeeping and the last steps for a crash record, over all rows at once
                norms = rows[:, :width]
                if any(m is not None for m in masks):
                    got = np.stack([np.ones(width, dtype=bool) if m is None else plan.units_present(m) for m in masks])
                else:
                    got = True
                plan.nonzero |= (got & (norms != 0)).any(axis=0)
                plan.zero_steps += (got & (norms == 0)).sum(axis=0)
                bad = (~np.isfinite(norms[-20:])).any(axis=1)
                for step, total, nonfinite in zip(steps[-20:], rows[-20:, width].tolist(), bad.tolist()):
                    self._note_recent(step, total=total, nonfinite=nonfinite)
            if f"{i}/checks" in host:
                steps, eligible = plan.checks.take()
                for step, mask, row in zip(steps, eligible, host[f"{i}/checks"]):
                    # a tensor whose gradient has been exactly zero on every step is unused, not vanishing
                    if "vanishing" in det:
                        det["vanishing"].update(row[:width], row[width:], step, mask & plan.nonzero)
                    if "steady" in det:
                        det["steady"].update(row[:width], row[width:], step, mask)
        if "loss/rows" in host or "loss/refs" in host:
            steps, values = self._loss_steps(host)
            self._loss_spike.update_many(values, steps)
            for step, loss in zip(steps[-20:], values[-20:, 0].tolist()):
                self._note_recent(step, loss=loss)
        self._trim_recent()
        return flags

    def _loss_steps(self, host: Mapping[str, np.ndarray]) -> tuple[list[int], np.ndarray]:
        """The read-back loss rows (written rows and kept references together), in step order."""
        steps, values = [], []
        if "loss/rows" in host:
            steps += self._loss_rows.take()[0]
            values.append(np.asarray(host["loss/rows"], dtype=np.float64).reshape(-1, 2))
        if "loss/refs" in host:
            steps += self._loss_refs[0]
            values.append(np.asarray(host["loss/refs"], dtype=np.float64).reshape(-1, 2))
            self._loss_refs = ([], [], [])
        if len(values) == 1:
            return steps, values[0]
        # both kinds: back in step order (stable: a window's micro-batches keep theirs)
        order = np.argsort(np.asarray(steps), kind="stable")
        return [steps[i] for i in order], np.concatenate(values)[order]

    def _note_recent(self, step: int, **values: Any) -> None:
        self._recent.setdefault(int(step), {}).update(values)

    def _trim_recent(self) -> None:
        """Keep the last 20 steps noted, for the record of a run that crashes."""
        if len(self._recent) > 20:
            for step in sorted(self._recent)[:-20]:
                del self._recent[step]

    def recent_steps(self) -> dict[str, list[Any]] | None:
        """The last (up to 20) steps replayed: ``steps``, ``loss``, ``grad_norm_total``, ``nonfinite`` (what a
        crashed run's record keeps), or ``None`` before any."""
        if not self._recent:
            return None
        steps = sorted(self._recent)
        rows = [self._recent[s] for s in steps]
        return {"steps": steps, "loss": [r.get("loss") for r in rows],
                "grad_norm_total": [r.get("total") for r in rows],
                "nonfinite": [bool(r.get("nonfinite", False)) for r in rows]}

    def _unused_alerts(self, plan: _Plan) -> list[Alert]:
        """Tensors that had a gradient, exactly zero, on each of ``_unused_after`` or more steps: reported once."""
        new = ~plan.nonzero & ~plan.unused_flagged & (plan.zero_steps >= self._unused_after)
        if not new.any():
            return []
        plan.unused_flagged |= new
        hit = [u for u, m in zip(plan.units, new) if m]
        owners = sorted({u.rsplit(".", 1)[0] if "." in u and not plan.grouped else u for u in hit})
        steps = int(plan.zero_steps[new].min())
        message = (f"unused parameters: {', '.join(hit)} got a gradient of exactly zero on every one of {steps}+ "
                   f"steps. Nothing from the data reaches them: the input of {', '.join(owners)} is all zeros (for "
                   "example covariates or features this data does not have) or its output does not affect the loss. "
                   "This is not a vanishing gradient (initialisation, activations or normalisation will not change "
                   "it): feed these inputs, or drop the layers.")
        return [Alert("unused", self._last_step, ", ".join(hit), 0.0, 0.0, message)]

    # ---------------------------------------------------------------- flush

    def _add_alerts(self, found: list[Alert]) -> None:
        self.alerts.extend(found)
        self._new_alerts.extend(found)
        self._since_flush.extend(found)

    @property
    def has_new_alerts(self) -> bool:
        """Alerts wait for :meth:`take_new_alerts`."""
        return bool(self._new_alerts)

    def take_new_alerts(self) -> list[Alert]:
        """The alerts added since the last call (all of them are also in :attr:`alerts`)."""
        out, self._new_alerts = self._new_alerts, []
        return out

    @property
    def pending(self) -> bool:
        """Statistics of a log step wait for :meth:`flush`."""
        return any(plan.pending is not None for plan in self._plans.values())

    def flush(self) -> dict[str, float]:
        """Read back (one device-to-host copy) everything buffered since the last flush, run it through the rules,
        and return the metrics of the last log step (``{}`` when no log step is pending), plus ``grad/alert/<kind>``
        counts of the new alerts and ``grad/skipped_steps``. The histograms of that step go to
        :attr:`last_histograms`, the step to :attr:`flushed_step`, new alerts to :attr:`alerts`."""
        tensors: dict[str, torch.Tensor] = {}
        for i, plan in self._plans.items():
            if plan.pending is not None:
                tensors.update({f"{i}/{k}": v for k, v in plan.pending.items() if v is not None})
                if plan.snapshot is not None:
                    upd = update_norms(plan.snapshot_params, plan.snapshot)
                    if plan.grouped:
                        upd = group_norms(upd, plan.snapshot_units, len(plan.units))
                    elif len(plan.snapshot_params) != len(plan.params):
                        upd = upd.new_zeros(len(plan.units)).index_copy_(0, plan.snapshot_units, upd)
                    tensors[f"{i}/update"] = update_ratios(upd, plan.pending["weight"])
        tensors.update(self._pending_rows())
        self.last_histograms = {}
        if not tensors:
            return {}
        host = Readback(tensors).result()  # the one device->host copy of a log step
        self._replay(host)
        self.flushed_step = self._pending_step if self._pending_step is not None else self._last_step
        self._pending_step = None
        metrics: dict[str, float] = {}
        found: list[Alert] = []
        for i, plan in self._plans.items():
            if plan.pending is not None:
                self._metrics(plan, i, host, metrics, self.last_histograms)
                plan.pending, plan.snapshot, plan.snapshot_params = None, None, []
            for det in plan.detectors.values():
                found += det.alerts(plan.units)
            found += self._unused_alerts(plan)
        if self._loss_spike is not None:
            found += self._loss_spike.alerts()
        self._add_alerts(found)
        for alert in self._since_flush:  # the rules' alerts of this flush and the actions' since the last one
            metrics[f"grad/alert/{alert.kind}"] = metrics.get(f"grad/alert/{alert.kind}", 0.0) + 1.0
        self._since_flush = []
        if self.skipped_steps:
            metrics["grad/skipped_steps"] = float(self.skipped_steps)
        return metrics

    def _metrics(self, plan: _Plan, i: int, host: dict[str, np.ndarray], metrics: dict[str, float],
                 hists: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        tag = "" if len(self._plans) == 1 else f"opt{i}/"
        metrics[f"grad/{tag}norm_total"] = float(host[f"{i}/total"])
        keep = plan.trainable if plan.trainable is not None else [True] * len(plan.units)
        if self.per_layer:
            columns = [("grad/norm", "norms"), ("grad/max", "max"), ("weight/norm", "weight"),
                       ("update/ratio", "update")]
            for prefix, key in columns:
                if f"{i}/{key}" in host:
                    for unit, v, ok in zip(plan.units, host[f"{i}/{key}"].tolist(), keep):
                        if ok:
                            metrics[f"{prefix}/{tag}{unit}"] = v
        if f"{i}/grad_hist" in host:
            edges = self.hist_spec.edges()
            for kind in ("grad", "weight"):
                for unit, row, ok in zip(plan.units, host[f"{i}/{kind}_hist"], keep):
                    if not ok:
                        continue
                    hists[f"{kind}/hist/{tag}{unit}"] = (LogHistogramSpec.split(row)[0], edges)

    # ---------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The rules' state and the alerts (reads the buffered steps first, so it holds every step seen)."""
        self._drain()
        plans = {i: {"units": list(p.units), "detectors": {k: d.state_dict() for k, d in p.detectors.items()}}
                 for i, p in self._plans.items()}
        for i, saved in self._loaded.get("plans", {}).items():
            plans.setdefault(i, saved)
        loss = self._loss_spike.state_dict() if self._loss_spike is not None else None
        return {"plans": plans, "loss_spike": loss, "skipped_steps": self.skipped_steps,
                "alerts": [a.to_dict() for a in self.alerts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the rules' state applies from the first step of each plan."""
        self._loaded = {"plans": dict(state_dict.get("plans", {}))}
        self._plans.clear()
        self._plan_by_opt.clear()
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.alerts = [Alert.from_dict(a) for a in state_dict.get("alerts", [])]
        if self._loss_spike is not None and state_dict.get("loss_spike"):
            self._loss_spike.load_state_dict(state_dict["loss_spike"])
