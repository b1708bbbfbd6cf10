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
    assert sum(ln.startswith("  * #") for ln in proc.stdout.splitlines()) == 1, "the best job is marked"
    for job in ("0", "1"):
        assert len(_offline_runs(sweep / job)) == 1


# The failing job, the joblib launcher and the Optuna sweeper run with the default sweep directory in
# tests/test_sweeps_defaults.py.


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
