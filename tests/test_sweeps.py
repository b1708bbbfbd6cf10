"""Recipes and sweeps as users launch them: real `-m` multirun subprocesses."""

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from bpkit.train import config_dir
from tests.test_train_cli import FAST, _offline_runs, bpkit_train


def _summary(sweep):
    return [json.loads(line) for line in (sweep / "bpkit_sweep.jsonl").read_text().splitlines()]


def test_recipe_sweep_runs_end_to_end(tmp_path):
    sweep = tmp_path / "sweep"
    proc = bpkit_train(["-m", "recipe=vanishing_depth", *FAST, "model.depth=3", "model.init=default",
                        "model.activation=sigmoid,relu", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _summary(sweep)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert {o for r in rows for o in r["overrides"] if o.startswith("model.activation")} == {
        "model.activation=sigmoid", "model.activation=relu"}
    assert "bpkit sweep: 2 jobs" in proc.stdout
    for job in ("0", "1"):
        assert len(_offline_runs(sweep / job)) == 1


def test_failing_job_keeps_the_others_and_is_reported(tmp_path):
    sweep = tmp_path / "sweep"
    proc = bpkit_train(["-m", *FAST, "logger=csv", "model.depth=2,-1,3", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode != 0
    rows = _summary(sweep)
    assert [r["status"] for r in rows] == ["completed", "failed", "completed"]
    assert "model.depth=-1 is invalid" in rows[1]["error"]
    assert "bpkit sweep: job #1 FAILED" in proc.stdout
    for job in ("0", "2"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_joblib_launcher_runs_two_jobs_in_parallel(tmp_path):
    sweep = tmp_path / "sweep"
    proc = bpkit_train(["-m", "hydra/launcher=local_parallel", *FAST, "logger=csv", "model.depth=2,3",
                        f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _summary(sweep)
    assert a["status"] == b["status"] == "completed"
    assert a["start"] < b["end"] and b["start"] < a["end"], "the two jobs overlapped in time"


@pytest.mark.slow
def test_optuna_sweeper_runs_two_trials(tmp_path):
    sweep = tmp_path / "sweep"
    proc = bpkit_train(["-m", "hparams_search=optuna_lr", "hydra.sweeper.n_trials=2", *FAST, "logger=csv",
                        f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _summary(sweep)
    assert len(rows) == 2 and all(r["status"] == "completed" and r["value"] is not None for r in rows)
    assert any(o.startswith("optimizer.lr=") for o in rows[0]["overrides"])
    assert "Best parameters" in proc.stdout + proc.stderr


def test_slurm_and_joblib_launchers_and_optuna_compose():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        slurm = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        joblib = compose("train", overrides=["hydra/launcher=local_parallel"], return_hydra_config=True)
        optuna = compose("train", overrides=["hparams_search=optuna_lr"], return_hydra_config=True)
    assert "submitit" in slurm.hydra.launcher._target_ and slurm.hydra.launcher.gpus_per_node == 1
    assert "joblib" in joblib.hydra.launcher._target_ and joblib.hydra.launcher.n_jobs == 2
    assert "optuna" in optuna.hydra.sweeper._target_ and optuna.hydra.sweeper.direction == "maximize"
    assert set(optuna.hydra.sweeper.params) == {"optimizer.lr", "optimizer.weight_decay"}


@pytest.mark.parametrize("recipe", ["vanishing_depth", "exploding_rnn", "long_range", "optimizers", "lr_schedules",
                                    "resnet_depth", "gradcheck", "mixed_precision",
                                    "long_range_tbptt"])
def test_recipes_define_a_sweep_and_a_wandb_group(recipe):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"recipe={recipe}"], return_hydra_config=True)
    assert cfg.group == recipe and recipe in cfg.tags
    assert cfg.hydra.sweeper.params, "each recipe carries its default sweep grid"
