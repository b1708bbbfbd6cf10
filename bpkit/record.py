"""The run record's format, in one place: what the callbacks write and what ``bpkit-report`` reads.

A run record is a JSON-lines file, :data:`RECORD_NAME` (``bpkit_record.jsonl``), in the run's log directory. Each
line is one entry ``{"type": <entry type>, "step": <optimizer step>, "data": {...}}``; the entry types are the
``ENTRY_*`` constants below. An alert that is not about a parameter or a module names one of the reserved
``WHERE_*`` names in its ``where`` instead of a parameter name.

This module is the ground floor of bpkit: it imports no Lightning, no callback and no report code, so the
writer (:mod:`bpkit.callbacks._sink`), the readers (:mod:`bpkit.report`, :class:`bpkit.callbacks.RunRecord`)
and a plain PyTorch loop share it.

Example::

    >>> import tempfile, os
    >>> from bpkit import Alert
    >>> path = os.path.join(tempfile.mkdtemp(), RECORD_NAME)
    >>> append_entry(path, ENTRY_SCALARS, 10, {"train/loss": 0.5})
    >>> append_entry(path, ENTRY_ALERT, 10, Alert("spike", 10, WHERE_LOSS, 9.0, 4.0, "the loss spiked").to_dict())
    >>> [e["type"] for e in read_record(path)]
    ['scalars', 'alert']
    >>> alerts_from(read_record(path))[0].where
    'loss'
    >>> read_run(path).series("train/loss")[1].tolist()
    [0.5]
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from bpkit.alert import ALERT_KINDS, Alert
from bpkit.errors import BpkitConfigError

RECORD_NAME = "bpkit_record.jsonl"
"""The record's file name, in the run's log directory."""

# ------------------------------------------------------------------ entry types
ENTRY_RUN = "run"
"""RunRecord's start and end of a run (``event``, ``status``, versions, model, ...); merged into ``RunData.meta``."""
ENTRY_SCALARS = "scalars"
"""``{metric key: number}`` at a step."""
ENTRY_HISTOGRAMS = "histograms"
"""``{metric key: {"counts": [...], "edges": [...]}}`` at a step (``len(edges) == len(counts) + 1``)."""
ENTRY_ALERT = "alert"
"""One :class:`bpkit.Alert` (its ``to_dict()``)."""
ENTRY_IMAGE = "image"
"""An image logged through the sink: ``{"key", "path"}``."""
ENTRY_GRADCHECK = "gradcheck"
"""GradientCheck's report (``params``: one row per tensor), or ``{"skipped", "hint"}``."""
ENTRY_LAST_STEPS = "last_steps"
"""The steps before an exception: ``steps`` and per-step columns (``loss``, ``grad_norm_total``, ``nonfinite``,
...), ``exception``, ``source``."""
ENTRY_CLIP_SUMMARY = "clip_summary"
"""GradientClipping's summary at the end of fit: ``policy``, ``fraction`` clipped, ``steps``, ``clipped``, ..."""
ENTRY_NOISE_SCALE = "noise_scale"
"""NoiseScaleMonitor's estimate at the end of fit: ``b_simple``, ``batch_size``, ``method``, ``sentence``."""
ENTRY_UNFREEZE = "unfreeze"
"""Parameters that started training at a step (fine-tuning): the blocks unfrozen."""
ENTRY_TEMPORAL = "temporal"
"""TemporalGradientMonitor's gradient profile through time of a sequence module at a log step."""
EVENT_TYPES = (ENTRY_NOISE_SCALE, ENTRY_UNFREEZE, ENTRY_TEMPORAL)
"""Entry types kept as they are, in order, in :attr:`RunData.events`."""
ENTRY_TYPES = (ENTRY_RUN, ENTRY_SCALARS, ENTRY_HISTOGRAMS, ENTRY_ALERT, ENTRY_IMAGE, ENTRY_GRADCHECK, ENTRY_LAST_STEPS,
               ENTRY_CLIP_SUMMARY) + EVENT_TYPES
"""Every entry type bpkit writes. A reader skips (and counts) a type it does not know: a newer writer's."""

RETURNED_LOSS_KEY = "loss/train_returned"
"""The scalar key of the loss ``training_step`` returned (written by RunRecord)."""

