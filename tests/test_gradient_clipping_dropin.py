"""GradientClipping dropped into ordinary Lightning runs (issue 16): calm steps left alone at the defaults, a
clip-most-steps warning and run-record summary, parameters unfrozen mid-run, Lightning's log cadence with
two optimizers and with log_every_n_steps=0, BatchNorm buffers on a skipped NaN step, alerts in checkpoints."""

from __future__ import annotations

import json
import os
import statistics
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from bpkit.callbacks import GradientClipping, GradientMonitor
from tests._helpers import MemoryLogger, spy_on_shared_norms


def _data(n_batches: int = 60, batch_size: int = 64, spike: int | None = None, nan_batch: int | None = None,
          seed: int = 0) -> DataLoader:
    """A smooth regression whose gradient norm (2 to 23 with Adam lr 1e-2) is well above 1 and drifts smoothly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch_size, 4, generator=g)
    y = 10.0 * (x[:, :1].sin() + 0.5 * x[:, 1:2].cos()) + 0.05 * torch.randn(len(x), 1, generator=g)
    if spike is not None:  # one batch of outlier targets: a gradient-norm spike
        y[spike * batch_size:(spike + 1) * batch_size] *= 50.0
    if nan_batch is not None:
        x[nan_batch * batch_size + 3, 1] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Calm(pl.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self.net(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Norms(pl.Callback):
    """The total gradient norm over every parameter with a gradient, at each optimizer step (host floats)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0)


def _trainer(callbacks, tmp_path, **kwargs) -> pl.Trainer:
    base = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                enable_checkpointing=False, max_epochs=2, log_every_n_steps=10, default_root_dir=str(tmp_path))
    base.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **base)


