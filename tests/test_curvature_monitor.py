"""CurvatureMonitor in a real Lightning Trainer: training unchanged, sharpness and saddle alerts, metrics logged."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bpkit.callbacks import CurvatureMonitor
from bpkit.data import DigitsDataModule
from bpkit.errors import BpkitConfigError
from bpkit.models import MLP
from bpkit.models.deep_linear import DeepLinear
from bpkit.task import BackpropTask
from tests._helpers import MemoryLogger


def _trainer(callbacks, max_steps, **kw):
    return pl.Trainer(callbacks=callbacks, max_steps=max_steps, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
                      num_sanity_val_steps=0, limit_val_batches=0, **{"logger": False, **kw})


def _digits_run(monitor):
    pl.seed_everything(3, verbose=False)
    model = MLP(64, 10, depth=3, width=32, norm="batch", dropout=0.3)
    task = BackpropTask(model, "cross_entropy", functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                        num_classes=10)
    trainer = _trainer([monitor] if monitor else [], max_steps=9)
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=64, seed=3))
    return task, trainer


@pytest.mark.parametrize("eval_mode", [True, False])
def test_training_is_unchanged_by_the_monitor(eval_mode):
    """Dropout, BatchNorm, momentum, torchmetrics: identical weights, buffers, RNG and train metrics (in train mode
    the probe draws dropout masks and moves BatchNorm's statistics, which must all be put back)."""
    monitor = CurvatureMonitor(every_n_steps=3, max_iter=5, trace_samples=2, eval_mode=eval_mode)
    with_task, with_trainer = _digits_run(monitor)
    rng_with = torch.get_rng_state()
    bare_task, bare_trainer = _digits_run(None)
    assert [h["step"] for h in monitor.history] == [0.0, 3.0, 6.0]
    a, b = with_task.state_dict(), bare_task.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(rng_with, torch.get_rng_state())
    assert {k: float(v) for k, v in with_trainer.callback_metrics.items()} == \
        {k: float(v) for k, v in bare_trainer.callback_metrics.items()}
    assert with_task.training and with_task.model.blocks[0].norm.training


class _LinReg(pl.LightningModule):
    """Full-batch gradient descent on linear regression: H = 2/n [X 1]^T [X 1], exactly."""

    def __init__(self, x, y, lr):
        super().__init__()
        self.x, self.y, self.lr, self.losses = x, y, lr, []
        self.lin = torch.nn.Linear(x.shape[1], 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.lin(x).squeeze(1), y)
        self.losses.append(float(loss.detach()))
        self.log("train/loss", loss)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=len(self.y))


def _linreg_run(lr_times, steps=40):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 6, generator=g) * torch.linspace(0.5, 2, 6), torch.randn(128, generator=g)
    a = torch.cat([x, torch.ones(128, 1)], 1).double()
    lam = torch.linalg.eigvalsh(2 / 128 * a.T @ a)[-1].item()
    torch.manual_seed(0)
    module = _LinReg(x, y, lr_times / lam)
    monitor = CurvatureMonitor(every_n_steps=5)
    _trainer([monitor], max_steps=steps).fit(module)
    return module, monitor, lam


def test_sharpness_alert_before_the_loss_blows_up():
    module, monitor, lam = _linreg_run(2.5)
    blown = next(i for i, loss in enumerate(module.losses) if not math.isfinite(loss) or loss > 100 * module.losses[0])
    kinds = [a for a in monitor.alerts if a.kind == "sharpness"]
    assert kinds and kinds[0].step < blown
    assert kinds[0].value == pytest.approx(2.5, rel=0.01)
    assert f"{2 / lam:.3g}" in kinds[0].message
    assert monitor.history[0]["curvature/lambda_max"] == pytest.approx(lam, rel=0.01)


def test_stable_learning_rate_stays_quiet():
    module, monitor, lam = _linreg_run(1.0)
    assert monitor.alerts == []
    assert module.losses[-1] < module.losses[0]
    assert monitor.history[-1]["curvature/sharpness_x_lr"] == pytest.approx(1.0, rel=0.01)


