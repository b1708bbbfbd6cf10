"""Faults: a NaN with ``on_nonfinite="stop"`` leaves a checkpoint of the last good step and stops cleanly,
``"raise"`` names the parameter, and a broken logger or a full disk never stops training: the run goes on,
the problem is warned about once, and the other outputs are still written."""

import errno
import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers.logger import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bpkit.callbacks import ActivationMonitor, GradientClipping, GradientMonitor, _sink
from bpkit.callbacks.run_record import RunRecord
from bpkit.detect import NonFiniteGradientError

NAN_AT = 3


class Net(pl.LightningModule):
    def __init__(self, nan_at=NAN_AT):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.nan_at = nan_at
        self.before = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == self.nan_at:
            self.before = {k: v.clone() for k, v in self.state_dict().items()}
            x = x.clone()
            x[0, 0] = float("nan")  # a NaN input: NaN loss and NaN gradients in net.0 and everything after
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def trainer(root, callbacks, logger=False, max_steps=6, **kw):
    return pl.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=callbacks, logger=logger,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                      log_every_n_steps=1, **kw)


class Capture(Logger):
    name, version = "capture", 0

    def __init__(self):
        super().__init__()
        self.metrics = []

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


class Unreachable(Capture):
    """A logger whose backend is gone (W&B unreachable): every call raises."""

    name = "unreachable"

    def log_metrics(self, metrics, step=None):
        if any(k.startswith(("grad/", "act/", "clip/", "lr/")) for k in metrics):
            raise ConnectionError("api.wandb.ai: Name or service not known")


def ours(caught, text):
    return [str(w.message) for w in caught if "bpkit" in str(w.message) and text in str(w.message)]


def test_nan_with_stop_leaves_the_last_good_checkpoint_and_stops(tmp_path):
    monitor = GradientMonitor(on_nonfinite="stop", log_every_n_steps=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    model = Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(tmp_path, [monitor, RunRecord(gradient_flow_image=False), ckpt], max_steps=20)
        t.fit(model, loader())
    assert t.global_step == NAN_AT + 1 and t.should_stop  # stopped right after the NaN step
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == NAN_AT + 1
    for name, value in model.before.items():  # the update of the NaN step was dropped
        assert torch.isfinite(last["state_dict"][name]).all(), name
        torch.testing.assert_close(last["state_dict"][name], value, rtol=0, atol=0, msg=name)
    # Adam took exactly the good steps: its state was not touched by the NaN step
    assert all(int(s["step"]) == NAN_AT for s in last["optimizer_states"][0]["state"].values())
    assert [(a.kind, a.step) for a in monitor.alerts] == [("nonfinite", NAN_AT)]
    assert monitor.alerts[0].where.startswith("net.0.weight") and monitor.skipped_steps == 1
    assert ours(caught, "NaN/Inf gradient at step 3")
    record = [json.loads(line) for line in open(tmp_path / "bpkit_record.jsonl")]
    end = [e["data"] for e in record if e["type"] == "run" and e["data"]["event"] == "end"]
    assert end and end[0]["status"] == "finished"  # a clean stop, not a crash
    assert any(e["type"] == "alert" and e["data"]["kind"] == "nonfinite" for e in record)


def test_nan_with_raise_names_the_parameter(tmp_path):
    record = RunRecord(gradient_flow_image=False)
    with pytest.raises(NonFiniteGradientError, match=r"NaN/Inf gradient at step 3 .* first net\.0\.weight"):
        trainer(tmp_path, [GradientMonitor(on_nonfinite="raise"), record]).fit(Net(), loader())
    entries = [json.loads(line) for line in open(tmp_path / "bpkit_record.jsonl")]
    end = [e["data"] for e in entries if e["type"] == "run" and e["data"]["event"] == "end"][0]
    assert end["status"] == "crashed" and "net.0.weight" in end["error"]


def _all_callbacks():
    return [GradientMonitor(), ActivationMonitor(), GradientClipping("norm", max_norm=1.0),
            RunRecord(gradient_flow_image=False)]


def test_an_unreachable_logger_is_reported_once_and_training_goes_on(tmp_path):
    broken, good = Unreachable(), Capture()
    model = Net(nan_at=-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(tmp_path, _all_callbacks(), logger=[broken, good])
        t.fit(model, loader())
    assert t.global_step == 6
    assert len(ours(caught, "Unreachable.log_metrics failed")) == 1, [str(w.message) for w in caught]
    assert "Name or service not known" in ours(caught, "Unreachable")[0]
    keys = {k for _, m in good.metrics for k in m}  # the other logger got everything
    assert {"grad/norm_total", "clip/norm_pre", "lr/group0"} <= keys and any(k.startswith("act/") for k in keys)
    record = [json.loads(line) for line in open(_sink.record_path(t))]
    assert sum(e["type"] == "scalars" for e in record) >= 6 and any(e["type"] == "histograms" for e in record)


def test_wandb_failing_mid_run_is_reported_once(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="bpkit-faults")
    run = wandb_logger.experiment

    def unreachable(*args, **kwargs):
        raise OSError("wandb: network error (ConnectionError), entering retry loop")

    monkeypatch.setattr(run, "log", unreachable)
    good = Capture()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(tmp_path, [GradientMonitor(), ActivationMonitor()], logger=[good, wandb_logger])
        t.fit(Net(nan_at=-1), loader())
    run.finish()
    assert t.global_step == 6
    assert len(ours(caught, "failed and is skipped")) == 1, [str(w.message) for w in caught]
    assert "WandbLogger.log_metrics failed" in ours(caught, "failed")[0]
    assert {k for _, m in good.metrics for k in m} >= {"grad/norm_total"}


def test_a_full_disk_skips_the_record_with_one_warning(tmp_path, monkeypatch):
    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(_sink, "open", full, raising=False)  # the record's open() only, as a full disk would
    good = Capture()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(tmp_path, _all_callbacks(), logger=good)
        t.fit(Net(nan_at=-1), loader())
    assert t.global_step == 6
    found = ours(caught, "writing the bpkit record")
    assert len(found) == 1 and "No space left on device" in found[0]
    assert not (tmp_path / "bpkit_record.jsonl").exists()
    keys = {k for _, m in good.metrics for k in m}
    assert {"grad/norm_total", "clip/norm_pre", "lr/group0"} <= keys


def test_an_unwritable_record_directory_is_reported_once(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the run directory should be")
    good = Capture()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(str(blocker / "run"), _all_callbacks(), logger=good, enable_checkpointing=False)
        t.fit(Net(nan_at=-1), loader())
    assert t.global_step == 6
    assert len(ours(caught, "writing the bpkit record")) == 1
    assert {k for _, m in good.metrics for k in m} >= {"grad/norm_total", "clip/norm_pre"}
