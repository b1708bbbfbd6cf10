"""DDP on CPU (2 processes, gloo): every bpkit callback gives one process's numbers on the same global
batch, only rank 0 writes, and actions taken on ONE rank's NaN are agreed by both ranks (no hang).

Run as a script, this file is the training job itself: ``python tests/test_ddp.py OUT MODE`` with MODE
``single`` (the one-process reference) or ``ddp`` (Lightning's DDP launcher starts rank 1 by running the
same command again). The ``ddp`` job fits several times in the same two processes: the comparison run,
then NaN on rank 1 only with ``on_nonfinite="stop"``, with the ``skip`` clipping policy, and last with
``on_nonfinite="raise"``. A subprocess timeout turns a hang into a failure.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")

ROWS, PER_RANK, STEPS = 64, 8, 6
PREFIXES = ("grad/", "weight/", "update/", "act/", "act_grad/", "clip/", "lr/")


def main(out: str, mode: str) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers.logger import Logger
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from bpkit.callbacks import ActivationMonitor, GradientCheck, GradientClipping, GradientMonitor
    from bpkit.callbacks.run_record import RunRecord

    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", 0))

    class Net(pl.LightningModule):
        def __init__(self, nan_at: int = -1):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
            self.nan_at = nan_at

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train/loss", loss)
            return loss

        def on_after_backward(self):
            # after DDP's all-reduce: the NaN is on rank 1's gradients only
            if self.global_step == self.nan_at and self.global_rank == 1:
                self.net[2].weight.grad[0, 0] = float("nan")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(1)
            x, y = torch.randn(ROWS, 6, generator=g), torch.randint(0, 3, (ROWS,), generator=g)
            if mode == "ddp":  # global batch of 16 = 8 rows per rank: the rows one process sees in a batch
                rows = torch.arange(ROWS).view(-1, 2, PER_RANK)[:, self.global_rank].reshape(-1)
                return DataLoader(TensorDataset(x[rows], y[rows]), batch_size=PER_RANK)
            return DataLoader(TensorDataset(x, y), batch_size=2 * PER_RANK)

    class Capture(Logger):
        """Every bpkit key a logger received on this rank."""

        def __init__(self):
            super().__init__()
            self.metrics = []

        name, version = "capture", 0

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.metrics.append({k: v for k, v in metrics.items() if k.startswith(PREFIXES)})

    def fit(tag, callbacks, nan_at=-1, max_steps=STEPS):
        root = os.path.join(out, f"{mode}_{tag}_rank{rank}")
        capture = Capture()
        kw = dict(strategy="ddp", devices=2, use_distributed_sampler=False) if mode == "ddp" else dict(devices=1)
        trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=callbacks, logger=capture,
                             log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=root, **kw)
        model = Net(nan_at)
        error = None
        try:
            trainer.fit(model)
        except Exception as exc:  # the "raise" run: recorded, then re-raised by the caller
            error = f"{type(exc).__name__}: {exc}"
        result = {"global_step": trainer.global_step, "error": error,
                  "weights": {k: v.tolist() for k, v in model.state_dict().items()},
                  "bpkit_keys": sorted({k for m in capture.metrics for k in m}),
                  "alerts": [a.to_dict() for c in callbacks for a in getattr(c, "alerts", [])],
                  "clip_state": {str(i): {k: (v.tolist() if isinstance(v, torch.Tensor) else v)
                                          for k, v in p.state_dict().items()}
                                 for c in callbacks if isinstance(c, GradientClipping)
                                 for i, p in c._policies.items()}}
        with open(os.path.join(out, f"{mode}_{tag}_rank{rank}.json"), "w") as f:
            json.dump(result, f)
        return result

    # all five callbacks: GradientCheck checks each rank's batch on a copy and must not change the run
    fit("match", [GradientMonitor(histogram_every_n_steps=1), ActivationMonitor(gradients=True), GradientClipping("norm", max_norm=0.05),
                  GradientCheck(), RunRecord()])
    if mode == "single":
        return
    fit("stop", [GradientMonitor(on_nonfinite="stop")], nan_at=2)
    fit("skip", [GradientMonitor(on_nonfinite="warn"), GradientClipping("skip", warmup_steps=2)], nan_at=3)
    result = fit("raise", [GradientMonitor(on_nonfinite="raise")], nan_at=1)
    if result["error"]:
        sys.exit(3)


def _load(path):
    return [json.loads(line) for line in open(path)]


def _by_step(entries, kind):
    out = {}
    for e in entries:
        if e["type"] == kind:
            out.setdefault(e["step"], {}).update(e["data"])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    codes = {}
    for mode in ("single", "ddp"):
        with open(out / f"{mode}.log", "w") as log:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out), mode], env=env,
                                  timeout=420, stdout=log, stderr=subprocess.STDOUT, cwd=out)
        codes[mode] = proc.returncode
    return out, codes


@pytest.mark.slow
def test_every_callback_matches_one_process_and_only_rank0_writes(runs):
    out, codes = runs
    assert codes["single"] == 0, (out / "single.log").read_text()[-3000:]
    single = _load(out / "single_match_rank0" / "bpkit_record.jsonl")
    ddp = _load(out / "ddp_match_rank0" / "bpkit_record.jsonl")
    want, got = _by_step(single, "scalars"), _by_step(ddp, "scalars")
    assert sorted(got) == sorted(want) and set(range(STEPS)) <= set(want)
    keys = set(want[STEPS - 1])
    for prefix in ("grad/norm/", "grad/max/", "weight/norm/", "update/ratio/", "act/mean/", "act/std/",
                   "act/dead_frac/", "act_grad/std/", "clip/norm_pre", "clip/norm_post", "clip/clipped",
                   "lr/group0", "train/loss"):
        assert any(k.startswith(prefix) for k in keys), prefix
    for step in want:
        assert set(got[step]) == set(want[step])
        for key, value in want[step].items():
            if key.startswith("gradcheck/"):  # timing, and the check runs on each rank's own part of the batch
                continue
            assert got[step][key] == pytest.approx(value, rel=2e-5, abs=1e-7), (step, key)
    for record in (single, ddp):  # GradientCheck ran (and passed) without changing anything compared above
        assert [e["data"]["passed"] for e in record if e["type"] == "gradcheck"] == [True]
    assert want[0]["clip/clipped"] == 1.0 and want[0]["clip/norm_post"] == pytest.approx(0.05, rel=1e-4)
    hist_want, hist_got = _by_step(single, "histograms"), _by_step(ddp, "histograms")
    assert sorted(hist_got) == sorted(hist_want) and hist_want
    for step in hist_want:
        assert set(hist_got[step]) == set(hist_want[step])
        for key, h in hist_want[step].items():
            assert sum(hist_got[step][key]["counts"]) == sum(h["counts"]), key
            # float rounding of the averaged gradient may move an element across a bin edge, nothing more
            diff = sum(abs(a - b) for a, b in zip(hist_got[step][key]["counts"], h["counts"]))
            assert diff <= 2, (step, key, diff)
    # the run record's start/end and the end-of-fit figure: rank 0 only
    meta = [e["data"] for e in ddp if e["type"] == "run"]
    assert [m["event"] for m in meta] == ["start", "end"] and meta[1]["status"] == "finished"
    assert (out / "ddp_match_rank0" / "bpkit_gradient_flow.png").is_file()
    rank1_dir = out / "ddp_match_rank1"
    assert not rank1_dir.exists() or not any(rank1_dir.rglob("bpkit_*")), list(rank1_dir.rglob("*"))
    rank0, rank1 = (json.load(open(out / f"ddp_match_rank{r}.json")) for r in (0, 1))
    assert rank0["bpkit_keys"] and rank1["bpkit_keys"] == []  # no bpkit key reached a logger on rank 1
    assert rank0["weights"] == rank1["weights"]


@pytest.mark.slow
def test_nan_on_one_rank_is_agreed_by_both(runs):
    out, codes = runs
    assert codes["ddp"] == 3, (out / "ddp.log").read_text()[-3000:]  # the last fit raised on both ranks
    stop = [json.load(open(out / f"ddp_stop_rank{r}.json")) for r in (0, 1)]
    # the NaN step (2) is skipped and training stops there, on both ranks, with identical weights
    assert stop[0]["global_step"] == stop[1]["global_step"] == 3
    assert stop[0]["weights"] == stop[1]["weights"]
    assert all(torch.isfinite(torch.tensor(w)).all() for w in stop[0]["weights"].values())
    for r in (0, 1):
        alerts = [a for a in stop[r]["alerts"] if a["kind"] == "nonfinite"]
        assert [(a["step"], a["where"]) for a in alerts] == [(2, "net.2.weight")], (r, stop[r]["alerts"])
    record = _load(out / "ddp_stop_rank0" / "bpkit_record.jsonl")
    assert any(e["type"] == "alert" and e["data"]["where"] == "net.2.weight" for e in record)

    skip = [json.load(open(out / f"ddp_skip_rank{r}.json")) for r in (0, 1)]
    assert skip[0]["global_step"] == skip[1]["global_step"] == STEPS  # skipped one step, went on
    assert skip[0]["weights"] == skip[1]["weights"]
    assert skip[0]["clip_state"] == skip[1]["clip_state"]  # the skip policy's statistics did not diverge
    for r in (0, 1):
        assert [a["step"] for a in skip[r]["alerts"] if a["where"] == "total gradient norm"] == [3], skip[r]

    raised = [json.load(open(out / f"ddp_raise_rank{r}.json")) for r in (0, 1)]
    for r in (0, 1):
        assert raised[r]["error"].startswith("NonFiniteGradientError") and "net.2.weight" in raised[r]["error"]
        assert raised[r]["global_step"] == 1


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
