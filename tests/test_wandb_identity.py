"""W&B identity of runs and sweeps: every job of a sweep gets its own readable name, one group per sweep, the config
choices as tags, and the sweep is browsed and uploaded as a whole from `<sweep dir>/wandb` (read back from the W&B
offline files with `wandb leet inspect`, as a user would)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from bpkit.train import SweepClock, wandb_identity
from tests._hydra import compose_train
from tests.test_train_cli import FAST, bpkit_train

WANDB = str(Path(sys.executable).parent / "wandb")


@pytest.fixture(autouse=True)
def _no_sweep_env(monkeypatch):
    """No sweep clock from another test of this process (restored, i.e. removed, afterwards)."""
    monkeypatch.setenv("BPKIT_SWEEP", "")


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of an offline run's .wandb log, as `wandb leet inspect --json` prints them."""
    out = subprocess.run([WANDB, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(ln) for ln in out.stdout.splitlines() if ln.strip()]


def run_record(records: list[dict]) -> dict:
    """The `run` record: display_name, run_group, tags, ..."""
    runs = [r["run"] for r in records if r["type"] == "run"]
    assert runs, records[:3]
    return runs[0]


def history_keys(records: list[dict]) -> set[str]:
    return {k for r in records if r["type"] == "history" for k in r["history"]["item"]}


def test_multirun_with_the_default_sweep_dir_names_groups_and_links_every_job(tmp_path):
    """`bpkit-train -m model.depth=2,3` as a user types it: the default `multirun/<date>/<time>` directory."""
    proc = bpkit_train(["-m", *FAST, "trainer.log_every_n_steps=2", "model.depth=2,3"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = [p for p in tmp_path.glob("multirun/*/*") if p.is_dir()]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]

    # each job keeps its own run; the sweep's wandb/ links them all
    own = [sorted((job / "wandb").glob("offline-run-*")) for job in jobs]
    assert all(len(runs) == 1 and not runs[0].is_symlink() for runs in own)
    shared = sorted((sweep / "wandb").glob("offline-run-*"))
    assert [p.name for p in shared] == sorted(runs[0].name for runs in own)
    assert {p.resolve() for p in shared} == {runs[0].resolve() for runs in own}

    logs = [wandb_records(runs[0]) for runs in own]
    records = [run_record(log) for log in logs]
    assert [r["display_name"] for r in records] == ["model.depth=2", "model.depth=3"]
    (group,) = {r["run_group"] for r in records}
    assert re.fullmatch(r"mlp-digits-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", group), group
    for r in records:
        assert {"model:mlp", "data:digits", "optimizer:adam", "sweep"} <= set(r["tags"])

    # one learning-rate series per param group, from RunRecord (no Lightning LearningRateMonitor series)
    for log in logs:
        assert sorted(k for k in history_keys(log) if k.startswith("lr")) == ["lr/group0"]

    # the printed commands work when pasted: they name the sweep's wandb/ and `wandb sync` finds both runs there
    views = {ln.strip() for ln in proc.stdout.splitlines() if ln.strip().startswith("view: wandb leet ")}
    uploads = {ln.strip() for ln in proc.stdout.splitlines() if ln.strip().startswith("upload: wandb sync ")}
    assert views == {f"view: wandb leet {shlex.quote(str(sweep / 'wandb'))}"}
    (upload,) = uploads
    dry = subprocess.run([WANDB, *shlex.split(upload.split(": ", 1)[1])[1:], "--dry-run"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert dry.returncode == 0 and "Would sync 2 run(s)" in dry.stdout + dry.stderr, dry.stdout + dry.stderr


def _as_job(cfg, task, sweeper_params=None, num=0):
    """Make the composed config look like job `num` of a multirun with these job overrides."""
    hc = HydraConfig.get()
    OmegaConf.set_readonly(hc, False)
    with open_dict(hc):
        hc.mode = RunMode.MULTIRUN
        hc.overrides.task = task
        hc.job.num = num
        hc.sweep.subdir = str(num)
        hc.runtime.output_dir = f"/tmp/sweep/{num}"
        if sweeper_params is not None:
            hc.sweeper.params = sweeper_params
    return cfg


def test_plain_runs_are_named_by_recipe_or_model_and_data(tmp_path):
    cfg = compose_train([], str(tmp_path))
    ident = wandb_identity(cfg)
    assert ident["name"] == "mlp-digits" and ident["group"] is None
    assert ident["tags"] == ["model:mlp", "data:digits", "optimizer:adam"]
    cfg = compose_train(["recipe=vanishing_depth", "clipping=zclip"], str(tmp_path))
    ident = wandb_identity(cfg)
    assert ident["name"] == "vanishing_depth" and ident["group"] == "vanishing_depth"
    assert {"recipe", "vanishing_depth", "recipe:vanishing_depth", "clipping:zclip", "model:mlp"} <= set(ident["tags"])
    assert wandb_identity(compose_train(["run_name=mine"], str(tmp_path)))["name"] == "mine"


def test_sweep_jobs_are_named_by_what_varies_and_share_one_group(tmp_path):
    """A recipe's grid (sweeper params) and a command-line sweep: the name keeps what varies, drops what is fixed
    (`trainer.max_epochs=1`, and a grid key the command line fixes); the group is recipe + the sweep's start."""
    cfg = compose_train(["recipe=vanishing_depth"], str(tmp_path))
    launched = ["recipe=vanishing_depth", "trainer.max_epochs=1", "model.init=he", "optimizer.lr=0.1,0.01"]
    SweepClock().on_multirun_start(config=compose_hydra(launched))
    start = json.loads(os.environ["BPKIT_SWEEP"])["start"]
    names = set()
    for num, (depth, act, lr) in enumerate([(4, "relu", 0.1), (20, "sigmoid", 0.01)]):
        task = ["recipe=vanishing_depth", "trainer.max_epochs=1", "model.init=he", f"optimizer.lr={lr}",
                f"model.depth={depth}", f"model.activation={act}"]
        _as_job(cfg, task, {"model.depth": "4,20", "model.activation": "sigmoid,relu", "model.init": "default,he"},
                num)
        ident = wandb_identity(cfg)
        assert ident["name"] == f"optimizer.lr={lr},model.depth={depth},model.activation={act}"
        assert ident["group"] == f"vanishing_depth-{start}"
        assert "recipe:vanishing_depth" in ident["tags"] and "sweep" in ident["tags"]
        names.add(ident["name"])
    assert len(names) == 2


def test_sweep_identity_without_the_clock_reads_multirun_yaml(tmp_path):
    """A launcher whose workers do not inherit the environment: the sweep's multirun.yaml says what was swept."""
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - model.depth=2,3\n    - seed=1\n")
    cfg = compose_train([], str(sweep / "0"))
    _as_job(cfg, ["model.depth=3", "seed=1"], num=0)
    with open_dict(HydraConfig.get()):
        HydraConfig.get().runtime.output_dir = str(sweep / "0")
    ident = wandb_identity(cfg)
    assert ident["name"] == "model.depth=3"
    assert re.fullmatch(r"mlp-digits-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", ident["group"]), ident["group"]


def compose_hydra(task):
    """A main config of a multirun launched with these overrides (what SweepClock sees)."""
    return OmegaConf.create({"hydra": {"overrides": {"task": task}}})
