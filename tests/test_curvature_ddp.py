"""CurvatureMonitor under DDP on CPU (2 processes, gloo): the probe runs on rank 0, its numbers are broadcast, both
ranks keep the same history and alerts, and the run ends with the weights of a run without the monitor.

Run as a script, this file is the training job itself: ``python tests/test_curvature_ddp.py OUT`` (Lightning's DDP
launcher starts rank 1 by running the same command again). A subprocess timeout turns a hang into a failure.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")


def main(out: str) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from bpkit.callbacks import CurvatureMonitor

    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", 0))

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                                           torch.nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=3.0)  # far too sharp: lambda_max x lr > 2

        def train_dataloader(self):
            g = torch.Generator().manual_seed(1 + self.global_rank)  # each rank its own data
            x = torch.randn(64, 6, generator=g)
            return DataLoader(TensorDataset(x, x[:, :1] * 2), batch_size=16)

    def fit(callbacks):
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=4, callbacks=callbacks,
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=out)
        model = Net()
        trainer.fit(model)
        return {k: v.tolist() for k, v in model.state_dict().items()}

    monitor = CurvatureMonitor(every_n_steps=2, max_iter=8, trace_samples=2)
    result = {"with": fit([monitor]), "without": fit([]), "history": monitor.history,
              "alerts": [a.to_dict() for a in monitor.alerts]}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.slow
def test_ddp_probe_on_rank_zero_broadcast(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env, timeout=300,
                              stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    assert proc.returncode == 0, (tmp_path / "log.txt").read_text()[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert [h["step"] for h in r0["history"]] == [0.0, 2.0]
    assert r0["history"] == r1["history"]  # rank 1 got rank 0's numbers
    assert r0["alerts"] and [a["kind"] for a in r0["alerts"]] == [a["kind"] for a in r1["alerts"]]
    assert r0["alerts"][0]["kind"] == "sharpness"
    assert r0["with"] == r0["without"] and r1["with"] == r1["without"]
    assert r0["with"] == r1["with"]


if __name__ == "__main__":
    main(sys.argv[1])
