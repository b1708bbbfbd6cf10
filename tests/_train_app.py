"""Run `bpkit-train` in this process, exactly as its console script does (argv -> Hydra -> the app)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import lightning.pytorch  # noqa: F401  imported here, not inside a test: its log handler keeps the stderr it
from hydra.core.global_hydra import GlobalHydra  # finds, and capsys closes a test's stderr afterwards

# a few steps of the default job; no W&B (fast), every step in the record
FAST = ["torch_threads=1", "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
        "logger=none", "report=false",
        # Hydra's logging setup would keep a handle on pytest's captured streams after the test
        "hydra/job_logging=none", "hydra/hydra_logging=none"]


@dataclass
class Result:
    rc: int
    out: str
    err: str


def train_app(args: list[str], capsys) -> Result:
    """``bpkit-train ARGS``: exit status, stdout and stderr."""
    from bpkit.train import _hydra_main

    GlobalHydra.instance().clear()
    argv, sys.argv = sys.argv, ["bpkit-train", *args]
    rc = 0
    try:
        _hydra_main()
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    out, err = capsys.readouterr()
    return Result(rc, out, err)


def next_second() -> None:
    """Wait for the clock's next second: runs in `outputs/<date>/<%H-%M-%S>` get their own directories."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)
