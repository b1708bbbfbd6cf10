"""Sweeps as a new user launches them: the default sweep directory (``multirun/${now:...}``), failed jobs, the table.

The hook tests drive :class:`bpkit.sweep.SweepSummary` in-process the way Hydra does (a job's copy of the config
resolves ``${now:...}`` anew); the subprocess tests run real ``bpkit-train -m`` sweeps in a temporary working
directory without ``hydra.sweep.dir=``, so the sweep lands in ``<tmp>/multirun/<date>/<time>``.
"""

import json
import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.types import RunMode
from omegaconf import OmegaConf

from bpkit.errors import BpkitConfigError
from bpkit.sweep import (ERROR_NAME, REPORT_UNAVAILABLE, SUMMARY_NAME, SweepSummary, format_sweep_table,
                         metric_direction, read_sweep_summary)
from bpkit.train import config_dir
from tests.test_train_cli import FAST, bpkit_train

SWEEP_DIR = "${hydra:runtime.cwd}/multirun/${now:%H-%M-%S-%f}"


def _hydra_config(tmp_path, job=None, overrides=(), monitor="auto", direction=None):
    """A config shaped as Hydra hands it to the callbacks (a fresh copy per job, as the launchers make)."""
    hydra = {"mode": RunMode.MULTIRUN, "runtime": {"cwd": str(tmp_path)},
             "sweep": {"dir": SWEEP_DIR.replace("${hydra:runtime.cwd}", str(tmp_path)), "subdir": "${hydra.job.num}"},
             "job": {"num": job if job is not None else 0}, "overrides": {"task": list(overrides)}}
    if direction:
        hydra["sweeper"] = {"direction": direction}
    return OmegaConf.create({"monitor": monitor, "hydra": hydra})


def _job_return(tmp_path, sweep_dir, job, overrides, status, value):
    hydra_cfg = _hydra_config(tmp_path, job, overrides)
    hydra_cfg.hydra.runtime.output_dir = str(sweep_dir / str(job))
    ret = JobReturn(overrides=list(overrides), cfg=OmegaConf.create({"monitor": "auto"}), hydra_cfg=hydra_cfg,
                    status=status)
    ret.return_value = value
    return ret


def _rows(sweep):
    return [json.loads(line) for line in (sweep / SUMMARY_NAME).read_text().splitlines()]


