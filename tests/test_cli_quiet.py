"""A quiet, conventional `bpkit-train`: no config dump unless asked, each Lightning line once, no advertising tips,
and a short summary whose paths exist and whose commands work when pasted; one learning-rate series per param group;
the `debug=fdr` preset runs."""

import csv
import json
import re
import shlex
from pathlib import Path

import torch

from tests._train_app import FAST, train_app
from tests.test_train_cli import FAST as CLI_FAST
from tests.test_train_cli import bpkit_train

SUMMARY_WIDTH = 200


def _summary_block(out: str) -> list[str]:
    """The last `bpkit: ...` line and the indented command lines under it."""
    lines = out.splitlines()
    (start,) = [i for i, ln in enumerate(lines) if ln.startswith("bpkit: ")][-1:]
    block = [lines[start]]
    for ln in lines[start + 1:]:
        if not ln.startswith("  "):
            break
        block.append(ln)
    return block


def _message(line: str) -> str:
    """A log line without its decoration: Hydra's `[time][logger][LEVEL] - ` or Lightning's `INFO: `."""
    line = re.sub(r"^\[[^\]]*\]\[[^\]]*\]\[[A-Z]+\] - ", "", line)
    return re.sub(r"^(INFO|WARNING): ", "", line).strip()


def test_a_default_run_prints_each_line_once_and_a_short_summary_that_works(tmp_path):
    """A real `bpkit-train` subprocess with Hydra's default job logging (the doubling came from it)."""
    run_dir = tmp_path / "run"
    proc = bpkit_train([*CLI_FAST, "logger=tensorboard", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    # no YAML dump of the config (it is in .hydra/config.yaml)
    assert not re.search(r"^(defaults|seed|trainer|model|hydra):", proc.stdout, re.M), proc.stdout[:2000]
    assert "_target_:" not in text
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    # each Lightning line once (on the console; Hydra's log file still gets it), no litlogger/litmodels tip
    messages = [_message(ln) for ln in text.splitlines() if _message(ln)]
    assert messages.count("GPU available: False, used: False") == 1, text
    repeated = {m for m in messages if messages.count(m) > 1}
    assert not repeated, repeated
    assert "Tip:" not in text and "litlogger" not in text
    assert "GPU available: False" in (run_dir / "train.log").read_text()
    # the summary: short lines, the run directory, and `tensorboard --logdir <dir>` on a directory with the events
    block = _summary_block(proc.stdout)
    assert all(len(ln) < SUMMARY_WIDTH for ln in block), block
    assert block[0].endswith(f"| run: {run_dir}") and "val/acc=" in block[0]
    (view,) = [shlex.split(ln.split("view: ", 1)[1]) for ln in block if "view: " in ln]
    assert view[:2] == ["tensorboard", "--logdir"] and len(view) == 3
    assert list(Path(view[2]).glob("**/events.out.tfevents.*")), view


def test_csv_run_logs_one_lr_series_per_param_group_and_names_its_file(tmp_path, capsys):
    """The default callbacks: RunRecord's lr/group<j> only (Lightning's LearningRateMonitor is no longer in them);
    the number of groups comes from the optimizer state Lightning checkpointed."""
    run_dir = tmp_path / "run"
    res = train_app([*FAST, "logger=csv", "optimizer=momentum", f"hydra.run.dir={run_dir}"], capsys)
    assert res.rc == 0, res.err[-3000:]
    assert "_target_:" not in res.out  # no config dump by default
    block = _summary_block(res.out)
    assert all(len(ln) < SUMMARY_WIDTH for ln in block), block
    (metrics,) = [Path(shlex.split(ln.split("metrics: ", 1)[1])[0]) for ln in block if "metrics: " in ln]
    assert metrics.name == "metrics.csv" and metrics.is_file()
    with open(metrics) as f:
        columns = next(csv.reader(f))
    groups = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False,
                        map_location="cpu")["optimizer_states"][0]["param_groups"]
    lr_columns = sorted(c for c in columns if c.startswith("lr"))  # LearningRateMonitor's: lr-SGD, lr-SGD-momentum
    assert lr_columns == sorted(f"lr/group{j}" for j in range(len(groups))), columns
    assert not [c for c in columns if "momentum" in c and not c.startswith("momentum/")], columns  # own axis


def test_print_config_on_request(tmp_path, capsys):
    res = train_app([*FAST, "print_config=true", "trainer.max_epochs=0", f"hydra.run.dir={tmp_path / 'run'}"],
                    capsys)
    assert res.rc == 0, res.err[-3000:]
    assert re.search(r"^model:\n  _target_: bpkit\.models\.MLP", res.out, re.M), res.out[:2000]


def test_debug_fdr_runs_one_batch(tmp_path, capsys):
    run_dir = tmp_path / "run"
    res = train_app([*FAST, "debug=fdr", f"hydra.run.dir={run_dir}"], capsys)
    assert res.rc == 0, res.err[-3000:]
    assert res.out.count("bpkit: ") == 1
    steps = {e["step"] for e in map(json.loads, open(run_dir / "bpkit_record.jsonl"))
             if e["type"] == "scalars" and any(k.startswith("train/") for k in e["data"])}
    assert steps == {0}, steps  # fast_dev_run: one training batch
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()  # fast_dev_run saves no checkpoint