# ------------------------------------------------------------------ reserved ``where`` names
WHERE_TOTAL_NORM = "total gradient norm"
"""``where`` of an alert about the total gradient norm over all parameters (an overflow, a spike, a clip)."""
WHERE_LOSS = "loss"
"""``where`` of an alert about the training loss (non-finite, spike)."""
WHERE_BATCH = "batch"
"""``where`` of an alert about the batch as a whole (GradientCheck's batch-independence check)."""
WHERE_HESSIAN = "Hessian of the loss"
"""``where`` of a curvature alert (``sharpness``, ``saddle``): the loss surface, not one tensor."""
RESERVED_WHERE = (WHERE_TOTAL_NORM, WHERE_LOSS, WHERE_BATCH, WHERE_HESSIAN)
"""The ``where`` names that are not a parameter or a module: a report never counts them as layers."""
LEGACY_WHERE = {"total": WHERE_TOTAL_NORM, "grad_norm_total": WHERE_TOTAL_NORM}
"""Older names of a reserved ``where`` (records written before :data:`WHERE_TOTAL_NORM` was the one name),
read as the reserved name they stand for."""


def canonical_where(where: str) -> str:
    """``where`` with a legacy reserved name replaced by the current one (``"total"`` -> ``"total gradient norm"``);
    any other name unchanged.

    Example::

        >>> canonical_where("total"), canonical_where("fc1.weight")
        ('total gradient norm', 'fc1.weight')
    """
    where = str(where)
    return LEGACY_WHERE.get(where, where)


def is_reserved_where(name: str) -> bool:
    """Whether ``name`` (one name of an alert's ``where``) is a reserved name, not a parameter or module.

    Example::

        >>> [is_reserved_where(n) for n in ("total gradient norm", "total", "loss", "batch", "fc1.weight")]
        [True, True, True, True, False]
    """
    return canonical_where(str(name).strip()) in RESERVED_WHERE


# ------------------------------------------------------------------ writing
def format_entry(entry_type: str, step: int, data: Mapping[str, Any]) -> str:
    """One line of the record: the entry as JSON (``NaN``/``Infinity`` kept), ending with a newline.

    Example::

        >>> format_entry(ENTRY_SCALARS, 3, {"train/loss": float("nan")})
        '{"type": "scalars", "step": 3, "data": {"train/loss": NaN}}\\n'
    """
    if not isinstance(entry_type, str) or not entry_type:
        raise BpkitConfigError("entry_type", entry_type, "a non-empty string, e.g. one of " + ", ".join(ENTRY_TYPES))
    return json.dumps({"type": entry_type, "step": int(step), "data": dict(data)}, allow_nan=True) + "\n"


def ends_mid_line(path: str | os.PathLike) -> bool:
    """Whether the file exists, is not empty and does not end with a newline (a writer was cut off mid-line)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def append_entry(path: str | os.PathLike, entry_type: str, step: int, data: Mapping[str, Any], *,
                 check_end: bool = True, opener: Callable[..., Any] = open) -> None:
    """Append one entry to the record at ``path`` (its directory is created). With ``check_end``, a partial last
    line (a run killed mid-write) is ended first, so this entry stays whole.

    Args:
        path: the record file.
        entry_type: one of :data:`ENTRY_TYPES` (another string is written too: readers skip types they do not know).
        step: the optimizer step of the entry.
        data: a JSON-serialisable mapping.
        check_end: look at the file's last byte first (once per file and process is enough).
        opener: opens the file as :func:`open` does (the sink passes its own).

    Example::

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "run", RECORD_NAME)
        >>> append_entry(path, ENTRY_RUN, 0, {"event": "start", "status": "running"})
        >>> read_record(path)
        [{'type': 'run', 'step': 0, 'data': {'event': 'start', 'status': 'running'}}]
    """
    line = format_entry(entry_type, step, data)
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with opener(path, "a", encoding="utf-8") as f:
        if check_end and f.tell() > 0 and ends_mid_line(path):
            f.write("\n")
        f.write(line)
        f.flush()


# ------------------------------------------------------------------ finding a record
def find_record(run_dir: str | os.PathLike) -> Path:
    """The record of a run directory: ``RUN_DIR/bpkit_record.jsonl``, else the newest one below it
    (CSV and TensorBoard loggers put it in their ``<name>/version_N`` folder); a record file is returned as is.

    Raises:
        BpkitConfigError: when ``run_dir`` does not exist, is not a directory, or holds no record.
    """
    path = Path(run_dir)
    if path.is_file() and path.name == RECORD_NAME:
        return path
    if path.is_dir() and path.name == RECORD_NAME and not (path / RECORD_NAME).exists() and \
            not any(path.rglob(RECORD_NAME)):
        raise BpkitConfigError("run_dir", str(path), f"a run directory or a {RECORD_NAME} file ({path} is a "
                                                     f"directory named like the record)")
    if not path.exists():
        raise BpkitConfigError("run_dir", str(path), "an existing run directory (this path does not exist)")
    if not path.is_dir():
        raise BpkitConfigError("run_dir", str(path), f"a run directory or a {RECORD_NAME} file")
    direct = path / RECORD_NAME
    if direct.is_file():
        return direct
    if direct.exists():
        raise BpkitConfigError("run_dir", str(path), f"a run directory whose {RECORD_NAME} is a file ({direct} is a "
                                                     f"directory, not a record)")
    found = sorted((p for p in path.rglob(RECORD_NAME) if p.is_file()), key=lambda p: (p.stat().st_mtime, str(p)))
    if not found:
        raise BpkitConfigError("run_dir", str(path),
                               f"a bpkit run directory: no {RECORD_NAME} was found in it or below it (train with "
                               f"bpkit's callbacks, e.g. GradientMonitor or RunRecord, or `bpkit-train`)")
    return found[-1]


def find_records(run_dir: str | os.PathLike) -> list[Path]:
    """Every record file at or below ``run_dir`` (a directory), in path order; ``[]`` when there is none or
    ``run_dir`` is not a directory."""
    path = Path(run_dir)
    if not path.is_dir():
        return []
    return sorted(p for p in path.rglob(RECORD_NAME) if p.is_file())


# ------------------------------------------------------------------ parsing lines
def _number(v: Any) -> float | None:
    """A JSON number (``NaN``/``Infinity`` included) as a float; ``None`` for anything else (strings, bools,
    ``null``, lists)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v)
    except OverflowError:  # an integer too large for a float
        return None


