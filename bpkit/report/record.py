"""Read a run's ``bpkit_record.jsonl`` robustly: while the run is still writing it, or after a crash
left a truncated last line."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bpkit.errors import BpkitConfigError

RECORD_NAME = "bpkit_record.jsonl"  # the name bpkit.callbacks._sink writes


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
        alerts: the alert dicts (``kind, step, where, value, threshold, message``).
        gradchecks: ``[(step, report dict)]`` from ``GradientCheck``.
        images: ``{key: path}`` of images logged through the sink.
        meta: the ``run`` entries of :class:`bpkit.callbacks.RunRecord` merged (start, end, status, ...).
        last_steps: ``{step: {column: value}}`` from the ``last_steps`` entries written when training raised
            (RunRecord: ``loss``; GradientMonitor: ``loss``, ``grad_norm_total``, ``nonfinite``), merged by step.
        last_steps_error: the exception those entries name (``"TypeName: message"``), or ``""``.
        clip_summaries: the ``clip_summary`` entries of GradientClipping (policy, fraction clipped, ...).
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


def find_record(run_dir: str | os.PathLike) -> Path:
    """The record of a run directory: ``RUN_DIR/bpkit_record.jsonl``, else the newest one below it
    (CSV and TensorBoard loggers put it in their ``<name>/version_N`` folder).

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


def read_run(run_dir: str | os.PathLike) -> RunData:
    """Parse a run's record. Lines that do not parse, or whose entry has the wrong shape, are counted in
    ``bad_lines`` and skipped (a wrong part of an otherwise good entry, e.g. one malformed histogram, is
    skipped alone and the line counted as bad).

    Raises:
        BpkitConfigError: for a path that is no run, an unreadable record, or a record with no entry at all.
    """
    path = find_record(run_dir)
    run = RunData(path=path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise BpkitConfigError("run_dir", str(run_dir), f"a readable {RECORD_NAME} ({path}: {err.strerror or err})") \
            from None
    text = raw.decode("utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:  # no final newline: the writer was cut off mid-line (or is writing right now)
        run.truncated = True
    scalars: dict[str, tuple[list[int], list[float]]] = {}
    for line in lines:
        if not line.strip():
            continue
        entry, clean = _parse(line)
        if not clean:
            run.bad_lines += 1  # the garbage before a recovered entry, or the whole line
        if not isinstance(entry, dict):
            run.bad_lines += clean  # valid JSON, but not an entry object
            continue
        kind, step, data = entry.get("type"), _step(entry.get("step", 0)), entry.get("data")
        if not isinstance(kind, str) or step is None or not isinstance(data, dict):
            run.bad_lines += clean
            continue
        ok = _add(run, scalars, kind, step, data)
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
    if kind == "scalars":
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
    if kind == "histograms":
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
    if kind == "alert":
        at = _step(data.get("step", step))
        if not isinstance(data.get("kind"), str) or at is None:
            return None
        alert = {**data, "step": at, "where": str(data.get("where", "") or ""),
                 "message": str(data.get("message", "") or "")}
        for k in ("value", "threshold"):
            number = _number(data.get(k))
            alert[k] = math.nan if number is None else number
        run.alerts.append(alert)
        return True
    if kind == "gradcheck":
        params = data.get("params", [])
        if not isinstance(params, list) or not all(isinstance(p, dict) for p in params):
            return None
        run.gradchecks.append((step, data))
        return True
    if kind == "image":
        if isinstance(data.get("key"), str) and isinstance(data.get("path"), str):
            run.images[data["key"]] = data["path"]
            return True
        return None
    if kind == "run":
        run.meta.update(data)
        return True
    if kind == "last_steps":
        return _add_last_steps(run, data)
    if kind == "clip_summary":
        if _number(data.get("fraction")) is None:
            return None
        run.clip_summaries.append(dict(data))
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
