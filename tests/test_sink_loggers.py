"""Loggers by type, not by class name: a subclass of WandbLogger or TensorBoardLogger gets the histograms, the
gradient-flow image, the alerts table and ``wandb.alert`` its base class gets (read back from the offline W&B run's
files and from the TensorBoard event file); a plain custom Logger still gets every scalar."""

from __future__ import annotations

import glob
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from bpkit.callbacks import GradientMonitor, RunRecord, _sink


class TeamWandb(WandbLogger):
    """What a team wraps around WandbLogger: its own defaults, its own name."""

    def __init__(self, **kwargs):
        super().__init__(project="bpkit-team", **kwargs)


class TeamTensorBoard(TensorBoardLogger):
    pass


class TeamCSV(CSVLogger):
    pass


class Capture(Logger):
    """A plain custom logger: scalars only."""

    def __init__(self):
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs):
        pass

    @rank_zero_only
    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


class NaNAt(pl.LightningModule):
    """A small regression that returns a NaN loss at one batch step (so the run has alerts)."""

    def __init__(self, nan_at=3):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        return loss * float("nan") if self.trainer.global_step == self.nan_at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(48, 4, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _fit(tmp_path, logger, steps=6, nan_at=3):
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=logger, log_every_n_steps=2,
                         callbacks=[GradientMonitor(histogram_every_n_steps=2), RunRecord()],
                         default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(NaNAt(nan_at))
    return trainer


def test_loggers_are_told_apart_by_type(tmp_path):
    team_wandb, team_tb, team_csv = TeamWandb(save_dir=str(tmp_path), offline=True), \
        TeamTensorBoard(str(tmp_path)), TeamCSV(str(tmp_path))
    assert _sink.is_wandb(team_wandb) and not _sink.is_tensorboard(team_wandb)
    assert _sink.is_tensorboard(team_tb) and not _sink.is_wandb(team_tb) and not _sink.is_csv(team_tb)
    assert _sink.is_csv(team_csv) and not _sink.is_tensorboard(team_csv)
    plain = Capture()
    assert not (_sink.is_wandb(plain) or _sink.is_tensorboard(plain) or _sink.is_csv(plain))
    trainer = SimpleNamespace(loggers=[plain, team_tb, team_wandb])
    assert _sink.wandb_loggers(trainer) == [team_wandb]


@pytest.mark.parametrize("cls", [WandbLogger, TeamWandb], ids=["WandbLogger", "subclass"])
def test_a_subclassed_wandb_logger_gets_histograms_image_and_alert_table(tmp_path, monkeypatch, cls):
    import wandb

    logged = []
    original = wandb.sdk.wandb_run.Run.log

    def spy(self, data, *args, **kwargs):
        logged.append(dict(data))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    kwargs = {} if cls is TeamWandb else {"project": "bpkit-test"}
    logger = cls(save_dir=str(tmp_path), offline=True, **kwargs)
    try:
        _fit(tmp_path, logger)
        run_dir = Path(wandb.run.dir).parent
    finally:
        wandb.finish()
    hists = [d for d in logged if any(isinstance(v, wandb.Histogram) for v in d.values())]
    assert len(hists) == 3 and "grad/hist/net.0.weight" in hists[0]  # steps 1, 3, 5
    assert list((run_dir / "files" / "media" / "images" / "report").glob("gradient_flow_*.png"))
    assert glob.glob(str(run_dir / "files" / "media" / "table" / "report" / "alerts_*.table.json"))


class _OnlineRun:
    """The W&B run object as an online run exposes it, recording what it is sent."""

    offline = False
    settings = SimpleNamespace(mode="online")

    def __init__(self):
        self.alerts, self.logged = [], []

    def alert(self, title, text, level):
        self.alerts.append((title, text, level))

    def log(self, data, *args, **kwargs):
        self.logged.append(dict(data))


@pytest.mark.parametrize("base", [WandbLogger, TeamWandb], ids=["WandbLogger", "subclass"])
def test_wandb_alert_and_the_alerts_table_reach_a_subclassed_logger(tmp_path, base):
    import wandb

    class Spied(base):  # the real logger class (or the team's subclass) over a run that says it is online
        def __init__(self, run):
            super().__init__(save_dir=str(tmp_path), offline=True, **({"project": "p"} if base is WandbLogger else {}))
            self._spy = run

        @property
        def experiment(self):
            return self._spy

    run = _OnlineRun()
    trainer = SimpleNamespace(loggers=[Capture(), Spied(run)], is_global_zero=True, global_step=7, callbacks=[])
    assert _sink.wandb_alert(trainer, "bpkit: exploding", "text") == 1
    assert run.alerts == [("bpkit: exploding", "text", "WARN")]
    record = RunRecord()
    findings = [SimpleNamespace(title="Vanishing gradients", text=lambda: "layers 1-3")]
    assert record.send_alerts(trainer, findings) == 1 and run.alerts[-1][0] == "bpkit: Vanishing gradients"
    from bpkit import Alert

    assert record.log_alert_table(trainer, [Alert("spike", 3, "loss", 9.0, 4.0, "the loss spiked")]) == 1
    table = run.logged[-1]["report/alerts"]
    assert isinstance(table, wandb.Table) and table.data == [[3, "spike", "loss", "the loss spiked"]]


@pytest.mark.parametrize("cls", [TensorBoardLogger, TeamTensorBoard], ids=["TensorBoardLogger", "subclass"])
def test_a_subclassed_tensorboard_logger_gets_histograms_and_the_image(tmp_path, cls):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    logger = cls(str(tmp_path), name="tb")
    trainer = _fit(tmp_path, logger, nan_at=-1)  # every histogram non-empty (TensorBoard skips an all-NaN one)
    logger.experiment.flush()
    assert Path(_sink.record_path(trainer)).parent == Path(logger.log_dir)  # the record sits in version_0 too
    acc = event_accumulator.EventAccumulator(logger.log_dir, size_guidance={event_accumulator.HISTOGRAMS: 0,
                                                                          event_accumulator.IMAGES: 0})
    acc.Reload()
    tags = acc.Tags()
    assert "grad/hist/net.0.weight" in tags["histograms"]
    assert [e.step for e in acc.Histograms("grad/hist/net.0.weight")] == [1, 3, 5]
    assert "report/gradient_flow" in tags["images"]
    assert "grad/norm_total" in tags["scalars"]


def test_a_plain_custom_logger_still_gets_the_scalars(tmp_path):
    capture = Capture()
    trainer = _fit(tmp_path, capture)
    keys = {k for _, m in capture.metrics for k in m}
    assert {"grad/norm_total", "grad/norm/net.0.weight", "lr/group0"} <= keys
    assert not any(k.startswith("grad/hist/") for k in keys)  # histograms go to W&B/TensorBoard only
    assert Path(_sink.record_path(trainer)).is_file()
