"""A Hydra callback that keeps a sweep's results together and reports failed jobs.

Every job of a multirun appends one line to ``<sweep dir>/bpkit_sweep.jsonl`` (job number,
overrides, status, monitored metric or error, run directory); at the end of the sweep a table
of all jobs is printed and failed jobs are named. A failing job never loses the others' results:
Hydra runs every job and each keeps its own directory.

Enabled in ``conf/train.yaml`` under ``hydra.callbacks.sweep_summary``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

SUMMARY_NAME = "bpkit_sweep.jsonl"


def _sweep_dir(config: DictConfig) -> Path:
    return Path(config.hydra.sweep.dir)


class SweepSummary(Callback):
    def __init__(self) -> None:
        self._started: dict[int, float] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        job = config.hydra.job.get("num", None) if "hydra" in config else None
        if job is not None:
            self._started[int(job)] = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        path = _sweep_dir(config) / SUMMARY_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra_cfg = job_return.hydra_cfg.hydra if job_return.hydra_cfg is not None else None
        if hydra_cfg is None or str(hydra_cfg.mode) != "RunMode.MULTIRUN":
            return
        entry: dict[str, Any] = {
            "job": int(hydra_cfg.job.num),
            "overrides": list(job_return.overrides or []),
            "status": "completed" if job_return.status == JobStatus.COMPLETED else "failed",
            "dir": str(hydra_cfg.runtime.output_dir),
            "start": self._started.pop(int(hydra_cfg.job.num), None),
            "end": time.time(),
        }
        if job_return.status == JobStatus.COMPLETED:
            value = job_return._return_value
            entry["value"] = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        else:
            entry["error"] = f"{type(job_return._return_value).__name__}: {job_return._return_value}"
            # said now: Hydra re-raises the first failure after the last job, before on_multirun_end
            print(f"bpkit sweep: job #{entry['job']} FAILED ({entry['error']}); the other jobs go on and keep "
                  f"their results (summary: {Path(str(hydra_cfg.sweep.dir)) / SUMMARY_NAME})", flush=True)
        path = Path(str(hydra_cfg.sweep.dir)) / SUMMARY_NAME
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = read_sweep_summary(_sweep_dir(config))
        if not rows:
            return
        monitor = config.get("monitor", "auto")
        monitor = "monitored" if monitor == "auto" else monitor
        print(f"\nbpkit sweep: {len(rows)} jobs in {_sweep_dir(config)}")
        for row in rows:
            result = (f"{monitor}={row['value']:.4g}" if row.get("value") is not None else "") \
                if row["status"] == "completed" else f"FAILED: {row.get('error', '')}"
            print(f"  #{row['job']:<3} {' '.join(row['overrides']):<60} {result}")
        failed = [r for r in rows if r["status"] != "completed"]
        if failed:
            print(f"bpkit sweep: {len(failed)} of {len(rows)} jobs failed: "
                  + ", ".join(f"#{r['job']}" for r in failed) + " (the other jobs' results are kept)")


def read_sweep_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
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
