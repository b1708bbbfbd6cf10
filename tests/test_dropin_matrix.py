"""All five callbacks, exactly as the README adds them, on the Lightning features users already have (issue 16).

Each scenario is a module written the way Lightning's examples write it. The README's table "Lightning
features tried with all five callbacks" is this file: every row is a test here.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bpkit.callbacks import ActivationMonitor, GradientCheck, GradientClipping, GradientMonitor, RunRecord
from bpkit.report.cli import main as report_main
from tests._helpers import MemoryLogger, TwoOptimizerGAN
from tests.test_tbptt import LitModel


def _data(n=48, d=8, classes=3, batch=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)),
                      batch_size=batch)


def five():
    """The README's snippet."""
    return [GradientMonitor(), ActivationMonitor(), GradientClipping("zclip"), GradientCheck(), RunRecord()]


def monitors_only():
    return [GradientMonitor(), ActivationMonitor(), GradientCheck(), RunRecord()]


class Plain(LightningModule):
    """Casts its input, has BatchNorm and dropout, and logs ``train_loss`` (not ``train/loss``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x.float()), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return _data()


class Manual(Plain):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss)


class Finetune(LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.head(self.backbone(x)), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-2)

    def train_dataloader(self):
        return _data(n=24)


class Sequence(LitModel):
    """Lightning 1.x's TBPTT docs example with only the base class changed (tests/test_tbptt.py), with its data."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__()

    def train_dataloader(self):
        x = torch.randn(16, 6, 1, generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(x, x.cumsum(1)), batch_size=4)


class Compiled(Plain):
    def __init__(self):
        super().__init__()
        self.net[4] = torch.compile(self.net[4], backend="eager")


SCENARIOS = {
    "plain (casts, BatchNorm, dropout)": (Plain, {}, "train_loss"),
    "manual optimization": (Manual, {}, "train_loss"),
    "two optimizers (GAN)": (TwoOptimizerGAN, {}, "d_loss"),
    "BackboneFinetuning": (Finetune, {"extra": lambda: [BackboneFinetuning(1, lambda epoch: 1.0)], "max_epochs": 3},
                           "train_loss"),
    "gradient accumulation": (Plain, {"accumulate_grad_batches": 2}, "train_loss"),
    "bf16-mixed": (Plain, {"precision": "bf16-mixed"}, "train_loss"),
    "torch.compile (a submodule)": (Compiled, {}, "train_loss"),
    "TBPTT": (Sequence, {}, "train_loss"),
}


def _fit(module_cls, callbacks, tmp_path, extra=None, **kw):
    kw.setdefault("max_steps", 8)
    logger = MemoryLogger()
    trainer = Trainer(accelerator="cpu", callbacks=[*(extra() if extra else []), *callbacks], logger=logger,
                      log_every_n_steps=2, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=tmp_path, **kw)
    model = module_cls()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    return trainer, model, logger, [str(w.message) for w in caught if "bpkit" in str(w.message)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_five_callbacks_run_log_with_the_loss_and_write_a_report(name, tmp_path):
    module_cls, kw, loss_key = SCENARIOS[name]
    kw = dict(kw)
    trainer, model, logger, messages = _fit(module_cls, five(), tmp_path, **kw)
    assert trainer.state.finished, name
    loss_steps = set(logger.series(loss_key))
    grad_steps = {s for s, m in logger.metrics.items() if any(k.startswith("grad/") and "norm_total" in k for k in m)}
    assert grad_steps and grad_steps <= loss_steps, (grad_steps, loss_steps)
    for param in model.parameters():
        assert torch.isfinite(param).all()
    record = [json.loads(line) for line in open(tmp_path / "bpkit_record.jsonl")]
    checks = [e["data"] for e in record if e["type"] == "gradcheck"]
    assert checks, "GradientCheck says what it did (checked, or skipped and why)"
    for check in checks:  # casts, bf16 autocast and compiled parts included: checked in float64, or skipped
        assert "skipped" in check or (check["dtype"] == "float64" and check["passed"]), check
    assert not [e for e in record if e["type"] == "alert" and e["data"]["kind"] == "gradcheck"], \
        "no false gradient-check failure on a correct module"
    assert report_main([str(tmp_path)]) == 0
    assert (tmp_path / "bpkit_report.html").exists()


@pytest.mark.parametrize("name", ["plain (casts, BatchNorm, dropout)", "two optimizers (GAN)", "TBPTT"])
def test_monitors_leave_training_bit_identical(name, tmp_path):
    module_cls, kw, _ = SCENARIOS[name]
    torch.manual_seed(123)
    _, bare, _, _ = _fit(module_cls, [], tmp_path / "bare", **kw)
    after_bare = torch.rand(3)
    torch.manual_seed(123)
    _, watched, _, _ = _fit(module_cls, monitors_only(), tmp_path / "watched", **kw)
    after_watched = torch.rand(3)
    for (n, a), (_, b) in zip(bare.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(after_bare, after_watched)  # the RNG stream is where it would have been
