"""A Hydra callback that keeps a sweep's results together and reports failed jobs.

Every job of a multirun appends one line to ``<sweep dir>/bpkit_sweep.jsonl`` (job number, overrides, status,
monitored metric or error, bpkit's findings on the job's run, run directory); at the end of the sweep a table of all
jobs is printed, sorted by the monitored metric with the best job marked, and the process exits with status 1 when
a job failed. A failing job never loses the others' results: it is named in one line when it ends (its traceback,
when the training code raised, goes to ``<job dir>/bpkit_error.txt``), the sweep goes on, and its row is kept.

Where the hooks run: ``on_multirun_start``/``on_multirun_end`` in the process that was started (``bpkit-train
-m``), for every sweeper (basic, Optuna); ``on_job_start``/``on_job_end`` in the process that runs the job: the same
one with Hydra's basic launcher (also under Optuna), a worker with the joblib launcher (which receives a pickled
copy of this callback made after ``on_multirun_start``), a cluster job with submitit. The sweep directory is
therefore resolved once, in ``on_multirun_start`` (``hydra.sweep.dir`` holds ``${now:...}``, which Hydra resolves
anew in a job's copy of the config) and carried in the callback; a copy made without it derives the sweep
directory from the job's output directory.

Enabled in ``conf/train.yaml`` under ``hydra.callbacks.sweep_summary``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from typing_extensions import override

SUMMARY_NAME = "bpkit_sweep.jsonl"
ERROR_NAME = "bpkit_error.txt"
REPORT_UNAVAILABLE = "report unavailable"
_MINIMIZED_WORDS = ("loss", "mse", "mae", "rmse", "error", "err", "perplexity", "ppl", "nll", "bpd")


def _select(config: Any, key: str) -> Any:
    try:
        return OmegaConf.select(config, key, default=None)
    except Exception:  # an interpolation that does not resolve here
        return None


def _resolved_sweep_dir(config: DictConfig) -> Path:
    return Path(os.path.abspath(str(config.hydra.sweep.dir)))


def _sweep_dir_of_job(output_dir: str, subdir: Any) -> Path | None:
    """``<sweep dir>/<subdir>`` -> ``<sweep dir>``, from the job's resolved output directory."""
    if subdir is None or not str(subdir).strip():
        return None
    depth = len(Path(str(subdir)).parts)
    out = Path(os.path.abspath(output_dir))
    if len(out.parts) <= depth or tuple(out.parts[-depth:]) != Path(str(subdir)).parts:
        return None
    return out.parents[depth - 1]


def metric_direction(monitor: str, sweeper_direction: Any = None) -> str:
    """``"max"`` or ``"min"``: the sweeper's direction when it has one (Optuna), else by the metric's name
    (losses and errors are minimized, accuracies and scores maximized)."""
    if isinstance(sweeper_direction, str) and sweeper_direction.lower() in ("maximize", "minimize"):
        return "max" if sweeper_direction.lower() == "maximize" else "min"
    words = [w for part in str(monitor).lower().replace("-", "_").split("/") for w in part.split("_")]
    return "min" if any(w in _MINIMIZED_WORDS for w in words) else "max"


def _error_text(exc: Any) -> str:
    from bpkit.errors import BpkitConfigError

    if isinstance(exc, BpkitConfigError):
        return str(exc)
    if isinstance(exc, BaseException):
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return str(exc)


def _findings(run_dir: str | None) -> tuple[str, str | None]:
    """bpkit's findings on a job's run (``summary_line``) and the metric name ``monitor=auto`` stands for."""
    if not run_dir or not Path(run_dir).is_dir():
        return "no run", None
    try:
        from bpkit.report import diagnose, read_run, summary_line

        run = read_run(run_dir)
        auto = "val/acc" if "val/acc" in run.scalars else ("val/loss" if "val/loss" in run.scalars else None)
        return summary_line(diagnose(run), run), auto
    except Exception:  # no record, a truncated one, a bug in the report: the sweep still gets its table
        return REPORT_UNAVAILABLE, None


