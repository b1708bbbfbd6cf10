"""Alerts in W&B beyond a 0/1 scalar: RunRecord logs a ``report/alerts`` table (step, kind, where, message) of every
bpkit callback's alerts at the end of fit (and when training raises), read back here from a real offline W&B run;
``wandb.alert`` goes to online runs only; a failing W&B never fails the run."""

from __future__ import annotations

import glob
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from bpkit.callbacks import GradientMonitor, RunRecord, _sink
from bpkit.callbacks.run_record import ALERT_TABLE_COLUMNS


class NaNAt(pl.LightningModule):
    """Returns a NaN loss at one batch step; otherwise a small regression."""

    def __init__(self, nan_at=3, raise_at=-1):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.nan_at, self.raise_at = nan_at, raise_at

    def training_step(self, batch, batch_idx):
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        if step == self.raise_at:
            raise RuntimeError("boom")
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        return loss * float("nan") if step == self.nan_at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _fit(tmp_path, module, callbacks, steps=8, quiet=True):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="bpkit-test", save_dir=str(tmp_path), offline=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, callbacks=callbacks, logger=logger, log_every_n_steps=2,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    import wandb

    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        try:
            trainer.fit(module)
        finally:
            run_dir = Path(wandb.run.dir).parent if wandb.run is not None else None
            wandb.finish()
    return trainer, run_dir


def _tables(run_dir):
    return sorted(glob.glob(str(run_dir / "files" / "media" / "table" / "report" / "alerts_*.table.json")))


def _recorded_alerts(trainer):
    record = Path(_sink.record_path(trainer))
    return [e["data"] for e in map(json.loads, record.open()) if e["type"] == "alert"]


def test_the_alerts_table_is_in_the_offline_run_files(tmp_path):
    monitor, record = GradientMonitor(), RunRecord(gradient_flow_image=False)
    trainer, run_dir = _fit(tmp_path, NaNAt(nan_at=3), [monitor, record])
    tables = _tables(run_dir)
    assert len(tables) == 1
    table = json.load(open(tables[0]))
    assert table["columns"] == list(ALERT_TABLE_COLUMNS) == ["step", "kind", "where", "message"]
    # the reference: the alerts each callback kept, and the record's alert entries
    kept = sorted([[a.step, a.kind, a.where, a.message] for a in monitor.alerts + record.alerts], key=lambda r: r[0])
    assert kept and table["data"] == kept
    recorded = [[d["step"], d["kind"], d["where"], d["message"]] for d in _recorded_alerts(trainer)]
    assert table["data"] == sorted(recorded, key=lambda r: r[0])
    assert {"nonfinite"} <= {row[1] for row in table["data"]} and any(row[2] == "loss" for row in table["data"])
    assert all(row[0] == 3 for row in table["data"] if row[1] == "nonfinite")
    assert record.alerts_sent == []  # offline: never wandb.alert


def test_a_run_without_alerts_logs_no_table(tmp_path):
    _, run_dir = _fit(tmp_path, NaNAt(nan_at=-1), [GradientMonitor(), RunRecord(gradient_flow_image=False)], steps=4)
    assert _tables(run_dir) == []


def test_a_crashed_run_still_gets_its_alerts_table(tmp_path):
    record = RunRecord(gradient_flow_image=False)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, NaNAt(nan_at=1, raise_at=5), [GradientMonitor(), record])
    tables = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "report" /
                           "alerts_*.table.json"))
    assert len(tables) == 1
    rows = json.load(open(tables[0]))["data"]
    assert rows and all(r[0] == 1 for r in rows) and {r[1] for r in rows} == {"nonfinite"}


def test_a_failing_wandb_table_is_warned_about_and_the_run_finishes(tmp_path, monkeypatch):
    import wandb

    def broken(*args, **kwargs):
        raise ConnectionError("W&B unreachable")

    monkeypatch.setattr(wandb.Table, "__init__", broken)
    record = RunRecord(gradient_flow_image=False)
    with pytest.warns(RuntimeWarning, match=r"W&B table logging \(report/alerts\) failed.*ConnectionError"):
        trainer, _ = _fit(tmp_path, NaNAt(nan_at=3), [GradientMonitor(), record], quiet=False)
    assert trainer.state.finished and trainer.global_step == 8
    assert record.alerts  # the alerts themselves are still kept and recorded
    assert any(d["where"] == "loss" for d in _recorded_alerts(trainer))


class _Run:
    """The W&B run object as an online (or offline) run exposes it, recording what it was sent."""

    def __init__(self, mode, fail=False):
        self.offline = mode != "online"
        self.settings = SimpleNamespace(mode=mode)
        self.fail, self.sent = fail, []

    def alert(self, title, text, level):
        if self.fail:
            raise ConnectionError("W&B unreachable")
        self.sent.append((title, text, level))


def _wandb_logger(run):
    return type("WandbLogger", (), {"experiment": run})()


def test_wandb_alert_goes_to_online_runs_only_and_survives_a_failing_wandb():
    online, offline, failing = _Run("online"), _Run("offline"), _Run("online", fail=True)
    trainer = SimpleNamespace(loggers=[_wandb_logger(online), _wandb_logger(offline)], is_global_zero=True)
    assert _sink.wandb_alert(trainer, "bpkit: exploding", "text") == 1
    assert online.sent == [("bpkit: exploding", "text", "WARN")] and offline.sent == []
    record = RunRecord()
    findings = [SimpleNamespace(title=f"finding {i}", text=lambda i=i: f"text {i}") for i in range(3)]
    with pytest.warns(RuntimeWarning, match="wandb.alert failed"):  # W&B unreachable: warned, the run stands
        assert record.send_alerts(SimpleNamespace(loggers=[_wandb_logger(failing)], is_global_zero=True),
                                  findings) == 0
    assert record.alerts_sent == []
    assert record.send_alerts(trainer, findings) == 3 and record.alerts_sent == ["finding 0", "finding 1", "finding 2"]
    assert [t for t, _, _ in online.sent[1:]] == ["bpkit: finding 0", "bpkit: finding 1", "bpkit: finding 2"]
