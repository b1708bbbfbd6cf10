"""Hostile overrides and environments that reach Lightning or the disk: one line `bpkit-train: error: <key>=<value>
is invalid: expected ...`, exit status 2, no traceback, and no run directory when nothing ran; runs that train
nothing say so; errors of the training code itself keep their traceback (in-process Hydra runs of the app)."""

import errno
import os

import fsspec.implementations.local
import pytest

from bpkit.models import MLP
from tests._train_app import FAST, train_app


def _runs(root):
    return sorted(p for p in root.glob("outputs/*/*") if p.is_dir())


def _one_line_error(res, message):
    assert res.rc == 2, res.err[-3000:]
    assert f"bpkit-train: error: {message}" in res.err
    assert "Traceback" not in res.err


@pytest.mark.parametrize("args, message", [
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 is invalid: expected an integer >= 1"),
    (["trainer.accumulate_grad_batches=-1"], "trainer.accumulate_grad_batches=-1 is invalid"),
    (["trainer.accumulate_grad_batches=1.5"], "trainer.accumulate_grad_batches=1.5 is invalid"),
    (["callbacks.checkpoint.dirpath=/proc/nope"], "callbacks.checkpoint.dirpath='/proc/nope' is invalid: expected a "
                                                  "directory that can be created and written: writing in /proc fails"),
    (["hydra.run.dir=/proc/nope"], "hydra.run.dir='/proc/nope' is invalid: expected a directory that can be created "
                                   "and written: writing in /proc fails"),
    (["hydra.run.dir=/proc"], "hydra.run.dir='/proc' is invalid"),  # exists, but cannot be written (even by root)
    (["-m", "hydra.sweep.dir=/proc/sweep", "model.depth=2,3"], "hydra.sweep.dir='/proc/sweep' is invalid"),
], ids=["accumulate-0", "accumulate-negative", "accumulate-float", "checkpoint-dirpath", "run-dir-uncreatable",
        "run-dir-unwritable", "sweep-dir"])
def test_hostile_override_fails_before_anything_runs(args, message, tmp_path, capsys):
    res = train_app([*(["-m"] if args[0] == "-m" else []), *FAST, *[a for a in args if a != "-m"]], capsys)
    _one_line_error(res, message)
    assert not _runs(tmp_path), "no run directory is left behind"
    assert not os.path.exists("/proc/nope")


@pytest.mark.parametrize("where", ["run_dir", "checkpoint_dirpath"])
def test_read_only_directory_fails_clearly(where, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root from writing (the /proc cases above cover root)")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if where == "run_dir":
            res = train_app([*FAST, f"hydra.run.dir={locked}"], capsys)
            _one_line_error(res, f"hydra.run.dir='{locked}' is invalid: expected a directory that can be created")
        else:
            res = train_app([*FAST, f"callbacks.checkpoint.dirpath={locked}/ckpt"], capsys)
            _one_line_error(res, f"callbacks.checkpoint.dirpath='{locked}/ckpt' is invalid")
            assert not _runs(tmp_path)
    finally:
        locked.chmod(0o755)


def test_full_disk_while_saving_a_checkpoint(tmp_path, capsys, monkeypatch):
    """ENOSPC from the write of last.ckpt (fsspec's local file, as Lightning saves it): one line naming the key."""
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "write", full, raising=False)
    run_dir = tmp_path / "run"
    res = train_app([*FAST, f"hydra.run.dir={run_dir}"], capsys)
    _one_line_error(res, f"callbacks.checkpoint.dirpath='{run_dir}/checkpoints' is invalid: expected a directory "
                         "that can be written, with free space (writing failed: No space left on device)")


def test_a_setting_lightning_refuses_during_fit_is_named(tmp_path, capsys):
    res = train_app([*FAST, "+trainer.val_check_interval=1000"], capsys)
    _one_line_error(res, "trainer.val_check_interval=1000 is invalid: expected a value Lightning accepts: "
                         "`val_check_interval` (1000) must be less than or equal to the number of the training "
                         "batches (4)")


@pytest.mark.parametrize("setting", ["trainer.max_steps=0", "trainer.limit_train_batches=0",
                                     "trainer.limit_train_batches=0.0", "trainer.max_epochs=0"])
def test_nothing_trained_is_said_and_no_result_claimed(setting, tmp_path, capsys):
    run_dir = tmp_path / "run"
    res = train_app([*FAST, setting, "report=true", f"hydra.run.dir={run_dir}"], capsys)
    assert res.rc == 0, res.err[-3000:]
    assert f"bpkit-train: nothing was trained: {setting}" in res.err
    (summary,) = [ln for ln in res.out.splitlines() if ln.startswith("bpkit: ")]
    assert summary == f"bpkit: nothing was trained ({setting}) | run: {run_dir}"
    assert not (run_dir / "report.html").exists(), "no report of a run that did not train"


def test_a_resumed_run_already_at_its_limits_trains_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_app([*FAST, f"hydra.run.dir={run_dir}"], capsys).rc == 0
    res = train_app([*FAST, f"hydra.run.dir={run_dir}", "ckpt_path=last"], capsys)  # max_epochs=1 again
    assert res.rc == 0, res.err[-3000:]
    assert "bpkit-train: nothing was trained: ckpt_path=last is already at step 4, epoch 1: the limits are " \
           "totals, raise trainer.max_steps or trainer.max_epochs" in res.err


class FileErrorMLP(MLP):
    """The training code's own error: an OSError on a file outside the run (its data, say)."""

    def forward(self, x):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/shards/part-0")


class BuggyMLP(MLP):
    """The training code's own error: a plain bug."""

    def forward(self, x):
        raise ValueError("shapes do not match")


@pytest.mark.parametrize("model, name", [("FileErrorMLP", "PermissionError"), ("BuggyMLP", "ValueError")])
def test_errors_of_the_training_code_keep_their_traceback(model, name, tmp_path, capsys):
    res = train_app([*FAST, f"model._target_={__name__}.{model}"], capsys)
    assert res.rc == 1
    assert "Traceback" in res.err and f"{name}: " in res.err and "in forward" in res.err
    assert "bpkit-train: error" not in res.err
