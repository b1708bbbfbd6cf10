"""NoiseScaleMonitor under DDP on CPU (2 processes, gloo): the ddp source takes each rank's gradient before the
all-reduce (a communication hook) and the all-reduced one, with no extra pass; checked against gradients recomputed
here from the rows each rank drew, against the exact per-sample B_simple, and for an unchanged training run.

Run as a script, this file is the training job itself: ``python tests/test_noise_scale_ddp.py OUT`` (Lightning's
DDP launcher starts rank 1 by running the same command again).
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")

PER_RANK, STEPS = 32, 150


def _model():
    from bpkit.models import MLP

    torch.manual_seed(0)
    return MLP(64, 10, depth=2, width=32)


def main(out: str) -> None:
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from bpkit.callbacks import NoiseScaleMonitor
    from bpkit.data import DigitsDataModule

    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    dm = DigitsDataModule(batch_size=PER_RANK)
    dm.setup("fit")
    x, y = dm.split("train").tensors

    class Net(pl.LightningModule):
        def __init__(self, lr):
            super().__init__()
            self.net, self.lr = _model(), lr

        def training_step(self, batch, batch_idx):
            xb, yb, _ = batch
            return F.cross_entropy(self.net(xb), yb)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

        def train_dataloader(self):  # each rank its own rows, its own order
            g = torch.Generator().manual_seed(100 + self.global_rank)
            return DataLoader(TensorDataset(x, y, torch.arange(len(y))), batch_size=PER_RANK, shuffle=True,
                              generator=g, drop_last=True)

    class Rows(pl.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rows.append(batch[2].tolist())

    def fit(lr, steps, monitor):
        rows = Rows()
        fed = []
        callbacks = [rows]
        if monitor is not None:
            original = monitor.estimator.update
            monitor.estimator.update = lambda *a: (fed.append([float(v) for v in a]), original(*a))
            callbacks.append(monitor)
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, use_distributed_sampler=False,
                             max_steps=steps, callbacks=callbacks, logger=False, log_every_n_steps=10,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             default_root_dir=out)
        model = Net(lr)
        trainer.fit(model)
        return model, rows.rows, fed

    monitor = NoiseScaleMonitor(ema=0.995)
    _, rows, fed = fit(0.0, STEPS, monitor)
    trained_bare, _, _ = fit(0.1, 12, None)
    trained_watched, _, _ = fit(0.1, 12, NoiseScaleMonitor())
    same = all(torch.equal(a, b) for a, b in zip(trained_bare.state_dict().values(),
                                                   trained_watched.state_dict().values()))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"mode": monitor.mode, "rows": rows, "fed": fed, "last": monitor.last, "same": same}, f)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("noise_ddp")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(out / "ddp.log", "w") as log:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env, timeout=540,
                              stdout=log, stderr=subprocess.STDOUT, cwd=out)
    assert proc.returncode == 0, (out / "ddp.log").read_text()[-3000:]
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


@pytest.mark.slow
def test_ddp_source_uses_each_ranks_gradient_before_the_all_reduce(ranks):
    import torch.nn.functional as F

    from bpkit.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=PER_RANK)
    dm.setup("fit")
    x, y = dm.split("train").tensors
    model = _model()

    def sq(rows):
        model.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        return float(sum(p.grad.double().square().sum() for p in model.parameters()))

    assert [r["mode"] for r in ranks] == ["ddp", "ddp"]
    assert len(ranks[0]["fed"]) == len(ranks[1]["fed"]) == STEPS
    for step in (0, 1, STEPS - 1):
        both = ranks[0]["rows"][step] + ranks[1]["rows"][step]
        for r in range(2):
            sq_small, sq_big, b_small, b_big = ranks[r]["fed"][step]
            assert (b_small, b_big) == (PER_RANK, 2 * PER_RANK)
            assert sq_small == pytest.approx(sq(ranks[r]["rows"][step]), rel=1e-4)
            assert sq_big == pytest.approx(sq(both), rel=1e-4)


@pytest.mark.slow
def test_ddp_b_simple_matches_per_sample_reference_and_training_is_unchanged(ranks):
    from tests.test_noise_scale import _exact_b_simple_mlp

    from bpkit.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=PER_RANK)
    dm.setup("fit")
    x, y = dm.split("train").tensors
    exact, _, _ = _exact_b_simple_mlp(_model(), x, y)
    last = ranks[0]["last"]
    assert last["noise/b_simple"] == pytest.approx(exact, rel=0.3), (last, exact)
    assert last["noise/batch_size"] == 2 * PER_RANK
    assert ranks[0]["last"] == ranks[1]["last"]  # the averages are averaged across ranks
    assert ranks[0]["same"] and ranks[1]["same"]


if __name__ == "__main__":
    main(sys.argv[1])