def _step(v: Any) -> int | None:
    """A valid step: a non-negative integer (or an integral float such as ``12.0``); ``None`` otherwise."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if v >= 0 else None
    if isinstance(v, float) and math.isfinite(v) and v.is_integer() and v >= 0:
        return int(v)
    return None


def _numbers_1d(v: Any) -> np.ndarray | None:
    """A flat list of JSON numbers as float64; ``None`` for a scalar, a nested list or non-numbers."""
    if not isinstance(v, list) or not all(_number(x) is not None for x in v):
        return None
    return np.asarray([float(x) for x in v], dtype=np.float64)


_DECODER = json.JSONDecoder()


def _parse(line: str) -> tuple[Any, bool]:
    """``(object, clean)``: the line's JSON value, or, when the line starts with garbage (a previous process was
    killed mid-write and the next one appended right after it), the last complete JSON object that ends the
    line (``clean=False``); ``(None, False)`` when there is none."""
    try:
        return json.loads(line), True
    except ValueError:
        pass
    text = line.rstrip()
    pos = text.find("{", 1)
    while pos != -1:
        try:
            obj, end = _DECODER.raw_decode(text, pos)
        except ValueError:
            pos = text.find("{", pos + 1)
            continue
        if end == len(text) and isinstance(obj, dict) and "type" in obj:
            return obj, False
        pos = text.find("{", pos + 1)
    return None, False


def _read_text(path: Path, run_dir: Any) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise BpkitConfigError("run_dir", str(run_dir), f"a readable {RECORD_NAME} ({path}: {err.strerror or err})") \
            from None
    return raw.decode("utf-8", errors="replace")


def _scan(text: str) -> tuple[Iterator[tuple[dict[str, Any] | None, bool]], bool]:
    """``(rows, truncated)``: per non-blank line ``(entry, clean)`` where ``entry`` is ``{"type", "step", "data"}``
    (``None`` when the line holds no object of that shape) and ``clean`` whether the whole line parsed;
    ``truncated`` when the last line has no newline."""
    lines = text.split("\n")
    truncated = False
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:  # no final newline: the writer was cut off mid-line (or is writing right now)
        truncated = True

    def rows() -> Iterator[tuple[dict[str, Any] | None, bool]]:
        for line in lines:
            if not line.strip():
                continue
            obj, clean = _parse(line)
            if not isinstance(obj, dict):
                yield None, clean
                continue
            kind, step, data = obj.get("type"), _step(obj.get("step", 0)), obj.get("data")
            if not isinstance(kind, str) or step is None or not isinstance(data, dict):
                yield None, clean
                continue
            yield {"type": kind, "step": step, "data": data}, clean

    return rows(), truncated


def read_record(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a record (a record file, or a run directory as :func:`find_record` finds it), in file order:
    ``[{"type": str, "step": int, "data": dict}]``. Lines that do not parse or do not have an entry's shape are
    skipped (a crash mid-write truncates the last one); the entry after garbage on the same line is kept.

    Raises:
        BpkitConfigError: for a path that is no run or an unreadable record.
    """
    found = find_record(path)
    rows, _ = _scan(_read_text(found, path))
    return [entry for entry, _ in rows if entry is not None]


