"""GradientMonitor and ActivationMonitor on modules written the way Lightning's examples write them (issue 16):
manual optimization with two optimizers at the default log interval, BackboneFinetuning, BatchNorm with a NaN
batch, inputs that are all zeros, log_every_n_steps=0 and a crash before the first log step."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BackboneFinetuning, Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bpkit.callbacks import ActivationMonitor, GradientMonitor
from tests._helpers import MemoryLogger, TwoOptimizerGAN


def _data(n=64, d=8, classes=3, batch=8, seed=1, nan_batch=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    if nan_batch is not None:
        x[nan_batch * batch] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _trainer(callbacks, logger=None, **kw):
    kw.setdefault("max_steps", 6)
    kw.setdefault("log_every_n_steps", 1)
    return Trainer(accelerator="cpu", callbacks=callbacks, logger=logger if logger is not None else False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kw)


def _record(path):
    return [json.loads(line) for line in open(path / "bpkit_record.jsonl")]


class Classifier(LightningModule):
    """A plain classifier that logs ``train/loss`` the way Lightning's examples do."""

    def __init__(self, d=8, width=16, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return _data()


def test_statistics_land_at_the_step_of_the_batchs_train_loss():
    logger = MemoryLogger()
    _trainer([GradientMonitor(), ActivationMonitor()], logger=logger, max_steps=9,
             log_every_n_steps=3).fit(Classifier())
    loss_steps = sorted(logger.series("train/loss"))
    assert loss_steps == [2, 5, 8]
    assert sorted(logger.series("grad/norm_total")) == loss_steps
    assert sorted(logger.series("act/mean/net.1")) == loss_steps


def test_manual_optimization_with_two_optimizers_logs_both_at_lightnings_default_interval():
    logger = MemoryLogger()
    trainer = Trainer(accelerator="cpu", callbacks=[GradientMonitor(), ActivationMonitor()], logger=logger,
                      max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)  # Lightning's default log_every_n_steps=50
    trainer.fit(TwoOptimizerGAN(n=200, batch=2))
    assert trainer.global_step == 200  # two optimizer steps per batch
    assert sorted(logger.series("d_loss")) == [49, 99]
    for key in ("grad/opt0/norm_total", "grad/opt1/norm_total", "act/mean/generator.1",
                "act/mean/discriminator.1", "grad/norm/opt0/generator.0.weight",
                "grad/norm/opt1/discriminator.0.weight"):
        assert sorted(logger.series(key)) == [49, 99], key


def test_log_every_n_steps_zero_logs_no_statistics_but_still_finds_the_nan(tmp_path):
    class NaNAt3(Classifier):
        def on_after_backward(self):
            if self.global_step == 3:
                self.net[0].weight.grad[0, 0] = float("nan")

    logger = MemoryLogger()
    monitors = [GradientMonitor(), ActivationMonitor()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(monitors, logger=logger, log_every_n_steps=0, default_root_dir=tmp_path).fit(NaNAt3())
    said = [str(w.message) for w in caught if "log_every_n_steps=0" in str(w.message)]
    assert len(said) == 1, said  # one warning for all callbacks of the Trainer
    assert not any(k.startswith(("grad/norm", "act/")) for k in logger.keys())
    assert [(a.kind, a.step, a.where) for a in monitors[0].alerts] == [("nonfinite", 3, "net.0.weight")]
    alerts = [r["data"] for r in _record(tmp_path) if r["type"] == "alert"]
    assert [a["kind"] for a in alerts] == ["nonfinite"]


class Finetune(LightningModule):
    """A frozen backbone and a head, for Lightning's BackboneFinetuning (it freezes ``self.backbone``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1)

    def train_dataloader(self):
        return _data(n=32)


class NormsAfter(Callback):
    """The gradient norm of every parameter that has one, recomputed independently each step."""

    def __init__(self):
        self.norms = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms[trainer.global_step] = {n: p.grad.double().norm().item() for n, p in pl_module.named_parameters()
                                           if p.grad is not None}


def test_layers_unfrozen_by_backbone_finetuning_are_watched_from_their_first_gradient():
    logger, ref = MemoryLogger(), NormsAfter()
    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0)
    mon = GradientMonitor()
    _trainer([finetune, mon, ref], logger=logger, max_steps=8, max_epochs=2).fit(Finetune())
    # epoch 0 (steps 0-3): the backbone is frozen and stays out of the per-layer scalars
    for step in range(4):
        assert "grad/norm/backbone.0.weight" not in logger.metrics[step]
        assert logger.metrics[step]["grad/norm/head.weight"] == pytest.approx(ref.norms[step]["head.weight"], rel=1e-5)
    # epoch 1: unfrozen and added to the optimizer: watched from its first step, with the exact norms
    for step in range(4, 8):
        for name in ("backbone.0.weight", "backbone.2.weight", "head.weight"):
            assert logger.metrics[step][f"grad/norm/{name}"] == pytest.approx(ref.norms[step][name], rel=1e-5)
        total = sum(v ** 2 for v in ref.norms[step].values()) ** 0.5
        assert logger.metrics[step]["grad/norm_total"] == pytest.approx(total, rel=1e-5)
    assert not [a for a in mon.alerts if a.kind == "vanishing"]


class WithCovariates(LightningModule):
    """A forecasting-style model whose covariate encoder gets an all-zero input (the data has no covariates)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.covariates = nn.Sequential(nn.Linear(3, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        cov = torch.zeros(x.shape[0], 3)  # no covariates in this data
        return nn.functional.cross_entropy(self.head(self.encoder(x) + self.covariates(cov)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return _data(n=128)


def test_an_all_zero_input_is_reported_once_as_unused_not_as_vanishing_or_dead():
    grad_mon = GradientMonitor(vanishing={"patience": 1}, check_every_n_steps=1)
    act_mon = ActivationMonitor(patience=1)
    _trainer([grad_mon, act_mon], max_steps=16, log_every_n_steps=4).fit(WithCovariates())
    unused = [a for a in grad_mon.alerts if a.kind == "unused"]
    assert [a.where for a in unused] == ["covariates.0.weight"]  # its bias does get a gradient
    assert "all zeros" in unused[0].message and "not a vanishing gradient" in unused[0].message
    assert not [a for a in grad_mon.alerts if a.kind == "vanishing"]
    act_unused = [a for a in act_mon.alerts if a.kind == "unused"]
    assert len(act_unused) == 1 and act_unused[0].where == "covariates.0, covariates.1"
    assert not [a for a in act_mon.alerts if a.kind == "dead" and "covariates" in a.where]


class BNNet(LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return _data(n=64, nan_batch=3)


class Buffers(Callback):
    def __init__(self):
        self.before, self.after = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[batch_idx] = {n: b.clone() for n, b in pl_module.named_buffers()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[batch_idx] = {n: b.clone() for n, b in pl_module.named_buffers()}


def test_a_skipped_nan_batch_leaves_batchnorm_running_stats_as_before_it():
    seen, mon = Buffers(), GradientMonitor(on_nonfinite="skip")
    model = BNNet()
    _trainer([mon, seen], max_steps=8).fit(model)
    assert mon.skipped_steps == 1
    for name, before in seen.before[3].items():
        assert torch.equal(seen.after[3][name], before), name
    for name, buf in model.named_buffers():
        assert torch.isfinite(buf.float()).all(), name
    assert torch.isfinite(model.eval()(torch.randn(4, 8))).all()


def test_stop_on_a_nan_batch_keeps_a_checkpoint_that_evaluates_finitely(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = Trainer(accelerator="cpu", callbacks=[GradientMonitor(on_nonfinite="stop"), ckpt], logger=False,
                      max_steps=8, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(BNNet())
    assert trainer.global_step < 8
    restored = BNNet.load_from_checkpoint(tmp_path / "last.ckpt")
    for name, buf in restored.named_buffers():
        assert torch.isfinite(buf.float()).all(), name
    assert torch.isfinite(restored.eval()(torch.randn(4, 8))).all()


def test_a_crash_before_the_first_log_step_keeps_the_last_steps_and_alerts(tmp_path):
    class Crash(Classifier):
        def __init__(self):
            super().__init__()
            self.losses = []

        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("Loss is NaN")
            loss = super().training_step(batch, batch_idx)
            self.losses.append(loss.item())
            return loss

        def on_after_backward(self):
            if self.global_step == 1:
                self.net[2].weight.grad[0, 0] = float("inf")

    model, mon = Crash(), GradientMonitor()
    with pytest.raises(RuntimeError, match="Loss is NaN"):
        _trainer([mon], log_every_n_steps=50, default_root_dir=tmp_path).fit(model)
    entries = _record(tmp_path)
    last = [e["data"] for e in entries if e["type"] == "last_steps"]
    assert len(last) == 1 and last[0]["steps"] == [0, 1, 2]
    # the non-finite step 1 was replayed once to find where the NaN starts: training_step ran twice on batch 1
    assert len(model.losses) == 4 and model.losses[2] == model.losses[1]
    assert last[0]["loss"] == pytest.approx([model.losses[i] for i in (0, 1, 3)], rel=1e-6)
    assert last[0]["nonfinite"] == [False, True, False]
    assert "RuntimeError: Loss is NaN" in last[0]["exception"]
    assert [(e["data"]["kind"], e["step"]) for e in entries if e["type"] == "alert"] == [("nonfinite", 1)]


def test_a_record_cut_mid_line_does_not_swallow_the_next_runs_first_entry(tmp_path):
    (tmp_path / "bpkit_record.jsonl").write_text('{"type": "run", "step": 0, "data": {"event": "start"}}\n{"type": "sca')
    _trainer([GradientMonitor()], max_steps=2, default_root_dir=tmp_path).fit(Classifier())
    lines = (tmp_path / "bpkit_record.jsonl").read_text().splitlines()
    assert lines[1] == '{"type": "sca'  # the cut line stays as it was, alone on its line
    assert all(json.loads(line) for line in lines[2:])
    assert any(json.loads(line)["type"] == "scalars" for line in lines[2:])


def test_a_constant_but_nonzero_input_is_not_called_unused():
    class Saturated(WithCovariates):
        """The covariate branch gets the same non-zero input for every sample (like a saturated RNN state)."""

        def training_step(self, batch, batch_idx):
            x, y = batch
            cov = torch.ones(x.shape[0], 3)
            return nn.functional.cross_entropy(self.head(self.encoder(x) + self.covariates(cov)), y)

    grad_mon, act_mon = GradientMonitor(), ActivationMonitor(patience=1)
    _trainer([grad_mon, act_mon], max_steps=16, log_every_n_steps=4).fit(Saturated())
    assert not [a for a in grad_mon.alerts + act_mon.alerts if a.kind == "unused"]


def test_callbacks_deep_copied_by_a_library_still_leave_their_alerts_in_the_record(tmp_path):
    import copy

    from bpkit.callbacks import GradientCheck, GradientClipping, RunRecord
    from bpkit.report import read_run

    class NaNAt2(Classifier):
        def on_after_backward(self):
            if self.global_step == 2:
                self.net[0].weight.grad[0, 0] = float("nan")

    mine = [GradientMonitor(), ActivationMonitor(), GradientClipping("zclip"), GradientCheck(), RunRecord()]
    assert all(c.alerts == [] for c in mine)  # every callback has .alerts
    given = copy.deepcopy(mine)  # what neuralforecast does with the callbacks it is handed
    trainer = _trainer(given, max_steps=4, default_root_dir=tmp_path)
    trainer.fit(NaNAt2())
    assert all(c.alerts == [] for c in mine)  # the user's objects never saw the run...
    copy_of_monitor = next(c for c in trainer.callbacks if isinstance(c, GradientMonitor))
    assert [a.kind for a in copy_of_monitor.alerts] == ["nonfinite"]  # ...the copies did
    assert [(a["kind"], a["step"]) for a in read_run(tmp_path).alerts] == [("nonfinite", 2)]  # and the record
