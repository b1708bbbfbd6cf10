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
        bad_lines: lines that were not valid JSON entries (a crash mid-write truncates the last one).
        truncated: the last line was cut short.
    """

    path: Path
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    histograms: dict[str, list[Histogram]] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    gradchecks: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
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
    if not path.exists():
        raise BpkitConfigError("run_dir", str(path), "an existing run directory (this path does not exist)")
    if not path.is_dir():
        raise BpkitConfigError("run_dir", str(path), f"a run directory or a {RECORD_NAME} file")
    direct = path / RECORD_NAME
    if direct.is_file():
        return direct
    found = sorted(path.rglob(RECORD_NAME), key=lambda p: (p.stat().st_mtime, str(p)))
    if not found:
        raise BpkitConfigError("run_dir", str(path),
                               f"a bpkit run directory: no {RECORD_NAME} was found in it or below it (train with "
                               f"bpkit's callbacks, e.g. GradientMonitor or RunRecord, or `bpkit-train`)")
    return found[-1]


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def read_run(run_dir: str | os.PathLike) -> RunData:
    """Parse a run's record. Lines that do not parse are counted in ``bad_lines`` and skipped.

    Raises:
        BpkitConfigError: for a path that is no run, or a record with no entry at all.
    """
    path = find_record(run_dir)
    run = RunData(path=path)
    with open(path, "rb") as f:
        raw = f.read()
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
        try:
            entry = json.loads(line)
            kind, step, data = entry["type"], int(entry.get("step", 0)), entry.get("data")
        except (ValueError, KeyError, TypeError):
            run.bad_lines += 1
            continue
        if not isinstance(data, dict):
            run.bad_lines += 1
            continue
        run.entries += 1
        if kind == "scalars":
            for key, value in data.items():
                steps, values = scalars.setdefault(key, ([], []))
                steps.append(step)
                values.append(_float(value))
        elif kind == "histograms":
            for key, h in data.items():
                try:
                    counts = np.asarray(h["counts"], dtype=np.float64)
                    edges = np.asarray(h["edges"], dtype=np.float64)
                except (KeyError, TypeError, ValueError):
                    continue
                if edges.shape[0] == counts.shape[0] + 1:
                    run.histograms.setdefault(key, []).append(Histogram(step, counts, edges))
        elif kind == "alert":
            run.alerts.append({**data, "step": int(data.get("step", step))})
        elif kind == "gradcheck":
            run.gradchecks.append((step, data))
        elif kind == "image":
            if "key" in data and "path" in data:
                run.images[str(data["key"])] = str(data["path"])
        elif kind == "run":
            run.meta.update(data)
    for key, (steps, values) in scalars.items():
        run.scalars[key] = (np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64))
    if run.entries == 0:
        raise BpkitConfigError("run_dir", str(run_dir),
                               f"a run with logged data: {path} has no entry yet (the run logged nothing: "
                               f"did it reach its first logging step?)")
    return run