class SweepSummary(Callback):
    """Hydra callback: ``bpkit_sweep.jsonl`` in the sweep directory and a table of all jobs at the end.

    Example (``conf/train.yaml``)::

        hydra:
          callbacks:
            sweep_summary:
              _target_: bpkit.sweep.SweepSummary
    """

    def __init__(self) -> None:
        self._started: dict[int, float] = {}
        self._sweep_dir: str | None = None

    @override
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = _resolved_sweep_dir(config)  # the one resolution of ${now:...}: the launcher reuses its cache
        self._sweep_dir = str(sweep)
        sweep.mkdir(parents=True, exist_ok=True)
        (sweep / SUMMARY_NAME).write_text("", encoding="utf-8")

    @override
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        job = _select(config, "hydra.job.num")
        if job is not None:
            self._started[int(job)] = time.time()

    def _job_sweep_dir(self, hydra_cfg: Any) -> Path:
        if self._sweep_dir:
            return Path(self._sweep_dir)
        derived = _sweep_dir_of_job(str(hydra_cfg.runtime.output_dir), _select(hydra_cfg, "sweep.subdir"))
        return derived if derived is not None else Path(os.path.abspath(str(hydra_cfg.sweep.dir)))

    @override
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra_cfg = job_return.hydra_cfg.hydra if job_return.hydra_cfg is not None else None
        if hydra_cfg is None or str(hydra_cfg.mode) != "RunMode.MULTIRUN":
            return
        num = int(hydra_cfg.job.num)
        run_dir = str(hydra_cfg.runtime.output_dir)
        completed = job_return.status == JobStatus.COMPLETED
        entry: dict[str, Any] = {
            "job": num,
            "overrides": list(job_return.overrides or []),
            "status": "completed" if completed else "failed",
            "dir": run_dir,
            "start": self._started.pop(num, None),
            "end": time.time(),
        }
        monitor = _select(job_return.cfg, "monitor") if job_return.cfg is not None else None
        findings, auto = _findings(run_dir)
        entry["monitor"] = auto if monitor in (None, "auto") else str(monitor)
        entry["findings"] = findings
        sweep = self._job_sweep_dir(hydra_cfg)
        if completed:
            value = job_return._return_value
            entry["value"] = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
            if value is not None and entry["value"] is None:
                # a NaN metric (diverged, or nothing trained): Optuna's tell() refuses NaN and ends the whole
                # sweep; None makes it a failed trial and the sweep goes on
                job_return.return_value = None
        else:
            exc = job_return._return_value
            entry["error"] = _error_text(exc)
            from bpkit.errors import BpkitConfigError

            if isinstance(exc, BaseException) and not isinstance(exc, BpkitConfigError):
                try:  # the training code's own error: its traceback is kept next to the job's run
                    Path(run_dir).mkdir(parents=True, exist_ok=True)
                    (Path(run_dir) / ERROR_NAME).write_text(
                        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), encoding="utf-8")
                    entry["traceback"] = str(Path(run_dir) / ERROR_NAME)
                except OSError:
                    pass
            where = f" (traceback: {entry['traceback']})" if "traceback" in entry else ""
            print(f"bpkit sweep: job #{num} FAILED: {entry['error']}{where} | overrides: "
                  f"{' '.join(entry['overrides']) or '(none)'}",
                  file=sys.stderr, flush=True)
            # the failure is in the summary and ends the sweep with status 1 (on_multirun_end); handed to the
            # sweeper as a job without a value, so that Hydra's basic sweeper does not re-raise it with a
            # traceback before the table, and Optuna records a failed trial and goes on
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = None
        path = sweep / SUMMARY_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:  # one short line per write: appends of parallel jobs don't mix
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @override
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(self._sweep_dir) if self._sweep_dir else _resolved_sweep_dir(config)
        rows = read_sweep_summary(sweep)
        if not rows:
            return
        print(format_sweep_table(rows, sweep, monitor=_select(config, "monitor"),
                                 sweeper_direction=_select(config, "hydra.sweeper.direction")), flush=True)
        failed = [r for r in rows if r["status"] != "completed"]
        if failed:
            sys.stdout.flush()
            sys.exit(1)


