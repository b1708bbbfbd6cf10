"""The detectors' default thresholds on real runs: flag what is broken, stay silent on what is not."""

import functools
import warnings

import lightning.pytorch as pl
import pytest
import torch

from bpkit.callbacks import GradientMonitor
from bpkit.data import AddingDataModule, DigitsDataModule
from bpkit.models import MLP, RNN
from bpkit.task import BackpropTask

warnings.filterwarnings("ignore", ".*bpkit.*")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _fit(model, datamodule, steps, loss="cross_entropy", optimizer=None, log_every_n_steps=50, **task_kw):
    pl.seed_everything(0, workers=True)
    monitor = GradientMonitor()  # every default, the Trainer's log_every_n_steps (Lightning's 50 unless given)
    trainer = pl.Trainer(max_steps=steps, callbacks=[monitor], logger=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         log_every_n_steps=log_every_n_steps, limit_val_batches=0)
    if optimizer is not None:
        task_kw["optimizer"] = optimizer
    trainer.fit(BackpropTask(model, loss, **task_kw), datamodule)
    return monitor, trainer


def test_deep_sigmoid_mlp_is_flagged_within_50_steps():
    model = MLP(64, 10, depth=20, width=128, activation="sigmoid")
    monitor, _ = _fit(model, DigitsDataModule(batch_size=64), 50, num_classes=10)
    vanishing = [a for a in monitor.alerts if a.kind == "vanishing"]
    assert len(vanishing) == 1 and vanishing[0].step < 50
    assert "model.blocks.0.linear.weight" in vanishing[0].where  # the first layers, not the head
    assert "model.head.weight" not in vanishing[0].where


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_deep_relu_he_residual_normalized_mlp_is_silent(norm):
    model = MLP(64, 10, depth=20, width=128, activation="relu", init="he", residual=True, norm=norm)
    monitor, _ = _fit(model, DigitsDataModule(batch_size=64), 200, num_classes=10)
    assert monitor.alerts == []


@pytest.mark.slow
def test_default_job_is_silent():
    monitor, _ = _fit(MLP(64, 10, depth=3, width=128), DigitsDataModule(batch_size=64), 400, num_classes=10)
    assert monitor.alerts == []


@pytest.mark.slow
def test_lstm_on_the_adding_problem_is_silent():
    model = RNN("lstm", input_size=2, hidden_size=64, out_features=1)
    dm = AddingDataModule(seq_len=50, num_train=2000, num_val=64, num_test=64, batch_size=64)
    monitor, _ = _fit(model, dm, 250, loss="mse", metrics=("mse",))
    assert monitor.alerts == []


def test_healthy_depth_12_relu_mlp_with_adam_is_silent():
    """Issue 17: ``bpkit-train model.depth=12`` (ReLU, Adam 1e-3, digits, seed 42, val/acc 0.81 and rising) raised
    ``exploding @ step 52 ... (30.2x its running median 0.172)``: the gradient norm of a deep ReLU MLP with
    PyTorch's default init starts tiny and grows ~50x while Adam gets it learning. Same seed, same data, same
    optimizer, the Trainer's defaults of bpkit-train (log_every_n_steps=10); see benchmarks/results/calibration.md."""
    torch.manual_seed(42)
    model = MLP(64, 10, depth=12, width=128, activation="relu")
    monitor, _ = _fit(model, DigitsDataModule(batch_size=64, seed=42), 120, num_classes=10, log_every_n_steps=10,
                      optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    assert [a for a in monitor.alerts if a.kind == "exploding"] == []


def test_exploding_rnn_recipe_is_flagged_before_its_first_nan():
    """recipes/exploding_rnn.yaml without clipping: tanh RNN, recurrent_scale 1.5, SGD 0.1 on the adding problem
    (seq_len 10): the gradient norm grows ~10x per step and overflows to NaN after ~20 steps."""
    torch.manual_seed(42)
    model = RNN("rnn_tanh", input_size=2, hidden_size=64, out_features=1, recurrent_scale=1.5)
    dm = AddingDataModule(seq_len=10, num_train=2000, num_val=64, num_test=64, batch_size=64, seed=42)
    monitor, _ = _fit(model, dm, 40, loss="mse", metrics=("mse",), log_every_n_steps=10,
                      optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    exploding = [a for a in monitor.alerts if a.kind == "exploding"]
    nonfinite = [a for a in monitor.alerts if a.kind == "nonfinite"]
    assert exploding and nonfinite, [(a.kind, a.step) for a in monitor.alerts]
    assert exploding[0].step < nonfinite[0].step