def _alert_data(data: Mapping[str, Any], step: int) -> dict[str, Any] | None:
    """An alert entry's data with its fields made safe to use: ``step`` a valid step (the entry's when missing),
    ``where`` and ``message`` strings (a legacy reserved ``where`` renamed), ``value``/``threshold`` floats (NaN
    when missing); ``None`` when it has no ``kind`` or no valid step."""
    at = _step(data.get("step", step))
    if not isinstance(data.get("kind"), str) or at is None:
        return None
    alert = {**data, "step": at, "where": canonical_where(str(data.get("where", "") or "")),
             "message": str(data.get("message", "") or "")}
    for k in ("value", "threshold"):
        number = _number(data.get(k))
        alert[k] = math.nan if number is None else number
    return alert


def alerts_from(entries: Iterable[Mapping[str, Any]]) -> list[Alert]:
    """The alert entries among ``entries`` (as :func:`read_record` returns them) as :class:`bpkit.Alert` s, in
    order. A legacy reserved ``where`` is read as the current name; an alert of a kind this version does not know
    (a newer writer's), or without a kind or a valid step, is skipped.

    Example::

        >>> entry = {"type": ENTRY_ALERT, "step": 4, "data": {"kind": "nonfinite", "step": 4, "where": "total",
        ...          "value": 1.0, "threshold": 0.0, "message": "float32 overflow"}}
        >>> [(a.kind, a.step, a.where) for a in alerts_from([entry])]
        [('nonfinite', 4, 'total gradient norm')]
    """
    known = {f.name for f in fields(Alert)}
    out = []
    for entry in entries:
        if entry.get("type") != ENTRY_ALERT or not isinstance(entry.get("data"), Mapping):
            continue
        data = _alert_data(entry["data"], _step(entry.get("step", 0)) or 0)
        if data is None or data["kind"] not in ALERT_KINDS:
            continue
        out.append(Alert(**{k: v for k, v in data.items() if k in known}))
    return out


# ------------------------------------------------------------------ a run, sorted by kind
@dataclass
class Histogram:
    """One logged histogram: ``counts`` over ``edges`` (``len(edges) == len(counts) + 1``)."""

    step: int
    counts: np.ndarray
    edges: np.ndarray


