"""Real subprocess runs of `bpkit-train`, as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

FAST = ["torch_threads=1", "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def bpkit_train(args, cwd, timeout=300):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", "bpkit.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _offline_runs(run_dir: Path):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("extra", [
    [],
    ["model=rnn", "data=adding", "model.cell=lstm", "data.seq_len=20", "data.num_train=256"],
    ["model=resnet", "model.depth=2", "model.width=8"],
    ["recipe=long_range_tbptt", "model.hidden_size=16", "data.window=32", "clipping=zclip"],
], ids=["mlp-digits", "lstm-adding", "resnet-digits", "tbptt-streaming"])
def test_train_runs_and_logs_to_wandb_offline(extra, tmp_path):
    run_dir = tmp_path / "run"
    proc = bpkit_train([*FAST, *extra, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    summary = [i for i, ln in enumerate(lines) if ln.startswith("bpkit: ")]
    assert summary and "val/loss=" in lines[summary[-1]] and lines[summary[-1]].endswith(f"run: {run_dir}")
    assert lines[summary[-1] + 1:] == [f"  view: wandb leet {run_dir / 'wandb'}",
                                       f"  upload: wandb sync {run_dir / 'wandb'}"]
    runs = _offline_runs(run_dir)
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    if not extra:  # a plain run is named after its model and data, and tagged with the config choices
        from tests.test_wandb_identity import run_record, wandb_records

        record = run_record(wandb_records(runs[0]))
        assert record["display_name"] == "mlp-digits" and "run_group" not in record
        assert record["tags"] == ["model:mlp", "data:digits", "optimizer:adam"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()


@pytest.mark.parametrize("args, message", [
    (["model=transformer"], "Could not find 'model/transformer'"),
    (["model.depth=-1"], "bpkit-train: error: model.depth=-1 is invalid: expected an integer >= 1"),
    (["task.loss=bce"], "bpkit-train: error: task.loss='bce' is invalid"),
])
def test_bad_input_fails_clearly_and_leaves_no_run(args, message, tmp_path):
    run_dir = tmp_path / "run"
    proc = bpkit_train([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_lr_find_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = bpkit_train(["trainer.max_epochs=2", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
                        "lr_find=true", "lr_finder.num_steps=30", "scheduler=warmup_cosine",
                        f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LR range test: suggested lr=" in proc.stdout and "rule min_div10" in proc.stdout
    assert (run_dir / "lr_find.png").stat().st_size > 10_000
    media = list(_offline_runs(run_dir)[0].glob("files/media/images/lr_find/*.png"))
    assert media, "the plot is logged to W&B as an image"
