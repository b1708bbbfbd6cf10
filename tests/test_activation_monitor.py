"""ActivationMonitor in a real Lightning Trainer: statistics vs independently captured activations,
dead/saturated alerts, cadence, host reads, cleanup, resume and bad input."""

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bpkit import BpkitConfigError
from bpkit.callbacks import ActivationMonitor
from bpkit.data import AddingDataModule, DigitsDataModule
from bpkit.models import MLP, RNN, ResNet
from bpkit.task import BackpropTask
from tests.hostreads import HostReadCounter


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Trainers without a logger write bpkit's run record to the working directory: keep it in tmp."""
    monkeypatch.chdir(tmp_path)


class Lit(LightningModule):
    """A hand-written module: no bpkit code on the step path except the monitor."""

    def __init__(self, net: nn.Module, lr: float = 1e-3, regression: bool = False) -> None:
        super().__init__()
        self.net, self.lr, self.regression = net, lr, regression

    def forward(self, x):
        out = self.net(x)
        return out[0] if isinstance(out, tuple) else out

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        return nn.functional.mse_loss(out, y) if self.regression else nn.functional.cross_entropy(out, y)

    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Capture(Logger):
    """A real Lightning logger that keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.metrics: dict[int, dict[str, float]] = {}

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def loader(n=64, d=16, classes=4, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def trainer(callbacks, max_steps=4, logger=False, **kw):
    kw.setdefault("log_every_n_steps", 1)
    return Trainer(accelerator="cpu", max_steps=max_steps, callbacks=callbacks, logger=logger,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   num_sanity_val_steps=0, **kw)


def small_mlp(activation="relu", **kw):
    return MLP(16, 4, depth=3, width=12, activation=activation, **kw)


def dead_mlp():
    """A ReLU MLP whose biases of -10 keep every hidden unit at zero."""
    torch.manual_seed(0)
    net = small_mlp()
    with torch.no_grad():
        for block in net.blocks:
            block.linear.bias.fill_(-10.0)
    return net


class Reference(Callback):
    """Captures module outputs and output gradients with its OWN hooks, in float64, at every step."""

    def __init__(self, names):
        self.names = names
        self.outputs: dict[int, dict[str, list]] = {}
        self.grads: dict[int, dict[str, list]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        mods = dict(pl_module.named_modules())
        self.handles = []
        for name in self.names:
            def hook(mod, inp, out, name=name):
                y = out[0] if isinstance(out, tuple) else out
                self.outputs.setdefault(step, {}).setdefault(name, []).append(y.detach().double().clone())
                y.register_hook(lambda g: self.grads.setdefault(step, {}).setdefault(name, []).append(
                    g.detach().double().clone()))
            self.handles.append(mods[name].register_forward_hook(hook))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for h in self.handles:
            h.remove()


def ref_stats(tensors, dim):
    a = torch.cat(tensors).numpy()
    moved = np.moveaxis(a, dim, 0).reshape(a.shape[dim], -1)
    return {"mean": a.mean(), "std": a.std(), "zero_frac": (a == 0).mean(),
            "dead_frac": np.mean([np.all(r == 0) for r in moved])}


# --------------------------------------------------------------------------- statistics vs reference
def test_logged_statistics_match_independent_capture():
    torch.manual_seed(0)
    net = MLP(16, 4, depth=3, width=12, activation="tanh")
    with torch.no_grad():
        net.blocks[0].linear.bias[:3] = -50.0  # a few units with a constant output (not dead for tanh)
    monitor = ActivationMonitor(log_every_n_steps=2, gradients=True, bins=10, saturation_threshold=0.9)
    names = ["net.blocks.0.linear", "net.blocks.0.act", "net.blocks.1.act", "net.head"]
    ref, cap = Reference(names), Capture()
    trainer([monitor, ref], max_steps=4, logger=cap).fit(Lit(net, lr=1e-2), loader())
    assert sorted(cap.metrics) == [1, 3]  # steps s with (s + 1) % 2 == 0
    for step in (1, 3):
        got = cap.metrics[step]
        for name in names:
            r = ref_stats(ref.outputs[step][name], 1)
            for stat in ("mean", "std", "zero_frac", "dead_frac"):
                assert got[f"act/{stat}/{name}"] == pytest.approx(r[stat], rel=1e-5, abs=1e-7), (name, stat)
            g = ref_stats(ref.grads[step][name], 1)
            for stat in ("mean", "std", "zero_frac", "dead_frac"):
                # float32 sums: absolute error relative to the gradient's own scale (the head's mean is ~0)
                tol = 1e-6 * g["std"] if stat == "mean" else 1e-12
                assert got[f"act_grad/{stat}/{name}"] == pytest.approx(g[stat], rel=1e-4, abs=tol), (name, stat)
        for name in ("net.blocks.0.act", "net.blocks.1.act"):
            a = torch.cat(ref.outputs[step][name]).numpy()
            assert got[f"act/saturated_frac/{name}"] == pytest.approx((np.abs(a) > 0.9).mean())
        assert "act/saturated_frac/net.head" not in got
    assert set(cap.metrics[1]) == {f"{p}/{s}/{n}" for p in ("act", "act_grad") for n in names + ["net.blocks.1.linear"]
                                   for s in ("mean", "std", "zero_frac", "dead_frac")} | {
        f"act/saturated_frac/net.blocks.{i}.act" for i in (0, 1)}


def test_histograms_and_alerts_reach_the_run_record(tmp_path):
    net = dead_mlp()
    monitor = ActivationMonitor(log_every_n_steps=1, patience=2, bins=8, gradients=True)
    ref = Reference(["net.blocks.0.linear"])
    trainer([monitor, ref], max_steps=3, logger=CSVLogger(tmp_path)).fit(Lit(net), loader())
    records = [json.loads(line) for line in open(next(tmp_path.rglob("bpkit_record.jsonl")))]
    hists = [r for r in records if r["type"] == "histograms"]
    assert [h["step"] for h in hists] == [0, 1, 2]
    h = hists[0]["data"]["act/hist/net.blocks.0.linear"]
    assert h["edges"] == pytest.approx(np.linspace(-4, 4, 9).tolist())
    a = torch.cat(ref.outputs[0]["net.blocks.0.linear"]).numpy()
    assert h["counts"] == np.histogram(np.clip(a, -4, 4), bins=8, range=(-4, 4))[0].tolist()
    assert "act_grad/hist/net.head" in hists[0]["data"]
    alerts = [r["data"] for r in records if r["type"] == "alert"]
    assert [(a["kind"], a["step"]) for a in alerts] == [("dead", 1)]


# --------------------------------------------------------------------------- detection
def _alerts(net, steps=6, **kw):
    monitor = ActivationMonitor(log_every_n_steps=1, patience=2, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer([monitor], max_steps=steps).fit(Lit(net), loader())
    return monitor.alerts


def test_relu_mlp_with_negative_biases_is_flagged_dead():
    net = dead_mlp()
    alerts = _alerts(net)
    assert [a.kind for a in alerts] == ["dead"]
    assert alerts[0].where == "net.blocks.0.act, net.blocks.1.act"
    assert alerts[0].value == 1.0 and alerts[0].step == 1


def test_tanh_mlp_with_large_weights_is_flagged_saturated():
    torch.manual_seed(0)
    net = small_mlp("tanh")
    with torch.no_grad():
        for block in net.blocks:
            block.linear.weight.mul_(10.0)
    alerts = _alerts(net)
    assert [a.kind for a in alerts] == ["saturated"]
    assert "net.blocks.1.act" in alerts[0].where and alerts[0].value > 0.5


def test_default_job_and_relu_he_net_are_not_flagged():
    torch.manual_seed(0)
    monitor = ActivationMonitor(log_every_n_steps=3, patience=2)
    task = BackpropTask(MLP(64, 10, depth=3, width=128, activation="relu"), num_classes=10)
    t = trainer([monitor], max_steps=9, limit_val_batches=0)
    t.fit(task, DigitsDataModule(batch_size=64))
    assert t.global_step == 9 and monitor.alerts == []
    torch.manual_seed(0)
    he = MLP(16, 4, depth=6, width=32, activation="relu", init="he")
    assert _alerts(he, steps=8) == []
    assert _alerts(MLP(16, 4, depth=3, width=32, activation="tanh"), steps=8) == []


# --------------------------------------------------------------------------- models
def test_lstm_rnn_and_resnet_models():
    torch.manual_seed(0)
    for cell in ("lstm", "rnn_tanh"):
        cap, monitor = Capture(), ActivationMonitor(log_every_n_steps=1, gradients=True)
        task = BackpropTask(RNN(cell, input_size=2, hidden_size=8, out_features=1), loss="mse", metrics=())
        trainer([monitor], max_steps=2, logger=cap, limit_val_batches=0).fit(
            task, AddingDataModule(seq_len=6, num_train=32, batch_size=8))
        got = cap.metrics[0]
        assert 0.0 <= got["act/dead_frac/model.rnn"] <= 1.0 and "act_grad/std/model.rnn" in got
        assert "act/mean/model.head" in got
    cap, monitor = Capture(), ActivationMonitor(log_every_n_steps=1, modules=["model.blocks.*.act2", "model.stem.*"])
    task = BackpropTask(ResNet(1, 10, depth=2, width=4), num_classes=10)
    trainer([monitor], max_steps=2, logger=cap, limit_val_batches=0).fit(task, DigitsDataModule(16, layout="image"))
    keys = {k.split("/")[-1] for k in cap.metrics[0] if k.startswith("act/")}
    assert keys == {"model.blocks.0.act2", "model.blocks.1.act2", "model.stem.0", "model.stem.1", "model.stem.2"}


def test_rnn_dead_units_are_counted_over_batch_and_time():
    rnn = RNN("rnn_relu", input_size=3, hidden_size=6, out_features=4, output="last")
    with torch.no_grad():
        rnn.rnn.bias_ih_l0[:2] = -100.0  # units 0 and 1 never fire at any time step
    ref, cap = Reference(["net.rnn"]), Capture()
    x = torch.rand(32, 5, 3)
    data = DataLoader(TensorDataset(x, torch.randint(0, 4, (32,))), batch_size=8)
    trainer([ActivationMonitor(log_every_n_steps=1), ref], max_steps=1, logger=cap).fit(Lit(rnn, lr=1e-4), data)
    out = torch.cat(ref.outputs[0]["net.rnn"]).numpy()  # (B, T, H)
    expected = np.mean([np.all(out[:, :, u] == 0) for u in range(6)])
    assert expected >= 2 / 6
    assert cap.metrics[0]["act/dead_frac/net.rnn"] == pytest.approx(expected)


# --------------------------------------------------------------------------- cadence, cost, cleanup
class HookSpy(Callback):
    """Records how many forward hooks the monitored modules carry in each phase."""

    def __init__(self):
        self.seen = {"train": [], "val": [], "predict": []}

    def _count(self, pl_module):
        return sum(len(m._forward_hooks) for m in pl_module.modules())

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.seen["train"].append(self._count(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, *args):
        self.seen["val"].append(self._count(pl_module))

    def on_predict_batch_start(self, trainer, pl_module, *args):
        self.seen["predict"].append(self._count(pl_module))


def test_hook_work_only_at_cadence_and_nothing_left_after_fit():
    torch.manual_seed(0)
    model = Lit(small_mlp())
    monitor, spy, cap = ActivationMonitor(log_every_n_steps=3), HookSpy(), Capture()
    t = trainer([monitor, spy], max_steps=10, logger=cap, val_check_interval=2, limit_val_batches=2)
    t.fit(model, loader(n=160), loader(n=32))
    assert sorted(s for s, m in cap.metrics.items() if any(k.startswith("act/") for k in m)) == [2, 5, 8]
    assert monitor.hook_calls == 3 * 5  # 3 log steps x 5 modules (2 Linear, 2 ReLU, head)
    assert len(spy.seen["val"]) > 0 and set(spy.seen["val"]) == {0}
    assert set(spy.seen["train"]) == {0}  # removed at the end of every batch
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    pickle.loads(pickle.dumps(model))
    t.validate(model, loader(n=32), verbose=False)
    t.predict(model, loader(n=32))
    assert monitor.hook_calls == 15 and set(spy.seen["predict"]) == {0}


def test_default_cadence_follows_trainer_log_every_n_steps():
    cap, monitor = Capture(), ActivationMonitor()
    trainer([monitor], max_steps=8, logger=cap, log_every_n_steps=4).fit(Lit(small_mlp()), loader(n=128))
    assert sorted(s for s, m in cap.metrics.items() if "act/mean/net.head" in m) == [3, 7]


def test_zero_host_reads_on_steps_that_do_not_log():
    torch.manual_seed(0)
    with HostReadCounter() as reads:
        trainer([ActivationMonitor(log_every_n_steps=1000, gradients=True)], max_steps=6).fit(
            Lit(small_mlp()), loader(n=128))
    assert reads.count == 0, reads.sites
    with HostReadCounter() as reads:
        trainer([ActivationMonitor(log_every_n_steps=3, gradients=True)], max_steps=6).fit(
            Lit(small_mlp()), loader(n=128))
    assert reads.count == 2, reads.sites  # one packed readback per log step, nothing else


def test_gradient_accumulation_and_checkpointing_count_each_microbatch_once():
    torch.manual_seed(0)
    cap, monitor = Capture(), ActivationMonitor(log_every_n_steps=1, modules="net.head")
    trainer([monitor], max_steps=2, logger=cap, accumulate_grad_batches=2).fit(
        Lit(small_mlp(checkpointing=True)), loader(n=64, batch=8))
    assert monitor.hook_calls == 4  # 2 steps x 2 micro-batches, none from recomputation
    assert sorted(s for s, m in cap.metrics.items() if "act/mean/net.head" in m) == [0, 1]
    monitor = ActivationMonitor(log_every_n_steps=1, modules="net.blocks.0.act", bins=4)
    trainer([monitor], max_steps=1).fit(Lit(small_mlp(checkpointing=True)), loader(n=64, batch=8))
    assert monitor.hook_calls == 1


def test_state_dict_round_trip_through_a_checkpoint(tmp_path):
    net = dead_mlp()
    model = Lit(net)
    monitor = ActivationMonitor(log_every_n_steps=1, patience=2)
    t = trainer([monitor], max_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader())
    t.save_checkpoint(tmp_path / "last.ckpt")
    resumed = ActivationMonitor(log_every_n_steps=1, patience=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer([resumed], max_steps=5).fit(model, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.alerts == monitor.alerts and len(resumed.alerts) == 1  # already flagged: no repeat
    assert resumed.state_dict()["rules"]["flagged"]["dead"] == ["net.blocks.0.act", "net.blocks.1.act"]


# --------------------------------------------------------------------------- bad input
def test_glob_matching_nothing_fails_at_fit_start():
    with pytest.raises(BpkitConfigError, match=r"modules='encoder\.\*' is invalid: .*net\.blocks\.0\.linear"):
        trainer([ActivationMonitor(modules=["net.head", "encoder.*"])]).fit(Lit(small_mlp()), loader())


@pytest.mark.parametrize("kwargs,match", [
    ({"dead_threshold": 1.2}, "dead_threshold=1.2"),
    ({"dead_threshold": -1}, "dead_threshold=-1"),
    ({"saturation_threshold": 1.0}, "saturation_threshold=1.0"),
    ({"saturation_threshold": -0.5}, "saturation_threshold=-0.5"),
    ({"saturated_fraction": 1.5}, "saturated_fraction=1.5"),
    ({"log_every_n_steps": -1}, "log_every_n_steps=-1"),
    ({"modules": []}, "modules=\\[\\]"),
    ({"modules": 3}, "modules=3"),
    ({"bins": 0}, "bins=0"),
    ({"hist_range": (1, -1)}, "hist_range"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(BpkitConfigError, match=match):
        ActivationMonitor(**kwargs)


# --------------------------------------------------------------------------- slow: compile, DDP, W&B
@pytest.mark.slow
def test_compiled_model_gets_one_clear_warning():
    torch.manual_seed(0)
    monitor = ActivationMonitor(log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([monitor], max_steps=2).fit(torch.compile(Lit(small_mlp())), loader())
    ours = [w for w in caught if "ActivationMonitor" in str(w.message)]
    assert len(ours) == 1 and "torch.compile" in str(ours[0].message) and "NOT monitored" in str(ours[0].message)
    assert monitor.hook_calls == 0
    # only a compiled sub-module: the rest of the model is still monitored
    lit = Lit(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), torch.compile(nn.Sequential(nn.Linear(8, 4), nn.Tanh()))))
    cap, monitor = Capture(), ActivationMonitor(log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([monitor], max_steps=2, logger=cap).fit(lit, loader())
    ours = [str(w.message) for w in caught if "ActivationMonitor" in str(w.message)]
    assert len(ours) == 1 and "net.2._orig_mod.0" in ours[0]
    assert {k.split("/")[-1] for k in cap.metrics[0]} == {"net.0", "net.1"}


@pytest.mark.slow
def test_ddp_statistics_are_summed_over_ranks(tmp_path):
    monitor = ActivationMonitor(log_every_n_steps=1, modules="net.head", bins=4)
    t = Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, callbacks=[monitor],
                logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, log_every_n_steps=1)
    t.fit(Lit(small_mlp()), loader(n=64, batch=8))
    records = [json.loads(line) for line in open(next(tmp_path.rglob("bpkit_record.jsonl")))]
    hists = [(r["step"], sum(r["data"]["act/hist/net.head"]["counts"])) for r in records if r["type"] == "histograms"]
    assert hists == [(0, 64), (1, 64), (2, 64)]  # both ranks' batches of 8 samples x 4 outputs, every step


@pytest.mark.slow
def test_wandb_offline_receives_histograms(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="bpkit-test")
    trainer([ActivationMonitor(log_every_n_steps=1)], max_steps=2, logger=logger).fit(Lit(small_mlp()), loader())
    summary = logger.experiment.summary
    hist = dict(summary["act/hist/net.head"])
    assert hist["_type"] == "histogram" and len(hist["bins"]) == 65
    assert sum(hist["values"]) == 16 * 4  # the second step's batch of 16 samples x 4 outputs
    assert "act/mean/net.blocks.0.act" in summary.keys()
    logger.experiment.finish()


def test_hydra_config_matches_the_callback_defaults():
    import inspect
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "callbacks" / "activation_monitor.yaml")
    monitor = instantiate(cfg.activation_monitor)
    assert isinstance(monitor, ActivationMonitor)
    defaults = {k: p.default for k, p in inspect.signature(ActivationMonitor).parameters.items()}
    given = OmegaConf.to_container(cfg.activation_monitor)
    given.pop("_target_")
    assert set(given) == set(defaults)
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()} == defaults