def _monitor_name(rows: list[dict[str, Any]], monitor: Any) -> str:
    if isinstance(monitor, str) and monitor != "auto":
        return monitor
    names = [r.get("monitor") for r in rows if r.get("monitor")]
    return max(set(names), key=names.count) if names else "monitored metric"


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_sweep_table(rows: list[dict[str, Any]], sweep_dir: str | Path, monitor: Any = None,
                       sweeper_direction: Any = None) -> str:
    """The end-of-sweep table: one row per job (overrides, status, metric, findings), best first, best marked.

    Args:
        rows: the entries of ``bpkit_sweep.jsonl`` (:func:`read_sweep_summary`).
        sweep_dir: shown in the heading.
        monitor: the config's ``monitor`` (``auto``: the metric the jobs recorded, ``val/acc`` or ``val/loss``).
        sweeper_direction: ``hydra.sweeper.direction`` (Optuna's ``maximize``/``minimize``), if any.
    """
    name = _monitor_name(rows, monitor)
    direction = metric_direction(name, sweeper_direction)
    valued = [r for r in rows if r["status"] == "completed" and r.get("value") is not None]
    valued.sort(key=lambda r: (-r["value"] if direction == "max" else r["value"], r["job"]))
    rest = sorted((r for r in rows if r not in valued), key=lambda r: (r["status"] != "completed", r["job"]))
    failed = [r for r in rows if r["status"] != "completed"]
    arrow = "higher" if direction == "max" else "lower"
    lines = [f"\nbpkit sweep: {len(rows)} jobs in {sweep_dir} ({len(failed)} failed); sorted by {name} "
             f"({arrow} is better), * = best"]
    ordered = valued + rest
    shared = [o for o in (ordered[0].get("overrides") or []) if all(o in (r.get("overrides") or []) for r in ordered)] \
        if len(ordered) > 1 else []
    over = [" ".join(o for o in (r.get("overrides") or []) if o not in shared) or "(no overrides)" for r in ordered]
    if shared:
        lines.append(f"  every job: {' '.join(shared)}")
    width = min(max([len("overrides")] + [len(o) for o in over]), 60)
    vwidth = max(10, len(name))
    lines.append(f"    {'job':<5} {'overrides':<{width}} {'status':<9} {name:>{vwidth}}  findings")
    for r, o in zip(ordered, over):
        mark = "*" if valued and r is valued[0] else " "
        status = "ok" if r["status"] == "completed" else "FAILED"
        value = f"{r['value']:.4g}" if r.get("value") is not None else "-"
        note = r.get("findings", REPORT_UNAVAILABLE)
        if r["status"] != "completed":
            note = f"{r.get('error', '')}" + (f" | {note}" if note not in ("no run", REPORT_UNAVAILABLE) else "")
        lines.append(f"  {mark} #{r['job']:<4} {_cell(o, width):<{width}} {status:<9} {value:>{vwidth}}  "
                     f"{note}")
    if failed:
        lines.append(f"bpkit sweep: {len(failed)} of {len(rows)} jobs failed: "
                     + ", ".join(f"#{r['job']}" for r in failed) + " (the other jobs' results are kept); exit status 1")
    lines.append(f"bpkit sweep: summary {Path(sweep_dir) / SUMMARY_NAME}")
    return "\n".join(lines)


def read_sweep_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``<sweep_dir>/bpkit_sweep.jsonl`` by job number (``[]`` when there is none)."""
    path = Path(sweep_dir) / SUMMARY_NAME
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a job killed while writing
            continue
    return sorted(rows, key=lambda r: r["job"])