def _records(tmp_path, kind: str) -> list[dict]:
    with open(os.path.join(str(tmp_path), "bpkit_record.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def _clip_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "bpkit GradientClipping(" in str(w.message)]


def test_default_zclip_leaves_a_calm_run_alone(tmp_path):
    """No fixed cap at the defaults: the norms (2 to 23) are far above the official code's cap of 1.0, which clipped
    every step; now nothing is clipped and the weights are exactly those of a run without the callback."""
    bare = Calm()
    _trainer([], tmp_path / "bare").fit(bare, _data())
    model, norms = Calm(), Norms()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer([norms, GradientClipping("zclip")], tmp_path).fit(model, _data())
    assert min(norms.norms) > 1.0
    (summary,) = _records(tmp_path, "clip_summary")
    data = summary["data"]
    assert data["policy"] == "zclip" and data["steps"] == 120 and data["fraction"] < 0.05
    assert data["clipped"] == 0 and data["message"] is None and not _clip_warnings(caught)
    for p, q in zip(model.parameters(), bare.parameters()):
        assert torch.equal(p, q)


def test_default_zclip_still_clips_a_planted_spike(tmp_path):
    before, after = Norms(), Norms()
    _trainer([before, GradientClipping("zclip"), after], tmp_path, max_epochs=1).fit(Calm(), _data(spike=40))
    pre, post = before.norms, after.norms
    assert pre[40] > 10 * statistics.median(pre)  # the planted spike
    assert post[40] < 0.2 * pre[40]  # pulled back ...
    assert post[40] <= 2 * max(post[30:40])  # ... to about the recent norms
    changed = [i for i in range(60) if abs(post[i] - pre[i]) > 1e-6 * pre[i]]
    assert 40 in changed and len(changed) <= 3  # and little else: calm steps untouched


def test_cap_below_the_typical_norm_warns_and_is_summarised(tmp_path):
    norms, logger = Norms(), MemoryLogger()
    with pytest.warns(UserWarning) as caught:
        _trainer([norms, GradientClipping("norm", max_norm=1e-3)], tmp_path, logger=logger).fit(Calm(), _data())
    (message,) = _clip_warnings(caught)
    typical = statistics.median(norms.norms[i] for i in range(9, 120, 10))  # the log steps' pre-clip norms
    assert message == (f"bpkit GradientClipping(norm): clipped 100% of 120 steps: the bound (max_norm=0.001) is "
                       f"below the typical gradient norm ({typical:.4g}); this rescales every update, not only "
                       "spikes. Raise max_norm, use policy='zclip' without a cap, or remove the callback.")
    (summary,) = _records(tmp_path, "clip_summary")
    data = summary["data"]
    assert data["fraction"] > 0.9 and data["steps"] == 120 and data["clipped"] == 120 and data["optimizer"] == 0
    assert data["typical_norm"] == pytest.approx(typical, rel=1e-5) and data["bound"] == pytest.approx(1e-3)
    assert data["message"] == message
    assert logger.series("clip/clipped_total") == {s: 1.0 for s in range(9, 120, 10)}


class Backboned(pl.LightningModule):
    """A backbone and a head; the backbone starts frozen and outside the optimizer (as BackboneFinetuning wants),
    or inside it with requires_grad off (``in_optimizer``) and turned on at epoch 1."""

    def __init__(self, in_optimizer: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)
        self.in_optimizer = in_optimizer
        if in_optimizer:
            self.backbone.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self.head(self.backbone(batch[0])), batch[1])

    def on_train_epoch_start(self):
        if self.in_optimizer and self.current_epoch == 1:
            self.backbone.requires_grad_(True)

    def configure_optimizers(self):
        params = self.parameters() if self.in_optimizer else [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=1e-3)


@pytest.mark.parametrize("how", ["BackboneFinetuning", "BackboneFinetuning+GradientMonitor", "requires_grad"])
def test_parameters_unfrozen_mid_run_are_clipped(tmp_path, how, monkeypatch):
    max_norm = 0.5
    hits = spy_on_shared_norms(monkeypatch)
    after = Norms()
    backbone_grads = []

    class Watch(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            backbone_grads.append(any(p.grad is not None for p in pl_module.backbone.parameters()))

    callbacks = [GradientClipping("norm", max_norm=max_norm), after, Watch()]
    if how.startswith("BackboneFinetuning"):
        callbacks.insert(0, BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0))
    if how.endswith("GradientMonitor"):
        callbacks.insert(1, GradientMonitor(log_every_n_steps=1000))
    model = Backboned(in_optimizer=how == "requires_grad")
    _trainer(callbacks, tmp_path).fit(model, _data(n_batches=10))
    assert backbone_grads == [False] * 10 + [True] * 10  # unfrozen at epoch 1
    assert max(after.norms) <= max_norm * (1 + 1e-5), after.norms  # every parameter with a gradient clipped
    assert min(after.norms[10:]) > 0.9 * max_norm  # the norms were above the bound: clipping did act
    if how.endswith("GradientMonitor"):  # the monitor's norms are reused (the same parameters, in the same order)
        assert hits[:10] == [True] * 10


class TwoOptimizers(pl.LightningModule):
    """GAN-style manual optimization: two optimizers, each stepped once per batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.disc = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_g, opt_d = self.optimizers()
        fake = self.gen(x)
        loss_d = F.softplus(-self.disc(y)).mean() + F.softplus(self.disc(fake.detach())).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        loss_g = F.softplus(-self.disc(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.log("train/loss", loss_g + loss_d)

    def configure_optimizers(self):
        return torch.optim.Adam(self.gen.parameters(), lr=1e-3), torch.optim.Adam(self.disc.parameters(), lr=1e-3)


def test_two_optimizers_log_at_the_steps_of_train_loss(tmp_path):
    logger = MemoryLogger()
    trainer = pl.Trainer(callbacks=[GradientClipping("norm", max_norm=1.0)], logger=logger, max_steps=-1,
                         max_epochs=1, limit_train_batches=120, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    assert trainer.log_every_n_steps == 50
    trainer.fit(TwoOptimizers(), _data(n_batches=120, batch_size=8))
    loss_steps = set(logger.series("train/loss"))
    assert len(loss_steps) == 2
    for opt in (0, 1):
        for key in ("norm_pre", "norm_post", "threshold", "clipped", "clipped_total"):
            assert set(logger.series(f"clip/{key}/opt{opt}")) == loss_steps, (key, opt)
    assert sorted(r["data"]["optimizer"] for r in _records(tmp_path, "clip_summary")) == [0, 1]
    assert all(r["data"]["steps"] == 120 for r in _records(tmp_path, "clip_summary"))


def test_log_every_n_steps_zero(tmp_path):
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer([GradientClipping("norm", max_norm=1e-3)], tmp_path, logger=logger, log_every_n_steps=0,
                 max_epochs=1).fit(Calm(), _data(n_batches=30))
    assert not any(k.startswith("clip/") for k in logger.keys())
    assert len([w for w in caught if "log_every_n_steps=0" in str(w.message)]) == 1
    (summary,) = _records(tmp_path, "clip_summary")
    assert summary["data"]["steps"] == 30 and summary["data"]["clipped"] == 30
    assert summary["data"]["typical_norm"] is None  # no log step read a norm
    (message,) = _clip_warnings(caught)  # the end-of-run warning still comes
    assert "clipped 100% of 30 steps" in message and "typical gradient norm (unknown: no log step)" in message


class WithBatchNorm(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _buffers(model) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def _skip_nan_run(tmp_path, checkpoint: str | None = None) -> tuple[GradientClipping, WithBatchNorm, dict]:
    seen: dict[str, dict] = {}

    class Buffers(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 5:
                seen["before"] = _buffers(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 5:
                seen["after"] = _buffers(pl_module)

    cb, model = GradientClipping("skip"), WithBatchNorm()
    trainer = _trainer([cb, Buffers()], tmp_path, max_epochs=1)
    with pytest.warns(UserWarning, match="gradient norm is nan: this update was skipped"):
        trainer.fit(model, _data(n_batches=10, batch_size=16, nan_batch=5))
    if checkpoint:
        trainer.save_checkpoint(checkpoint)
    return cb, model, seen


def test_skipped_nan_step_restores_batchnorm_buffers(tmp_path):
    cb, model, seen = _skip_nan_run(tmp_path)
    assert [(a.kind, a.step) for a in cb.alerts] == [("nonfinite", 5)]
    assert seen["before"].keys() == seen["after"].keys() and "net.1.running_mean" in seen["after"]
    for name, value in seen["after"].items():
        assert torch.equal(value, seen["before"][name]), name  # running_mean, running_var, num_batches_tracked
    assert all(torch.isfinite(b).all() for b in model.buffers())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model.net(torch.randn(32, 4))).all()


def test_alerts_survive_a_checkpoint(tmp_path):
    ckpt = str(tmp_path / "skip.ckpt")
    first, _, _ = _skip_nan_run(tmp_path, checkpoint=ckpt)
    assert len(first.alerts) == 1
    resumed = GradientClipping("skip")
    _trainer([resumed], tmp_path, max_epochs=1).fit(WithBatchNorm(), _data(n_batches=10, batch_size=16),
                                                    ckpt_path=ckpt)
    # compared as JSON: the alert's value is NaN, which is not equal to itself
    assert [json.dumps(a.to_dict()) for a in resumed.alerts] == [json.dumps(a.to_dict()) for a in first.alerts]


def test_summary_written_when_training_crashes(tmp_path):
    class Crashes(Calm):
        def training_step(self, batch, batch_idx):
            if batch_idx == 25:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="boom"), pytest.warns(UserWarning, match=r"clipped 100% of 25 steps"):
        _trainer([GradientClipping("norm", max_norm=1e-3)], tmp_path).fit(Crashes(), _data(n_batches=30))
    (summary,) = _records(tmp_path, "clip_summary")  # once: on_exception writes it, teardown does not again
    assert summary["data"]["steps"] == 25 and summary["data"]["clipped"] == 25
