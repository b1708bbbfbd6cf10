"""RunRecord with the real Trainer: the loss a module only returns, the names users log (``train_loss``, a GAN's
``d_loss``/``g_loss``), Lightning's cadence (``log_every_n_steps=0`` included), a crash before the first log step,
a non-finite returned loss as an alert, and the step a resumed run starts at (a record cut mid-line included)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from bpkit import Alert
from bpkit.callbacks import RunRecord
from bpkit.callbacks.run_record import LOSS_KEY
from bpkit.report import NO_PROBLEMS, NO_STATISTICS, diagnose, read_run, train_loss_keys, write_report
from bpkit.report.cli import main as report_main


def loader(n=64, batch=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch)


class Returns(pl.LightningModule):
    """Logs nothing: only returns its loss (and keeps every loss it computed, by batch index)."""

    def __init__(self, raise_at=-1, nan_at=-1, log_as=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.raise_at, self.nan_at, self.log_as = raise_at, nan_at, log_as
        self.losses = []  # (batch step, loss) of every training_step call

    def training_step(self, batch, batch_idx):
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        if step == self.raise_at:
            raise RuntimeError("Loss is NaN")
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if step == self.nan_at:
            loss = loss * float("nan")
        self.losses.append((step, float(loss)))
        if self.log_as:
            self.log(self.log_as, loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Gan(pl.LightningModule):
    """Manual optimization with two optimizers; logs d_loss and g_loss; returns nothing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.g, self.d = nn.Linear(4, 4), nn.Linear(4, 1)
        self.logged = {}

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        fake = self.g(torch.randn_like(x))
        d_loss = nn.functional.softplus(-self.d(x)).mean() + nn.functional.softplus(self.d(fake.detach())).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = nn.functional.softplus(-self.d(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log_dict({"d_loss": d_loss, "g_loss": g_loss})
        self.logged[self.trainer.fit_loop.epoch_loop._batches_that_stepped] = (float(d_loss), float(g_loss))

    def configure_optimizers(self):
        return [torch.optim.SGD(self.g.parameters(), lr=0.01), torch.optim.SGD(self.d.parameters(), lr=0.01)]


def fit(root, module, callbacks, steps=8, every=2, ckpt_path=None, quiet=True, **kw):
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                         log_every_n_steps=every, enable_checkpointing=any(isinstance(c, ModelCheckpoint)
                                                                           for c in callbacks), **kw)
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


def entries(root, kind):
    return [e for e in map(json.loads, open(Path(root) / "bpkit_record.jsonl")) if e["type"] == kind]


def test_a_module_that_only_returns_its_loss_gets_a_loss_curve(tmp_path):
    module = Returns()
    fit(tmp_path, module, [RunRecord(gradient_flow_image=False)], steps=8, every=2)
    run = read_run(tmp_path)
    steps, values = run.series(LOSS_KEY)
    # Lightning's cadence: the batches of steps 1, 3, 5, 7 log, at their own step; the value is what that
    # batch's training_step computed
    want = dict(module.losses)
    assert steps.tolist() == [1, 3, 5, 7] and np.allclose(values, [want[s] for s in (1, 3, 5, 7)])
    assert train_loss_keys(run) == [LOSS_KEY]
    html = write_report(tmp_path).read_text()
    assert 'id="fig-loss"' in html


def test_returned_loss_under_gradient_accumulation_is_the_window_mean(tmp_path):
    module = Returns()
    fit(tmp_path, module, [RunRecord(gradient_flow_image=False)], steps=4, every=2, accumulate_grad_batches=2)
    steps, values = read_run(tmp_path).series(LOSS_KEY)
    by_step = {}
    for s, v in module.losses:
        by_step.setdefault(s, []).append(v)
    assert all(len(v) == 2 for v in by_step.values())  # two micro-batches per step
    assert steps.tolist() == [1, 3] and np.allclose(values, [np.mean(by_step[1]), np.mean(by_step[3])])


def test_logged_train_loss_and_gan_losses_make_the_curve(tmp_path):
    module = Returns(log_as="train_loss")
    fit(tmp_path / "plain", module, [RunRecord(gradient_flow_image=False)], steps=6, every=3)
    run = read_run(tmp_path / "plain")
    assert train_loss_keys(run) == ["train_loss"]  # the user's name is preferred to the returned loss
    assert run.series("train_loss")[0].tolist() == [2, 5]
    assert np.allclose(run.series("train_loss")[1], [dict(module.losses)[s] for s in (2, 5)])

    gan = Gan()
    fit(tmp_path / "gan", gan, [RunRecord(gradient_flow_image=False)], steps=8, every=2)
    run = read_run(tmp_path / "gan")
    assert sorted(train_loss_keys(run)) == ["d_loss", "g_loss"]
    assert LOSS_KEY not in run.scalars  # the module returned nothing
    steps, d = run.series("d_loss")
    # two optimizer steps per batch: max_steps=8 is 4 batches; one log step per second batch
    assert steps.tolist() == [1, 3] and np.allclose(d, [gan.logged[s][0] for s in (1, 3)])
    assert np.allclose(run.series("g_loss")[1], [gan.logged[s][1] for s in (1, 3)])
    html = write_report(tmp_path / "gan").read_text()
    assert 'id="fig-loss"' in html


def test_log_every_n_steps_zero_logs_nothing_and_the_report_says_it_saw_nothing(tmp_path, capsys):
    with pytest.warns(UserWarning, match="log_every_n_steps=0"):
        trainer = pl.Trainer(accelerator="cpu", max_steps=6, callbacks=[RunRecord(gradient_flow_image=False)],
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(tmp_path), log_every_n_steps=0, enable_checkpointing=False)
        trainer.fit(Returns(), loader())
    assert entries(tmp_path, "scalars") == []
    start = entries(tmp_path, "run")[0]["data"]
    assert start["log_every_n_steps"] == 0
    run = read_run(tmp_path)
    assert diagnose(run) == []
    html = write_report(tmp_path).read_text()
    assert "bpkit saw no gradient or activation statistics (log_every_n_steps=0" in html
    assert "no problems can be ruled out" in html and NO_PROBLEMS not in html
    assert report_main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith(NO_STATISTICS)


def test_a_crash_before_the_first_log_step_records_the_last_steps(tmp_path):
    module = Returns(raise_at=2)
    with pytest.raises(RuntimeError, match="Loss is NaN"):
        fit(tmp_path, module, [RunRecord(gradient_flow_image=False)], steps=20, every=50)
    (last,) = entries(tmp_path, "last_steps")
    assert last["data"]["steps"] == [0, 1] and np.allclose(last["data"]["loss"], [v for _, v in module.losses])
    assert last["data"]["exception"] == "RuntimeError: Loss is NaN" and last["data"]["lr"] == {"lr/group0": 0.05}
    kinds = [(e["type"], e["data"].get("event")) for e in map(json.loads, open(tmp_path / "bpkit_record.jsonl"))]
    assert kinds == [("run", "start"), ("last_steps", None), ("run", "end")]  # buffered values before the end
    run = read_run(tmp_path)
    crashed = {f.kind: f for f in diagnose(run)}["crashed"]
    assert "the run stopped with RuntimeError: Loss is NaN at step 2" in crashed.summary
    assert f"step 1: loss {module.losses[1][1]:.3g}" in crashed.summary
    html = write_report(tmp_path).read_text()
    assert "The last steps before the crash" in html and 'id="fig-loss"' in html


def test_a_nonfinite_returned_loss_is_an_alert_kept_recorded_and_checkpointed(tmp_path):
    record = RunRecord(log_every_n_steps=5, gradient_flow_image=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, Returns(nan_at=2), [record], steps=8, quiet=False)
    # NaN from step 2 on (the weights are NaN after it): one alert, at the first step, where="loss"
    assert [(a.kind, a.step, a.where) for a in record.alerts] == [("nonfinite", 2, "loss")]
    assert any("[bpkit nonfinite @ step 2]" in str(w.message) for w in caught)
    (alert,) = entries(tmp_path, "alert")
    assert alert["data"]["where"] == "loss" and alert["step"] == 2
    fresh = RunRecord()
    fresh.load_state_dict(torch.load(_saved(tmp_path, record.state_dict()), weights_only=False))
    assert all(isinstance(a, Alert) for a in fresh.alerts)
    assert [str(a.to_dict()) for a in fresh.alerts] == [str(a.to_dict()) for a in record.alerts]  # NaN != NaN
    assert "nonfinite" in {f.kind for f in diagnose(read_run(tmp_path))}


def _saved(root, state):
    torch.save(state, root / "state.pt")
    return root / "state.pt"


def test_a_resumed_run_records_the_restored_step_even_after_a_record_cut_mid_line(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    fit(tmp_path, Returns(), [RunRecord(gradient_flow_image=False), ckpt], steps=5, every=2)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"]
    with open(tmp_path / "bpkit_record.jsonl", "a") as f:  # the previous process was killed mid-write
        f.write('{"type": "scalars", "step": 6, "data": {"loss/train_ret')
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    fit(tmp_path, Returns(), [RunRecord(gradient_flow_image=False), ckpt], steps=8, every=2,
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    run = read_run(tmp_path)
    assert saved == 5 and run.meta["resumed_at_step"] == saved  # the second start entry survived the cut
    assert run.bad_lines == 1 and run.status == "finished"
    assert run.series(LOSS_KEY)[0].tolist() == [1, 3, 5, 7]  # before the kill and after the resume


class TwoGroups(Returns):
    """Two parameter groups: a named one (SGD with momentum, or Adam) and an unnamed one, on a per-step schedule."""

    def __init__(self, adam=False):
        super().__init__()
        self.adam = adam

    def configure_optimizers(self):
        groups = [{"params": self.net[0].parameters(), "lr": 0.1, "name": "backbone"},
                  {"params": self.net[2].parameters(), "lr": 0.01}]
        if self.adam:
            opt = torch.optim.Adam(groups, betas=(0.8, 0.99))
        else:
            opt = torch.optim.SGD(groups, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("adam", [False, True])
def test_one_lr_series_per_param_group_with_its_name_and_momentum_apart(tmp_path, adam):
    seen = {}  # the optimizer's own values at each log step, read by an independent callback

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            groups = trainer.optimizers[0].param_groups
            seen[trainer.fit_loop.epoch_loop._batches_that_stepped] = [g["lr"] for g in groups]

    fit(tmp_path, TwoGroups(adam), [Spy(), RunRecord(gradient_flow_image=False)], steps=6, every=2)
    lr_entries = [e for e in entries(tmp_path, "scalars") if any(k.startswith("lr/") for k in e["data"])]
    assert [e["step"] for e in lr_entries] == [1, 3, 5]
    momentum = 0.8 if adam else 0.9
    for e in lr_entries:
        assert set(e["data"]) == {"lr/backbone", "lr/group1", "momentum/backbone", "momentum/group1"}
        assert [e["data"]["lr/backbone"], e["data"]["lr/group1"]] == pytest.approx(seen[e["step"]])
        assert e["data"]["lr/backbone"] == pytest.approx(10 * e["data"]["lr/group1"])
        assert e["data"]["momentum/backbone"] == e["data"]["momentum/group1"] == momentum
    assert lr_entries[0]["data"]["lr/backbone"] > lr_entries[-1]["data"]["lr/backbone"]  # the schedule moved it


def test_plain_sgd_logs_no_momentum_series(tmp_path):
    fit(tmp_path, Returns(), [RunRecord(gradient_flow_image=False)], steps=4, every=2)
    keys = {k for e in entries(tmp_path, "scalars") for k in e["data"]}
    assert {k for k in keys if k.startswith(("lr/", "momentum/"))} == {"lr/group0"}