def test_saddle_of_a_deep_linear_network_is_flagged_and_logged():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 1.0
    task = BackpropTask(DeepLinear(8, 1, depth=3, width=8, init_scale=0.05), "mse",
                        functools.partial(torch.optim.SGD, lr=0.01), metrics=())
    monitor = CurvatureMonitor(every_n_steps=4, max_iter=10, trace_samples=4)
    logger = MemoryLogger()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    _trainer([monitor], max_steps=8, logger=logger).fit(task, train_dataloaders=loader)
    saddles = [a for a in monitor.alerts if a.kind == "saddle"]
    assert saddles and saddles[0].step == 0 and "momentum" in saddles[0].message
    assert monitor.history[0]["curvature/lambda_min"] < -0.1 * monitor.history[0]["curvature/lambda_max"]
    assert {"curvature/lambda_max", "curvature/lambda_min", "curvature/trace", "curvature/sharpness_x_lr",
            "curvature/alert/saddle"} <= set(logger.metrics[0])
    assert 4 in logger.metrics and "curvature/lambda_max" in logger.metrics[4]


class _Manual(_LinReg):
    def __init__(self, *args):
        super().__init__(*args)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)["loss"]
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_is_skipped_with_a_clear_warning_unless_loss_fn():
    x, y = torch.randn(32, 3), torch.randn(32)
    monitor = CurvatureMonitor(every_n_steps=1)
    with pytest.warns(UserWarning, match="manual optimization.*loss_fn"):
        _trainer([monitor], max_steps=2).fit(_Manual(x, y, 0.1))
    assert monitor.history == []
    given = CurvatureMonitor(every_n_steps=1, loss_fn=lambda m, b: torch.nn.functional.mse_loss(
        m.lin(b[0]).squeeze(1), b[1]))
    _trainer([given], max_steps=2).fit(_Manual(x, y, 0.1))
    assert len(given.history) == 2


def test_bad_arguments_and_state_dict():
    with pytest.raises(BpkitConfigError, match="every_n_steps"):
        CurvatureMonitor(every_n_steps=-5)
    with pytest.raises(BpkitConfigError, match="loss_fn"):
        CurvatureMonitor(loss_fn=3)
    module, monitor, _ = _linreg_run(2.5, steps=6)
    fresh = CurvatureMonitor(every_n_steps=5)
    fresh.load_state_dict(monitor.state_dict())
    assert fresh.alerts == monitor.alerts and fresh.history == monitor.history


class _ReturnsNone(_LinReg):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        return out if self.training else None  # the probe runs in eval mode: no loss there


def test_a_training_step_without_a_loss_is_skipped_with_a_clear_warning():
    x, y = torch.randn(32, 3), torch.randn(32)
    monitor = CurvatureMonitor(every_n_steps=1)
    with pytest.warns(UserWarning, match=r"not probing the curvature: training_step='NoneType' is invalid.*loss_fn"):
        _trainer([monitor], max_steps=3).fit(_ReturnsNone(x, y, 0.1))
    assert monitor.history == []


@pytest.mark.slow
def test_cost_benchmark_smoke():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "curvature_cost.py"), "--smoke"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| saddle DeepLinear 4x16, batch 64, SGD |" in proc.stdout


def test_a_given_probe_batch_is_the_one_probed():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(128, 4, generator=g), torch.randn(128, generator=g)
    part = (x[:40] * 3, y[:40])  # not a training batch
    a = torch.cat([part[0], torch.ones(40, 1)], 1).double()
    monitor = CurvatureMonitor(every_n_steps=2, probe_batch=part)
    _trainer([monitor], max_steps=3).fit(_LinReg(x, y, 0.01))
    exact = torch.linalg.eigvalsh(2 / 40 * a.T @ a)[-1].item()
    assert [h["step"] for h in monitor.history] == [0.0, 2.0]
    assert monitor.history[0]["curvature/lambda_max"] == pytest.approx(exact, rel=0.01)
