"""The steady-explosion rule: a gradient that is huge from the first step on (which the relative exploding rule,
comparing with its own history, cannot see). Ground truth in plain torch first."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bpkit.callbacks import GradientMonitor
from bpkit.models import RNN


class SeqModel(pl.LightningModule):
    def __init__(self, cell: str, scale: float | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = RNN(cell, input_size=2, hidden_size=64, out_features=1, recurrent_scale=scale)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x)[0], y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights stay put: the explosion is steady


def _data(n: int = 640, steps: int = 40) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, steps, 2, generator=g)
    return DataLoader(TensorDataset(x, x[:, :, 0].mean(1, keepdim=True)), batch_size=32)


def _fit(model, tmp_path) -> GradientMonitor:
    monitor = GradientMonitor(histograms=False, log_every_n_steps=10)
    pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[monitor], logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False,
               default_root_dir=str(tmp_path)).fit(model, _data())
    return monitor


def test_a_steadily_exploding_rnn_is_flagged(tmp_path):
    model = SeqModel("rnn_tanh", 3.0)
    x, y = next(iter(_data()))
    F.mse_loss(model.net(x)[0], y).backward()  # ground truth: the gradient dwarfs the weights from step 0
    ratios = {n: (p.grad.norm() / p.norm()).item() for n, p in model.named_parameters() if p.dim() >= 2}
    assert ratios["net.rnn.weight_ih_l0"] > 1e4 and ratios["net.head.weight"] < 10
    model.zero_grad()
    with pytest.warns(UserWarning, match="stayed above 100x their own weight norm"):
        monitor = _fit(model, tmp_path)
    steady = [a for a in monitor.alerts if a.kind == "exploding"]
    assert len(steady) == 1 and steady[0].step == 10  # checks at steps 0, 9 (a log step) and 10: 3 in a row
    assert "net.rnn.weight_ih_l0" in steady[0].where and "net.head.weight" not in steady[0].where


@pytest.mark.parametrize("cell, scale", [("lstm", None), ("gru", None), ("rnn_tanh", 1.0)])
def test_healthy_recurrent_nets_stay_quiet(tmp_path, cell, scale):
    monitor = _fit(SeqModel(cell, scale), tmp_path)
    assert not [a for a in monitor.alerts if a.kind == "exploding"]
