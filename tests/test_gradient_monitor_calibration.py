"""The detectors' default thresholds on real runs: flag what is broken, stay silent on what is not."""

import warnings

import lightning.pytorch as pl
import pytest

from bpkit.callbacks import GradientMonitor
from bpkit.data import AddingDataModule, DigitsDataModule
from bpkit.models import MLP, RNN
from bpkit.task import BackpropTask

warnings.filterwarnings("ignore", ".*bpkit.*")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _fit(model, datamodule, steps, loss="cross_entropy", **task_kw):
    pl.seed_everything(0, workers=True)
    monitor = GradientMonitor()  # every default, the Trainer's log_every_n_steps=50
    trainer = pl.Trainer(max_steps=steps, callbacks=[monitor], logger=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(BackpropTask(model, loss, **task_kw), datamodule)
    return monitor


def test_deep_sigmoid_mlp_is_flagged_within_50_steps():
    model = MLP(64, 10, depth=20, width=128, activation="sigmoid")
    monitor = _fit(model, DigitsDataModule(batch_size=64), 50, num_classes=10)
    vanishing = [a for a in monitor.alerts if a.kind == "vanishing"]
    assert len(vanishing) == 1 and vanishing[0].step < 50
    assert "model.blocks.0.linear.weight" in vanishing[0].where  # the first layers, not the head
    assert "model.head.weight" not in vanishing[0].where


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_deep_relu_he_residual_normalized_mlp_is_silent(norm):
    model = MLP(64, 10, depth=20, width=128, activation="relu", init="he", residual=True, norm=norm)
    monitor = _fit(model, DigitsDataModule(batch_size=64), 200, num_classes=10)
    assert monitor.alerts == []


@pytest.mark.slow
def test_default_job_is_silent():
    monitor = _fit(MLP(64, 10, depth=3, width=128), DigitsDataModule(batch_size=64), 400, num_classes=10)
    assert monitor.alerts == []


@pytest.mark.slow
def test_lstm_on_the_adding_problem_is_silent():
    model = RNN("lstm", input_size=2, hidden_size=64, out_features=1)
    dm = AddingDataModule(seq_len=50, num_train=2000, num_val=64, num_test=64, batch_size=64)
    monitor = _fit(model, dm, 250, loss="mse", metrics=("mse",))
    assert monitor.alerts == []
