"""The gradient noise scale: McCandlish et al.'s estimators against exact per-sample references, and
NoiseScaleMonitor on the real Trainer (both sources, training unchanged, no host reads between log steps)."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from bpkit.callbacks import NoiseScaleMonitor
from bpkit.data import DigitsDataModule
from bpkit.errors import BpkitConfigError
from bpkit.models import MLP
from bpkit.stats.noise_scale import (NoiseScaleEstimator, critical_batch_sentence, fit_steps_vs_batch,
                                     split_batch_sq_norms, unbiased_estimates)
from bpkit.task import BackpropTask
from tests._helpers import MemoryLogger
from tests.hostreads import HostReadCounter

ROOT = Path(__file__).resolve().parents[1]
TRAINER = dict(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
               num_sanity_val_steps=0, limit_val_batches=0)


def _exact_b_simple_mlp(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """B_simple of the whole data set from per-sample gradients (torch.func, float64 sums): the reference."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in per_sample.values()], 1).double()
    mean = flat.mean(0)
    trace = ((flat - mean) ** 2).sum(1).mean()
    g2 = mean @ mean
    return float(trace / g2), float(g2), float(trace)


@pytest.fixture(scope="module")
def digits_train():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    x, y = dm.split("train").tensors
    return x, y


@pytest.fixture(scope="module")
def trained_mlp(digits_train):
    """A small MLP after one epoch of SGD (B_simple ~ 100 there: past the easy start, where it is ~10)."""
    x, y = digits_train
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MLP(64, 10, depth=2, width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(len(x) // 32):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


# ---------------------------------------------------------------- the estimators


def test_unbiased_estimates_recover_norm_and_trace_in_expectation():
    """E|G_B|^2 = |G|^2 + tr/B exactly (Gaussian per-sample gradients, many draws): the estimates average to both."""
    gen = torch.Generator().manual_seed(1)
    d, mean = 50, torch.full((50,), 0.2, dtype=torch.float64)  # |G|^2 = 2.0
    std = torch.linspace(0.5, 1.5, d, dtype=torch.float64)  # tr(Sigma) = sum std^2
    g2s, trs = [], []
    for _ in range(2000):
        small = mean + std * torch.randn(8, d, generator=gen, dtype=torch.float64)
        big = torch.cat([small, mean + std * torch.randn(24, d, generator=gen, dtype=torch.float64)])
        g2, tr = unbiased_estimates(small.mean(0).square().sum(), big.mean(0).square().sum(), 8, 32)
        g2s.append(float(g2))
        trs.append(float(tr))
    assert np.mean(g2s) == pytest.approx(2.0, rel=0.05)
    assert np.mean(trs) == pytest.approx(float(std.square().sum()), rel=0.05)


def test_linear_regression_b_simple_matches_per_sample_reference():
    """Linear regression with MSE at fixed weights: per-sample gradients 2 (w.x - y) x written by hand are the
    reference; split-batch estimates on random batches (with replacement) land within 30% (measured: ~5%)."""
    gen = torch.Generator().manual_seed(0)
    n, d = 2000, 10
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.linspace(-1, 1, d, dtype=torch.float64) + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    w = torch.zeros(d, dtype=torch.float64)
    w[:3] = 0.5  # not at the optimum: a real mean gradient
    per_sample = 2 * (x @ w - y)[:, None] * x
    g = per_sample.mean(0)
    exact = float(((per_sample - g) ** 2).sum(1).mean() / (g @ g))

    param = w.clone().requires_grad_(True)
    est = NoiseScaleEstimator(ema=0.995)
    for _ in range(300):
        idx = torch.randint(0, n, (64,), generator=gen)
        out = split_batch_sq_norms(lambda b: ((b[0] @ param - b[1]) ** 2).mean(), [param], (x[idx], y[idx]))
        est.update(*out)
    got = est.read()
    assert param.grad is None
    assert got["b_simple"] == pytest.approx(exact, rel=0.3), (got, exact)
    assert got["b_small"] == 32 and got["b_big"] == 64 and got["estimates"] == 300


def test_mlp_on_digits_b_simple_matches_per_sample_reference(trained_mlp, digits_train):
    """A small MLP on digits at fixed weights: vmap per-sample gradients are the reference (measured ~5% off)."""
    x, y = digits_train
    exact, _, _ = _exact_b_simple_mlp(trained_mlp, x, y)
    gen = torch.Generator().manual_seed(3)
    est = NoiseScaleEstimator(ema=0.995)
    params = list(trained_mlp.parameters())
    for _ in range(150):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        est.update(*split_batch_sq_norms(lambda b: F.cross_entropy(trained_mlp(b[0]), b[1]), params, (x[idx], y[idx])))
    assert est.read()["b_simple"] == pytest.approx(exact, rel=0.3)
    assert all(p.grad is None for p in params)


def test_estimator_skips_nonfinite_pairs_and_round_trips():
    est = NoiseScaleEstimator(ema=0.5)
    est.update(torch.tensor(3.0), torch.tensor(1.5), 4, 16)  # |G|^2 = 1, tr = 8
    est.update(torch.tensor(float("inf")), torch.tensor(1.5), 4, 16)  # an AMP overflow: ignored
    assert est.read()["b_simple"] == pytest.approx(8.0) and est.read()["estimates"] == 1
    again = NoiseScaleEstimator(ema=0.5)
    again.load_state_dict(est.state_dict())
    assert again.read() == est.read()
    empty = NoiseScaleEstimator()
    assert empty.read() == {"estimates": 0}


def test_noise_dominated_estimate_has_no_b_simple():
    est = NoiseScaleEstimator(ema=0.0)
    est.update(torch.tensor(1.0), torch.tensor(0.9), 4, 8)  # |G|^2 estimate = (8*0.9 - 4)/4 = 0.8 > 0
    assert est.read()["b_simple"] == pytest.approx((1.0 - 0.9) / (1 / 4 - 1 / 8) / 0.8)
    est.update(torch.tensor(1.0), torch.tensor(0.4), 4, 8)  # (3.2 - 4)/4 < 0: the mean is hidden by the noise
    assert np.isnan(est.read()["b_simple"])


def test_sentence_and_fit():
    assert critical_batch_sentence(64, 700) == ("batch 64 is 11x below the critical batch ~700: a larger batch would "
                                                "use the same data about as efficiently and take fewer steps")
    assert "above the critical batch ~50" in critical_batch_sentence(512, 50)
    assert "near the critical batch" in critical_batch_sentence(64, 100)
    assert "could not be estimated" in critical_batch_sentence(64, float("nan"))
    b = np.array([8, 16, 32, 64, 128, 256])
    s_min, b_noise = fit_steps_vs_batch(b, 50 * (1 + 60 / b) * np.array([1.05, 0.95, 1.0, 1.02, 0.97, 1.0]))
    assert s_min == pytest.approx(50, rel=0.1) and b_noise == pytest.approx(60, rel=0.2)
    with pytest.raises(BpkitConfigError, match="batch_sizes"):
        fit_steps_vs_batch([8, 8], [10, 12])


# ---------------------------------------------------------------- the callback on the real Trainer


class _Frozen(BackpropTask):
    """BackpropTask with SGD at lr 0: the weights stay fixed, so the exact B_simple is known for the whole run."""

    def __init__(self, model):
        super().__init__(model, "cross_entropy", functools.partial(torch.optim.SGD, lr=0.0), num_classes=10)


@pytest.mark.parametrize("source", ["split", pytest.param("accumulation", marks=pytest.mark.slow)])
def test_monitor_on_trainer_matches_per_sample_reference(source, trained_mlp, digits_train):
    """The callback's noise/b_simple over a run at fixed weights (lr 0) is within 30% of the exact value (measured:
    split 100 steps of 64 and accumulation 100 steps of 4 x 16: within ~5%); the accumulation source adds no
    forward pass (the model's forward count equals the batches), the split source two (the halves) per step."""
    x, y = digits_train
    exact, _, _ = _exact_b_simple_mlp(trained_mlp, x, y)
    model = MLP(64, 10, depth=2, width=32)
    model.load_state_dict(trained_mlp.state_dict())
    forwards, batches = [], []
    model.register_forward_hook(lambda *a: forwards.append(1))

    class Count(pl.Callback):
        def on_train_batch_start(self, *args):
            batches.append(1)

    logger = MemoryLogger()
    monitor = NoiseScaleMonitor(ema=0.995, log_every_n_steps=1)
    accumulate = 4 if source == "accumulation" else 1
    dm = DigitsDataModule(batch_size=16 if source == "accumulation" else 64, seed=0)
    trainer = pl.Trainer(max_steps=100, accumulate_grad_batches=accumulate,
                         callbacks=[monitor, Count()], logger=logger, log_every_n_steps=1, **TRAINER)
    trainer.fit(_Frozen(model), datamodule=dm)
    assert monitor.mode == source
    steps = sorted(s for s, m in logger.metrics.items() if "noise/b_simple" in m)
    last = logger.metrics[steps[-1]]
    assert last["noise/b_simple"] == pytest.approx(exact, rel=0.3), (last, exact)
    assert last["noise/critical_batch"] == last["noise/b_simple"]
    assert last["noise/batch_size"] == 64
    extra = 0 if source == "accumulation" else 2 * trainer.global_step  # two pieces per (log) step
    assert len(forwards) == len(batches) + extra
    assert monitor.sentence.startswith("batch 64 is ")


def test_accumulation_pairs_are_the_micro_batch_and_the_window_gradients(trained_mlp):
    """The accumulation source feeds the estimator |g(first micro-batch)|^2 (Lightning's 1/k loss scaling undone)
    and |g(whole window)|^2, recomputed here independently from the batches the Trainer drew."""
    model = MLP(64, 10, depth=2, width=32)
    model.load_state_dict(trained_mlp.state_dict())
    monitor = NoiseScaleMonitor(log_every_n_steps=2)
    fed, batches = [], []
    original = monitor.estimator.update
    monitor.estimator.update = lambda *a: (fed.append([float(v) for v in a]), original(*a))

    class Keep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.append([t.clone() for t in batch])

    trainer = pl.Trainer(max_steps=4, accumulate_grad_batches=3, callbacks=[monitor, Keep()], logger=False, **TRAINER)
    trainer.fit(_Frozen(model), datamodule=DigitsDataModule(batch_size=8, seed=0))
    assert len(fed) == 4 and len(batches) == 12

    def sq(xs, ys):
        model.zero_grad()
        F.cross_entropy(model(xs), ys).backward()
        return float(sum(p.grad.double().square().sum() for p in model.parameters()))

    for i, (sq_small, sq_big, b_small, b_big) in enumerate(fed):
        window = batches[3 * i: 3 * i + 3]
        assert (b_small, b_big) == (8, 24)
        assert sq_small == pytest.approx(sq(*window[0]), rel=1e-4)
        assert sq_big == pytest.approx(sq(torch.cat([b[0] for b in window]), torch.cat([b[1] for b in window])),
                                       rel=1e-4)


class _Noisy(pl.LightningModule):
    """Dropout (RNG) and BatchNorm (buffers): what the split batch's extra pass must put back."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _fit_noisy(callbacks, accumulate=1):
    pl.seed_everything(7, verbose=False)
    module = _Noisy()
    trainer = pl.Trainer(max_steps=12, callbacks=callbacks, logger=False, log_every_n_steps=3,
                         accumulate_grad_batches=accumulate, **TRAINER)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, seed=0))
    return module, torch.rand(3)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_is_unchanged_by_the_monitor(accumulate):
    """Weights, BatchNorm buffers, the gradients left behind and the global RNG after fit are bit-identical with
    and without the monitor (split: extra forward/backward with dropout and BatchNorm on every log step)."""
    bare, rng_bare = _fit_noisy([], accumulate)
    monitor = NoiseScaleMonitor(source="split")
    watched, rng_watched = _fit_noisy([monitor], accumulate)
    assert monitor.last.get("noise/estimates", 0) >= 3
    for (name, a), (_, b) in zip(bare.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in zip(bare.parameters(), watched.parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    assert torch.equal(rng_bare, rng_watched)


def test_no_host_read_between_log_steps():
    """One host read per log step (the packed averages), none on the other steps, with either source."""
    for accumulate, source in ((1, "split"), (2, "accumulation")):
        monitor = NoiseScaleMonitor(source=source)
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(max_steps=20, callbacks=[monitor], logger=False, log_every_n_steps=5,
                             accumulate_grad_batches=accumulate, **TRAINER)
        with HostReadCounter() as reads:
            trainer.fit(_Noisy(), datamodule=DigitsDataModule(batch_size=32, seed=0))
        assert reads.count == 4, reads.sites  # log steps 4, 9, 14, 19
        assert all("noise_scale.py" in site for site in reads.sites)


def test_monitor_moves_itself_first_and_checkpoints_its_averages(tmp_path):
    from lightning.pytorch.callbacks import Callback

    other = Callback()
    monitor = NoiseScaleMonitor(log_every_n_steps=2)
    trainer = pl.Trainer(max_steps=6, callbacks=[other, monitor], logger=False, default_root_dir=tmp_path,
                         **{**TRAINER, "enable_checkpointing": True})
    trainer.fit(_Noisy(), datamodule=DigitsDataModule(batch_size=32, seed=0))
    assert trainer.callbacks.index(monitor) == 0 and other in trainer.callbacks
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    state = ckpt["callbacks"][monitor.state_key]
    fresh = NoiseScaleMonitor()
    fresh.load_state_dict(state)
    assert fresh.estimator.read() == monitor.estimator.read()


def test_bad_input_is_named():
    with pytest.raises(BpkitConfigError, match="source"):
        NoiseScaleMonitor(source="allreduce")
    with pytest.raises(BpkitConfigError, match="DDPStrategy"):
        pl.Trainer(max_steps=1, callbacks=[NoiseScaleMonitor(source="ddp")], logger=False,
                   **TRAINER).fit(_Noisy(), datamodule=DigitsDataModule(batch_size=32))
    with pytest.raises(BpkitConfigError, match="ema"):
        NoiseScaleMonitor(ema=1.0)
    with pytest.raises(BpkitConfigError, match="parts"):
        NoiseScaleMonitor(parts=1)
    with pytest.raises(BpkitConfigError, match="every_n_steps"):
        NoiseScaleMonitor(every_n_steps=0)
    with pytest.raises(BpkitConfigError, match="accumulate_grad_batches"):
        pl.Trainer(max_steps=1, callbacks=[NoiseScaleMonitor(source="accumulation")], logger=False,
                   **TRAINER).fit(_Noisy(), datamodule=DigitsDataModule(batch_size=32))

    class Manual(_Noisy):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(BpkitConfigError, match="loss_fn"):
        pl.Trainer(max_steps=1, callbacks=[NoiseScaleMonitor()], logger=False,
                   **TRAINER).fit(Manual(), datamodule=DigitsDataModule(batch_size=32))


def test_recipe_is_in_both_folders_byte_identical():
    assert (ROOT / "recipes" / "critical_batch.yaml").read_bytes() == \
        (ROOT / "conf" / "recipe" / "critical_batch.yaml").read_bytes()


def test_ddp_source_keeps_a_users_comm_hook_and_falls_back_to_split():
    """DDP takes one communication hook per model: when one is there, the monitor warns and splits batches."""
    from types import SimpleNamespace

    class TakenDDP:
        def register_comm_hook(self, state, hook):
            raise RuntimeError("register_comm_hook or register_builtin_comm_hook can only be called once.")

    monitor = NoiseScaleMonitor()
    monitor.mode = "ddp"
    with pytest.warns(UserWarning, match="split batch"):
        monitor.on_fit_start(SimpleNamespace(strategy=SimpleNamespace(model=TakenDDP())), _Noisy())
    assert monitor.mode == "split"
