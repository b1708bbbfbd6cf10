"""FSDP2 (``fully_shard``) on CPU with gloo, 2 processes: norms, histograms, update ratios and clipping
computed over the local shards (plus one all-reduce) equal the unsharded one-process reference.

Run as a script, this file is the training job itself: ``python tests/test_fsdp.py OUT MODE`` with MODE
``single`` (plain module, one process, the global batch) or ``fsdp`` (Lightning's ModelParallelStrategy,
which applies FSDP2 in ``configure_model``; its launcher starts rank 1 by running the same command again).
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")

ROWS, PER_RANK, STEPS = 48, 8, 4


def main(out: str, mode: str) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from bpkit.callbacks import ActivationMonitor, GradientClipping, GradientMonitor

    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", 0))

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            # odd sizes: uneven shards, and a 1-element bias whose shard is empty on rank 1
            self.net = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 1))

        def configure_model(self):
            if mode != "fsdp":
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(1)
            x, y = torch.randn(ROWS, 6, generator=g), torch.randn(ROWS, 1, generator=g) * 3
            if mode == "fsdp":
                rows = torch.arange(ROWS).view(-1, 2, PER_RANK)[:, self.global_rank].reshape(-1)
                return DataLoader(TensorDataset(x[rows], y[rows]), batch_size=PER_RANK)
            return DataLoader(TensorDataset(x, y), batch_size=2 * PER_RANK)

    def fit(tag, callbacks):
        root = os.path.join(out, f"{mode}_{tag}_rank{rank}")
        if mode == "fsdp":
            kw = dict(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2,
                      use_distributed_sampler=False)
        else:
            kw = dict(devices=1)
        trainer = pl.Trainer(accelerator="cpu", max_steps=STEPS, callbacks=callbacks, logger=False,
                             log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=root, **kw)
        model = Net()
        trainer.fit(model)
        weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).tolist()
                   for k, v in model.state_dict().items()}
        with open(os.path.join(out, f"{mode}_{tag}_rank{rank}.json"), "w") as f:
            json.dump({"weights": weights, "global_step": trainer.global_step}, f)

    fit("norm", [GradientMonitor(histogram_every_n_steps=1), ActivationMonitor(), GradientClipping("norm", max_norm=0.5)])
    fit("value", [GradientClipping("value", clip_value=0.05)])
    fit("zclip", [GradientClipping("zclip", warmup_steps=2, max_norm=0.8)])


def _by_step(path, kind):
    out = {}
    for line in open(path):
        e = json.loads(line)
        if e["type"] == kind:
            out.setdefault(e["step"], {}).update(e["data"])
    return out


@pytest.mark.slow
def test_fsdp2_statistics_and_clipping_equal_the_unsharded_reference(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for mode in ("single", "fsdp"):
        with open(tmp_path / f"{mode}.log", "w") as log:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path), mode], env=env,
                                  timeout=420, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        assert proc.returncode == 0, (tmp_path / f"{mode}.log").read_text()[-4000:]
    for tag in ("norm", "value", "zclip"):
        want, got = (_by_step(tmp_path / f"{m}_{tag}_rank0" / "bpkit_record.jsonl", "scalars")
                     for m in ("single", "fsdp"))
        assert sorted(got) == sorted(want) and len(want) >= STEPS
        for step in want:
            assert set(got[step]) == set(want[step]), (tag, step)
            for key, value in want[step].items():
                assert got[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (tag, step, key)
        ref = json.load(open(tmp_path / f"single_{tag}_rank0.json"))["weights"]
        for rank in (0, 1):
            weights = json.load(open(tmp_path / f"fsdp_{tag}_rank{rank}.json"))["weights"]
            for name, value in ref.items():
                assert torch.tensor(weights[name]) == pytest.approx(torch.tensor(value), rel=1e-5, abs=1e-6), name
        assert not (tmp_path / f"fsdp_{tag}_rank1").exists() or \
            not any((tmp_path / f"fsdp_{tag}_rank1").rglob("bpkit_*"))
    norm = _by_step(tmp_path / "single_norm_rank0" / "bpkit_record.jsonl", "scalars")
    assert norm[0]["clip/clipped"] == 1.0
    assert {"grad/norm/net.4.bias", "grad/max/net.4.bias", "update/ratio/net.0.weight", "act/std/net.1"} <= set(norm[0]) | set(norm[1])
    want, got = (_by_step(tmp_path / f"{m}_norm_rank0" / "bpkit_record.jsonl", "histograms") for m in ("single", "fsdp"))
    assert sorted(got) == sorted(want) and want
    for step in want:
        for key, h in want[step].items():
            assert sum(got[step][key]["counts"]) == sum(h["counts"]), key
            diff = sum(abs(a - b) for a, b in zip(got[step][key]["counts"], h["counts"]))
            assert diff <= 2, (step, key, diff)


def _spawned(rank, world, port, out):
    import torch.distributed as dist
    from torch import nn

    from bpkit.clip import make_policy
    from bpkit.stats.grads import grad_stats
    from bpkit.stats.histograms import log_histograms
    from bpkit.stats.norms import foreach_norms
    from bpkit.stats.sharded import locals_of

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
        fully_shard(net[0])
        fully_shard(net)
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(rank))
        net(x).pow(2).sum().mul(10).backward()
        params = list(net.parameters())
        grads = [p.grad for p in params]
        stats = grad_stats(grads, params, max_abs=True)
        hist = log_histograms(grads)
        hist_full = log_histograms([g.full_tensor() for g in grads])  # plain tensors: the one-process path
        inf = foreach_norms(grads, float("inf"))
        total = stats.total
        result = make_policy("norm", max_norm=0.1).apply(params, locals_of(grads), total)
        after = foreach_norms(grads)
        full = [g.full_tensor() for g in grads]
        json.dump({"norms": stats.norms.tolist(), "weights": stats.weight_norms.tolist(),
                   "max": stats.max_abs.tolist(), "inf": inf.tolist(), "hist": hist.tolist(),
                   "total": float(total), "post": float(result.norm_post), "after": after.tolist(),
                   "full_after": [g.norm().item() for g in full], "hist_full": hist_full.tolist(),
                   "full_weights": [p.full_tensor().norm().item() for p in params]},
                  open(os.path.join(out, f"rank{rank}.json"), "w"))
    finally:
        dist.destroy_process_group()


def test_sharded_statistics_equal_the_full_tensors(tmp_path):
    """Pure torch (no Lightning): ``fully_shard`` on 2 CPU processes; the reference is each full tensor
    gathered by DTensor itself (``full_tensor()``) and the reference clip is torch's own arithmetic."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    for key in ("norms", "weights", "max", "inf", "total", "post", "after"):
        assert r0[key] == pytest.approx(r1[key], rel=1e-6), key  # every rank gets the full-tensor numbers
    assert r0["hist"] == r1["hist"] == r0["hist_full"]
    assert r0["weights"] == pytest.approx(r0["full_weights"], rel=1e-5)
    assert r0["inf"] == pytest.approx(r0["max"], rel=1e-6)
    assert r0["post"] == pytest.approx(0.1, rel=1e-4) and r0["total"] > 0.1
    assert r0["after"] == pytest.approx(r0["full_after"], rel=1e-5)
    # clipping scaled every shard by the same factor: the full tensors' norms are the pre-clip norms x 0.1/total
    assert r0["after"] == pytest.approx([n * 0.1 / r0["total"] for n in r0["norms"]], rel=1e-4)
    numels = [5 * 7, 7, 7, 1]
    assert [sum(row) for row in r0["hist"]] == numels  # every element of every full tensor counted once


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