def test_summary_lands_in_the_sweep_dir_resolved_once_and_failures_end_with_status_1(tmp_path, capsys):
    setup_globals()  # Hydra's ${now:...} resolver
    cb = SweepSummary()
    master = _hydra_config(tmp_path)
    cb.on_multirun_start(config=master)
    sweeps = list((tmp_path / "multirun").iterdir())
    assert len(sweeps) == 1 and (sweeps[0] / SUMMARY_NAME).is_file()
    sweep = sweeps[0]
    ok = _job_return(tmp_path, sweep, 0, ["model.depth=2"], JobStatus.COMPLETED, 0.5)
    try:
        raise RuntimeError("CUDA out of memory\nsecond line")
    except RuntimeError as exc:
        boom = exc
    bad = _job_return(tmp_path, sweep, 1, ["model.depth=9"], JobStatus.FAILED, boom)
    conf = _job_return(tmp_path, sweep, 2, ["model.depth=-1"], JobStatus.FAILED,
                       BpkitConfigError("model.depth", -1, "an integer >= 1"))
    time.sleep(0.002)  # the job's copy of ${now:...} would name another directory
    for num, ret in enumerate((ok, bad, conf)):
        assert str(ret.hydra_cfg.hydra.sweep.dir) != str(sweep)
        cb.on_job_start(config=_hydra_config(tmp_path, num))
        cb.on_job_end(config=ret.hydra_cfg, job_return=ret)
    err = capsys.readouterr().err
    assert err.count("FAILED") == 2
    assert "bpkit sweep: job #1 FAILED: RuntimeError: CUDA out of memory" in err
    assert "bpkit sweep: job #2 FAILED: model.depth=-1 is invalid" in err and "Traceback" not in err
    # the failures are handed to the sweeper as jobs without a value: Hydra's basic sweeper does not re-raise them
    assert bad.status == conf.status == JobStatus.COMPLETED and bad.return_value is None
    assert "CUDA out of memory" in (sweep / "1" / ERROR_NAME).read_text()  # the traceback is kept
    rows = _rows(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [(0, "completed"), (1, "failed"), (2, "failed")]
    assert rows[0]["value"] == 0.5 and rows[0]["start"] <= rows[0]["end"]
    with pytest.raises(SystemExit) as ended:
        cb.on_multirun_end(config=master)
    assert ended.value.code == 1
    out = capsys.readouterr().out
    assert f"bpkit sweep: 3 jobs in {sweep} (2 failed)" in out
    assert "2 of 3 jobs failed: #1, #2" in out


def test_a_pickled_copy_without_the_resolved_dir_derives_it_from_the_job_dir(tmp_path):
    setup_globals()
    sweep = tmp_path / "multirun" / "fixed"
    sweep.mkdir(parents=True)
    cb = SweepSummary()  # e.g. made by a launcher before on_multirun_start ran in this process
    ret = _job_return(tmp_path, sweep, 3, ["a=1"], JobStatus.COMPLETED, 1.0)
    cb.on_job_end(config=ret.hydra_cfg, job_return=ret)
    assert [r["job"] for r in _rows(sweep)] == [3]


def test_nan_metric_becomes_a_job_without_value(tmp_path):
    setup_globals()
    cb = SweepSummary()
    cb.on_multirun_start(config=_hydra_config(tmp_path))
    sweep = next((tmp_path / "multirun").iterdir())
    ret = _job_return(tmp_path, sweep, 0, ["optimizer.lr=10"], JobStatus.COMPLETED, float("nan"))
    cb.on_job_end(config=ret.hydra_cfg, job_return=ret)
    assert ret.return_value is None  # Optuna 2.x tell() raises on NaN and would end the whole search
    row = _rows(sweep)[0]
    assert row["status"] == "completed" and row["value"] is None and row["findings"] == "no run"


def test_findings_of_a_broken_record_read_report_unavailable(tmp_path):
    setup_globals()
    cb = SweepSummary()
    cb.on_multirun_start(config=_hydra_config(tmp_path))
    sweep = next((tmp_path / "multirun").iterdir())
    (sweep / "0").mkdir()
    (sweep / "0" / "bpkit_record.jsonl").write_bytes(b"\xff\xfe not json")
    ret = _job_return(tmp_path, sweep, 0, ["x=1"], JobStatus.COMPLETED, 0.3)
    cb.on_job_end(config=ret.hydra_cfg, job_return=ret)
    assert _rows(sweep)[0]["findings"] == REPORT_UNAVAILABLE


def _row(job, value, status="completed", findings="No problems found", over="model.depth"):
    return {"job": job, "overrides": ["logger=csv", f"{over}={job}"], "status": status, "value": value,
            "monitor": "val/loss", "findings": findings, **({"error": "boom"} if status == "failed" else {})}


def test_table_sorted_by_metric_best_marked_shared_overrides_factored():
    rows = [_row(0, 0.9), _row(1, 0.2, findings="Vanishing gradients"), _row(2, None, "failed"), _row(3, 0.5)]
    table = format_sweep_table(rows, "/s", monitor="auto").splitlines()
    body = [ln for ln in table if ln.lstrip().startswith(("* #", "#"))]
    assert [ln.split("#")[1].split()[0] for ln in body] == ["1", "3", "0", "2"]  # val/loss: lower first
    assert body[0].startswith("  * #1") and not any(ln.startswith("  *") for ln in body[1:])
    assert "Vanishing gradients" in body[0] and "FAILED" in body[3] and "boom" in body[3]
    assert any(ln.strip() == "every job: logger=csv" for ln in table)
    assert "logger=csv" not in "\n".join(body)
    maxed = format_sweep_table(rows, "/s", monitor="val/loss", sweeper_direction="maximize").splitlines()
    assert [ln for ln in maxed if ln.startswith("  * #")][0].startswith("  * #0")


def test_metric_direction():
    assert metric_direction("val/acc") == "max" and metric_direction("val/f1") == "max"
    assert metric_direction("val/loss") == "min" and metric_direction("val/mse") == "min"
    assert metric_direction("val/acc", "minimize") == "min"


def test_read_sweep_summary_skips_a_cut_line(tmp_path):
    (tmp_path / SUMMARY_NAME).write_text('{"job": 1}\n{"job": 0}\n{"job": 2, "ov')
    assert [r["job"] for r in read_sweep_summary(tmp_path)] == [0, 1]


def test_optuna_search_is_a_multirun_without_dash_m():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna_lr"], return_hydra_config=True)
        plain = compose("train", return_hydra_config=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert plain.hydra.mode != RunMode.MULTIRUN


# ---------------------------------------------------------------- real sweeps, default sweep directory

def _default_sweep(tmp_path):
    sweeps = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 1, f"one sweep under {tmp_path / 'multirun'}: {sweeps}"
    return sweeps[0]


def _table(stdout):
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("bpkit sweep: ") and " jobs in " in ln)
    return lines[start:]


def test_basic_launcher_default_dir_with_a_failing_job(tmp_path):
    proc = bpkit_train(["-m", *FAST, "logger=csv", "model.depth=2,-1"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-3000:]
    assert "FileNotFoundError" not in proc.stderr
    sweep = _default_sweep(tmp_path)
    rows = read_sweep_summary(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [(0, "completed"), (1, "failed")]
    assert rows[0]["value"] is not None and rows[0]["monitor"] == "val/acc" and rows[0]["findings"]
    assert "model.depth=-1 is invalid" in rows[1]["error"]
    failed = [ln for ln in proc.stderr.splitlines() if "FAILED" in ln]
    assert len(failed) == 1 and failed[0].startswith("bpkit sweep: job #1 FAILED: model.depth=-1 is invalid")
    table = _table(proc.stdout)
    assert f"2 jobs in {sweep} (1 failed)" in table[0] and "sorted by val/acc" in table[0]
    assert table[1].strip().startswith("every job:")
    assert any(ln.startswith("  * #0") and "model.depth=2" in ln for ln in table)
    assert any(ln.lstrip().startswith("#1") and "FAILED" in ln for ln in table)
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file()


def _wandb_identities(sweep):
    """(name, group, tags) of every job's offline W&B run, read from its .wandb log."""
    from tests.test_wandb_identity import run_record, wandb_records

    runs = sorted(sweep.glob("[0-9]*/wandb/offline-run-*"))
    records = [run_record(wandb_records(r)) for r in runs]
    return [(r["display_name"], r["run_group"], set(r["tags"])) for r in records]


@pytest.mark.slow
def test_joblib_launcher_default_dir_runs_two_jobs_in_parallel(tmp_path):
    # the default logger (W&B offline): each joblib worker's run is named by its overrides, one group per sweep
    proc = bpkit_train(["-m", "hydra/launcher=local_parallel", *FAST, "model.depth=2,3"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FileNotFoundError" not in proc.stderr + proc.stdout
    sweep = _default_sweep(tmp_path)
    a, b = read_sweep_summary(sweep)
    assert a["status"] == b["status"] == "completed" and a["value"] is not None and b["value"] is not None
    assert a["start"] < b["end"] and b["start"] < a["end"], "the two jobs overlapped in time"
    table = _table(proc.stdout)
    assert "2 jobs in" in table[0] and sum(ln.lstrip().startswith(("* #", "#")) for ln in table) == 2
    identities = _wandb_identities(sweep)
    assert sorted(name for name, _, _ in identities) == ["model.depth=2", "model.depth=3"]
    assert len({group for _, group, _ in identities}) == 1 and all("sweep" in tags for _, _, tags in identities)


@pytest.mark.slow
def test_optuna_search_default_dir_without_dash_m(tmp_path):
    proc = bpkit_train(["hparams_search=optuna_lr", "hydra.sweeper.n_trials=2", *FAST], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "outputs").exists(), "hparams_search=optuna_lr without -m did a single run"
    sweep = _default_sweep(tmp_path)
    rows = read_sweep_summary(sweep)
    assert len(rows) == 2 and all(r["status"] == "completed" and r["value"] is not None for r in rows)
    assert any(o.startswith("optimizer.lr=") for o in rows[0]["overrides"])
    assert "Best parameters" in proc.stdout + proc.stderr
    table = _table(proc.stdout)
    assert "sorted by val/acc (higher is better)" in table[0]
    best = max(rows, key=lambda r: r["value"])
    assert any(ln.startswith(f"  * #{best['job']}") for ln in table)
    identities = _wandb_identities(sweep)  # trials named by the values Optuna drew, one group for the search
    names = [name for name, _, _ in identities]
    assert len(names) == 2 and len(set(names)) == 2 and all("optimizer.lr=" in n for n in names), names
    assert len({group for _, group, _ in identities}) == 1
