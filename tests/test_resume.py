"""Resume: a run killed at step k and resumed from its last checkpoint logs the same statistics, raises the
same alerts and ends with the same weights as an uninterrupted run, with every bpkit callback at once
(detector statistics, clipping history, cadence counters and alerts all round-trip through the checkpoint)."""

import json
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bpkit.callbacks import ActivationMonitor, GradientClipping, GradientMonitor
from bpkit.callbacks.run_record import RunRecord

# killed at an epoch end: Lightning restarts a plain DataLoader from the epoch start, so a mid-epoch
# resume would see other batches (data order is not bpkit's state); 8 is not a multiple of the log cadence 3
STEPS, KILL_AT, NAN_AT = 22, 8, 4


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
        with torch.no_grad():
            self.net[0].bias[:6] = -20.0  # six dead ReLU units: a `dead` alert after `patience` log steps

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def on_after_backward(self):
        if self.global_step == NAN_AT:
            self.net[2].weight.grad[0, 0] = float("nan")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 5, generator=g)
    return DataLoader(TensorDataset(x, x[:, :1] * 2 - x[:, 1:2]), batch_size=4)  # 8 batches per epoch


class Kill(pl.Callback):
    """Dies at the start of step ``at``, after the checkpoint of step ``at - 1`` was written."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("killed")


def callbacks():
    return [GradientMonitor(log_every_n_steps=3, histogram_every_n_steps=6, check_every_n_steps=2, spike={"warmup": 3},
                            exploding={"warmup": 3, "window": 4}),
            ActivationMonitor(log_every_n_steps=2, patience=2, bins=8, dead_threshold=0.3),
            GradientClipping("zclip", warmup_steps=3, max_norm=0.5, log_every_n_steps=3),
            RunRecord(log_every_n_steps=3, gradient_flow_image=False)]


def fit(root, cbs, ckpt_path=None):
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=STEPS, callbacks=[*cbs, ckpt], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         log_every_n_steps=1)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer, model


def entries(root):
    """The record without the run's start/end entries, as ``{(type, step, key): value}``."""
    out = {}
    for line in open(root / "bpkit_record.jsonl"):
        e = json.loads(line)
        if e["type"] in ("scalars", "histograms"):
            for k, v in e["data"].items():
                assert (e["type"], e["step"], k) not in out, f"{k} logged twice at step {e['step']}"
                out[(e["type"], e["step"], k)] = v
        elif e["type"] == "alert":
            out[("alert", e["step"], e["data"]["kind"], e["data"]["where"])] = e["data"]["message"]
    return out


def test_killed_and_resumed_run_equals_the_uninterrupted_run(tmp_path):
    full_cbs = callbacks()
    _, full_model = fit(tmp_path / "full", full_cbs)

    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="killed"):
        fit(part, [Kill(KILL_AT), *callbacks()])
    saved = torch.load(part / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == KILL_AT
    resumed_cbs = callbacks()
    trainer, model = fit(part, resumed_cbs, ckpt_path=str(part / "ckpt" / "last.ckpt"))
    assert trainer.global_step == STEPS

    for name, value in full_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    want, got = entries(tmp_path / "full"), entries(part)
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, float) and not math.isnan(value):
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        else:
            assert got[key] == value, key
    # what the run must have exercised, before and after the kill
    kinds = {(k[2], k[1] < KILL_AT) for k in want if k[0] == "alert"}
    assert ("nonfinite", True) in kinds and ("dead", True) in kinds, kinds
    assert any(k[0] == "scalars" and k[2] == "clip/clipped" and k[1] > KILL_AT for k in want)
    for a, b in zip(full_cbs, resumed_cbs):
        assert [x.to_dict() for x in getattr(a, "alerts", [])] == [x.to_dict() for x in getattr(b, "alerts", [])]
    assert full_cbs[0].skipped_steps == resumed_cbs[0].skipped_steps == 1
    # the clipping statistics (ZClip's EMA), counters and policy state are those of the uninterrupted run
    sa, sb = full_cbs[2].state_dict(), resumed_cbs[2].state_dict()
    assert sa["steps"] == sb["steps"] == {0: STEPS - 1} and sa["since"] == sb["since"]  # the NaN step was skipped
    for key in ("mean", "var"):
        torch.testing.assert_close(sb["policies"][0][key], sa["policies"][0][key], rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: callbacks()[0], lambda: callbacks()[1], lambda: callbacks()[2],
                                  lambda: callbacks()[3]], ids=["gradient_monitor", "activation_monitor",
                                                                 "gradient_clipping", "run_record"])
def test_state_survives_torch_save_and_load(tmp_path, make):
    """Each callback's state is plain torch.save-able data and loads into a fresh instance unchanged."""
    cb = make()
    fit(tmp_path, [cb])
    state = cb.state_dict()
    torch.save(state, tmp_path / "s.pt")
    fresh = make()
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=False))
    again = fresh.state_dict()

    def plain(x):
        if isinstance(x, torch.Tensor):
            return x.tolist()
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    assert json.dumps(plain(again), sort_keys=True, default=str) == json.dumps(plain(state), sort_keys=True,
                                                                                 default=str)
