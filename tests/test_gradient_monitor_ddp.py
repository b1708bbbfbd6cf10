"""DDP on CPU (2 processes, gloo): the monitor's norms equal one process on the same global batch.

Run as a script, this file is the training job itself: ``python tests/test_gradient_monitor_ddp.py OUT ddp``
(Lightning's DDP launcher starts the second rank by running the same command again).
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")


def main(out: str, mode: str) -> None:
    import lightning.pytorch as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from bpkit.callbacks import GradientMonitor

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(1)
            x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
            if mode == "ddp":  # global batch of 16 = 8 rows per rank, the same rows a single process sees
                rows = torch.arange(64).view(-1, 2, 8)[:, self.global_rank].reshape(-1)
                return DataLoader(TensorDataset(x[rows], y[rows]), batch_size=8)
            return DataLoader(TensorDataset(x, y), batch_size=16)

    class Record(pl.Callback):
        def __init__(self):
            self.steps = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            params = [p for p in pl_module.parameters() if p.grad is not None]
            monitor = next(c for c in trainer.callbacks if isinstance(c, GradientMonitor))
            entry = monitor.step_norms(trainer, pl_module, optimizer)
            self.steps.append({"per_tensor": entry.per_tensor.tolist(), "total": entry.total.item()})

    record, monitor = Record(), GradientMonitor(log_every_n_steps=2)
    kw = dict(strategy="ddp", devices=2, use_distributed_sampler=False) if mode == "ddp" else dict(devices=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, callbacks=[monitor, record], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=out, **kw)
    trainer.fit(Net())
    with open(os.path.join(out, f"{mode}_rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"steps": record.steps, "alerts": len(monitor.alerts)}, f)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
               OMP_NUM_THREADS="1")
    for mode in ("single", "ddp"):
        with open(tmp_path / f"{mode}.log", "w") as log:
            subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path), mode], env=env, check=True,
                           timeout=300, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    single = json.load(open(tmp_path / "single_rank0.json"))["steps"]
    ranks = [json.load(open(tmp_path / f"ddp_rank{r}.json"))["steps"] for r in (0, 1)]
    assert len(single) == 4
    for rank in ranks:
        for got, want in zip(rank, single):
            assert got["per_tensor"] == pytest.approx(want["per_tensor"], rel=1e-5)
            assert got["total"] == pytest.approx(want["total"], rel=1e-5)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