@dataclass
class RunData:
    """Everything a run's record holds, sorted by kind.

    Attributes:
        path: the record file.
        scalars: ``{key: (steps, values)}`` as float64 numpy arrays, in logging order.
        histograms: ``{key: [Histogram, ...]}``.
        alerts: the alert dicts (``kind, step, where, value, threshold, message``; a legacy reserved ``where``
            read as the current name, see :data:`LEGACY_WHERE`).
        gradchecks: ``[(step, report dict)]`` from ``GradientCheck``.
        images: ``{key: path}`` of images logged through the sink.
        meta: the ``run`` entries of :class:`bpkit.callbacks.RunRecord` merged (start, end, status, ...).
        last_steps: ``{step: {column: value}}`` from the ``last_steps`` entries written when training raised
            (RunRecord: ``loss``; GradientMonitor: ``loss``, ``grad_norm_total``, ``nonfinite``), merged by step.
        last_steps_error: the exception those entries name (``"TypeName: message"``), or ``""``.
        clip_summaries: the ``clip_summary`` entries of GradientClipping (policy, fraction clipped, ...).
        events: ``{entry type: [(step, data), ...]}`` of the :data:`EVENT_TYPES` (noise scale, unfreezing, temporal
            profiles), in record order.
        bad_lines: lines that were not valid entries (a crash mid-write truncates the last one; a line of the
            wrong shape, e.g. a step that is not an integer or histogram counts that are not a list of numbers,
            is skipped whole or in the part that is wrong).
        truncated: the last line was cut short.
    """

    path: Path
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    histograms: dict[str, list[Histogram]] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    gradchecks: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    last_steps: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_steps_error: str = ""
    clip_summaries: list[dict[str, Any]] = field(default_factory=list)
    events: dict[str, list[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    bad_lines: int = 0
    truncated: bool = False
    entries: int = 0

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def status(self) -> str:
        """``finished``, ``crashed``, or ``running`` when no end marker was written (still going, or
        killed before it could write one)."""
        return str(self.meta.get("status") or "running")

    def keys(self, prefix: str) -> list[str]:
        """Scalar keys under ``prefix`` (e.g. ``"grad/norm/"``) in the order they were first logged."""
        return [k for k in self.scalars if k.startswith(prefix)]

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        return self.scalars.get(key, (np.zeros(0), np.zeros(0)))

    def last(self, key: str) -> float | None:
        steps, values = self.series(key)
        return float(values[-1]) if len(values) else None


def read_run(run_dir: str | os.PathLike) -> RunData:
    """Parse a run's record (a run directory or the record file). Lines that do not parse, or whose entry has the
    wrong shape, are counted in ``bad_lines`` and skipped (a wrong part of an otherwise good entry, e.g. one
    malformed histogram, is skipped alone and the line counted as bad).

    Raises:
        BpkitConfigError: for a path that is no run, an unreadable record, or a record with no entry at all.
    """
    path = find_record(run_dir)
    run = RunData(path=path)
    rows, run.truncated = _scan(_read_text(path, run_dir))
    scalars: dict[str, tuple[list[int], list[float]]] = {}
    for entry, clean in rows:
        if not clean:
            run.bad_lines += 1  # the garbage before a recovered entry, or the whole line
        if entry is None:
            run.bad_lines += clean  # valid JSON, but not an entry object
            continue
        ok = _add(run, scalars, entry["type"], entry["step"], entry["data"])
        if ok is None:
            run.bad_lines += clean
            continue
        run.entries += 1
        if not ok:
            run.bad_lines += clean
    for key, (steps, values) in scalars.items():
        run.scalars[key] = (np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64))
    if run.entries == 0:
        raise BpkitConfigError("run_dir", str(run_dir),
                               f"a run with logged data: {path} has no entry yet (the run logged nothing: "
                               f"did it reach its first logging step?)")
    return run


def _add(run: RunData, scalars: dict[str, tuple[list[int], list[float]]], kind: str, step: int,
         data: dict[str, Any]) -> bool | None:
    """Take one entry into ``run``: ``True`` all of it, ``False`` some of it (the rest was malformed), ``None``
    none of it."""
    if kind == ENTRY_SCALARS:
        good = 0
        for key, value in data.items():
            number = _number(value)
            if number is None:
                continue
            steps, values = scalars.setdefault(str(key), ([], []))
            steps.append(step)
            values.append(number)
            good += 1
        return (good == len(data)) if good or not data else None
    if kind == ENTRY_HISTOGRAMS:
        good = 0
        for key, h in data.items():
            if not isinstance(h, dict):
                continue
            counts, edges = _numbers_1d(h.get("counts")), _numbers_1d(h.get("edges"))
            if counts is None or edges is None or len(counts) == 0 or len(edges) != len(counts) + 1:
                continue
            run.histograms.setdefault(str(key), []).append(Histogram(step, counts, edges))
            good += 1
        return (good == len(data)) if good or not data else None
    if kind == ENTRY_ALERT:
        alert = _alert_data(data, step)
        if alert is None:
            return None
        run.alerts.append(alert)
        return True
    if kind == ENTRY_GRADCHECK:
        params = data.get("params", [])
        if not isinstance(params, list) or not all(isinstance(p, dict) for p in params):
            return None
        run.gradchecks.append((step, data))
        return True
    if kind == ENTRY_IMAGE:
        if isinstance(data.get("key"), str) and isinstance(data.get("path"), str):
            run.images[data["key"]] = data["path"]
            return True
        return None
    if kind == ENTRY_RUN:
        run.meta.update(data)
        return True
    if kind == ENTRY_LAST_STEPS:
        return _add_last_steps(run, data)
    if kind == ENTRY_CLIP_SUMMARY:
        if _number(data.get("fraction")) is None:
            return None
        run.clip_summaries.append(dict(data))
        return True
    if kind in EVENT_TYPES:
        run.events.setdefault(kind, []).append((step, dict(data)))
        return True
    return True  # an entry type this reader does not know (a newer writer): counted, ignored


def _add_last_steps(run: RunData, data: dict[str, Any]) -> bool | None:
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps or any(_step(s) is None for s in steps):
        return None
    whole = True
    for column, values in data.items():
        if column in ("steps", "exception", "source") or not isinstance(values, list):
            continue
        if len(values) != len(steps):
            whole = False
            continue
        for s, v in zip(steps, values):
            row = run.last_steps.setdefault(_step(s), {})
            if isinstance(v, bool):
                row[column] = row.get(column, False) or v
            elif v is None or _number(v) is not None:
                if v is not None or column not in row:
                    row[column] = None if v is None else float(v)
            else:
                whole = False
    if isinstance(data.get("exception"), str) and not run.last_steps_error:
        run.last_steps_error = data["exception"]
    return whole
