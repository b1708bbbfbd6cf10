"""GradientCheck dropped into ordinary, correct Lightning modules: it never kills or changes the run.

Each module is written the way Lightning's examples write them. For each: ``fit`` completes, the check
either passes or is skipped with one warning that says why and how to check by hand, no false ``gradcheck``
alert is raised, and training is bit for bit the run without the callback.
"""

from __future__ import annotations

import csv
import json
import os
import random
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bpkit.callbacks import GradientCheck
from bpkit.callbacks._sink import record_path
from bpkit.gradcheck import GradcheckUnsupported, check_gradients
from bpkit.tbptt import TBPTTModule
from tests.test_gradcheck import _CustomLinear


def _loader(n=32, d=8, k=3, batch_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)),
                      batch_size=batch_size)


def _fit(module, loader=None, callbacks=(), tmp_path=None, **kwargs):
    args = dict(accelerator="cpu", max_steps=2, enable_progress_bar=False, enable_model_summary=False,
                logger=False, enable_checkpointing=False,
                default_root_dir=str(tmp_path) if tmp_path is not None else None)
    args.update(kwargs)
    trainer = pl.Trainer(callbacks=list(callbacks), **args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader if loader is not None else _loader())
    return trainer, [str(w.message) for w in caught if "bpkit" in str(w.message)]


def _record(trainer):
    with open(record_path(trainer), encoding="utf-8") as f:
        return [json.loads(line) for line in f if '"gradcheck"' in line]


class _Base(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CastLit(_Base):
    """``x = x.float()`` in training_step: the float64 copy's input turns float32."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.float()
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss


class OneArgLit(_Base):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)


class DictLit(_Base):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": F.cross_entropy(self(x), y), "n": len(x)}


class ZerosLit(pl.LightningModule):
    """Like neuralforecast's TFT: ``torch.zeros(..., dtype=torch.float32)`` built inside forward."""

    def __init__(self, bad_factor=None):
        super().__init__()
        self.lstm = nn.LSTM(8, 6, batch_first=True)
        self.head = _CustomLinear(6, 3, bad_factor) if bad_factor is not None else nn.Linear(6, 3)

    def forward(self, x):
        h0 = torch.zeros(1, x.shape[0], 6, dtype=torch.float32)
        c0 = torch.zeros(1, x.shape[0], 6, dtype=torch.float32)
        out, _ = self.lstm(x.view(x.shape[0], 2, 4).repeat(1, 1, 2), (h0, c0))
        return self.head(out[:, -1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class GAN(pl.LightningModule):
    """Lightning's GAN example, shrunk: manual optimization, two optimizers."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.steps = 0

    def training_step(self, batch):
        imgs, _ = batch
        opt_g, opt_d = self.optimizers()
        self.steps += 1
        z = torch.randn(imgs.shape[0], 4)
        valid = torch.ones(imgs.size(0), 1)
        self.toggle_optimizer(opt_g)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self.generator(z)), valid)
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        real = F.binary_cross_entropy_with_logits(self.discriminator(imgs), valid)
        fake = F.binary_cross_entropy_with_logits(self.discriminator(self.generator(z).detach()), 0 * valid)
        self.manual_backward((real + fake) / 2)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)

    def configure_optimizers(self):
        return [torch.optim.Adam(self.generator.parameters(), 1e-3), torch.optim.Adam(self.discriminator.parameters(),
                                                                                       1e-3)]


class FrozenLit(_Base):
    """Every parameter frozen; the step only tracks an average in a buffer (no optimizer)."""

    def __init__(self):
        super().__init__()
        self.net.requires_grad_(False)
        self.register_buffer("mean_loss", torch.zeros(()))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.mean_loss.mul_(0.9).add_(0.1 * F.cross_entropy(self(x), y))
        return None

    def configure_optimizers(self):
        return None


class LitLSTM(TBPTTModule):
    """The TBPTTModule docstring's example; ``bad_factor`` plants a wrong backward in the head."""

    def __init__(self, bad_factor=None):
        super().__init__()
        self.truncated_bptt_steps = 4
        self.lstm = nn.LSTM(2, 5, batch_first=True)
        self.head = _CustomLinear(5, 1, bad_factor) if bad_factor is not None else nn.Linear(5, 1)

    def training_step(self, batch, batch_idx, hiddens):
        x, y = batch
        out, hiddens = self.lstm(x, hiddens)
        loss = F.mse_loss(self.head(out.reshape(-1, 5)).view(*out.shape[:-1], 1), y)
        return {"loss": loss, "hiddens": hiddens}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)


def _seq_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 10, 2, generator=g)
    return DataLoader(TensorDataset(x, x.cumsum(1) / 10), batch_size=4)


class RandomLit(pl.LightningModule):
    """BatchNorm, dropout, and Python/NumPy/torch randomness inside training_step (augmentation)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x * (1 + 0.1 * random.random()) + 0.05 * torch.from_numpy(np.random.randn(*x.shape)).to(x.dtype)
        x = x + 0.01 * torch.randn_like(x)
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class OwnRngLit(_Base):
    """Randomness from a generator of its own: the check cannot re-seed it."""

    def __init__(self):
        super().__init__()
        self.rng = np.random.default_rng(0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x + torch.from_numpy(self.rng.normal(size=x.shape)).to(x.dtype)
        return F.cross_entropy(self(x), y)


class Env:
    """A toy environment: every step advances a counter and draws from NumPy."""

    def __init__(self):
        self.steps = 0
        self.state = np.zeros(4, dtype=np.float32)

    def step(self, action):
        self.steps += 1
        self.state = (self.state + np.random.randn(4).astype(np.float32) * 0.1 + action).astype(np.float32)
        return self.state.copy(), float(-abs(self.state).sum())


class DQNLit(pl.LightningModule):
    """Lightning's DQN example, shrunk: it plays a step in the environment, fills a replay buffer, learns from the
    buffer and syncs a target network every step."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        self.target_net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        self.env = Env()
        self.buffer = []

    def training_step(self, batch, batch_idx):
        state = torch.as_tensor(self.env.state)
        action = int(self.net(state).argmax()) if random.random() > 0.3 else random.randrange(2)
        next_state, reward = self.env.step(action)
        self.buffer.append((state, action, reward, next_state))
        s = torch.stack([torch.as_tensor(b[0]) for b in self.buffer[-8:]]).to(batch[0].dtype)
        a = torch.tensor([b[1] for b in self.buffer[-8:]])
        r = torch.tensor([b[2] for b in self.buffer[-8:]], dtype=s.dtype)
        s2 = torch.stack([torch.as_tensor(b[3]) for b in self.buffer[-8:]]).to(s.dtype)
        q = self.net(s).gather(1, a[:, None])[:, 0]
        with torch.no_grad():
            target = r + 0.9 * self.target_net(s2).max(1).values
        loss = F.mse_loss(q, target)
        self.target_net.load_state_dict(self.net.state_dict())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), 1e-3)


def _skips(messages, why):
    skips = [m for m in messages if m.startswith("bpkit GradientCheck: skipped at step 0")]
    assert len(skips) == 1, messages
    assert why in skips[0] and "To check by hand: bpkit.gradcheck.check_gradients(" in skips[0], skips[0]
    return skips[0]


def _no_alert(check, messages):
    assert check.alerts == [] and not any("bpkit gradcheck @" in m for m in messages), messages


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --- modules the check now handles ----------------------------------------------------------------

def test_cast_in_training_step_is_checked_in_float64(tmp_path):
    # x.float() inside the check becomes x.double(): the whole step runs in float64, no fallback needed
    check = GradientCheck(on_failure="raise")
    trainer, messages = _fit(CastLit(), callbacks=[check], tmp_path=tmp_path)
    assert trainer.global_step == 2
    (step, report), = check.reports
    assert report.passed and report.dtype == "float64" and len(report.params) == 4, str(report)
    assert not any("ran in float32" in m for m in messages), messages
    _no_alert(check, messages)
    (entry,) = _record(trainer)
    assert entry["data"]["dtype"] == "float64"


def test_cast_in_training_step_with_a_wrong_backward_is_caught_in_float64():
    class BadCast(CastLit):
        def __init__(self):
            super().__init__()
            self.net[-1] = _CustomLinear(self.net[-1].in_features, self.net[-1].out_features, 1.5)

    check = GradientCheck()
    _fit(BadCast(), callbacks=[check])
    (_, report), = check.reports
    assert report.dtype == "float64" and report.failed, str(report)
    assert all(not p.inconclusive for p in report.params)


@pytest.mark.parametrize("module", [OneArgLit, DictLit], ids=["one-arg", "dict"])
def test_one_argument_and_dict_training_steps_are_checked(module):
    check = GradientCheck(on_failure="raise")
    _, messages = _fit(module(), callbacks=[check])
    (_, report), = check.reports
    assert report.passed and report.dtype == "float64" and len(report.params) == 4, str(report)
    assert messages == []


def test_float32_zeros_in_forward_are_made_float64_and_checked_without_false_alerts():
    check = GradientCheck()
    _, messages = _fit(ZerosLit(), callbacks=[check])
    (_, report), = check.reports
    assert report.dtype == "float64" and report.passed and report.failed == [], str(report)
    assert len(report.params) == 6 and not report.inconclusive
    _no_alert(check, messages)


def test_float32_zeros_in_forward_with_a_wrong_backward_is_caught():
    check = GradientCheck()
    _, messages = _fit(ZerosLit(bad_factor=1.5), callbacks=[check])
    (_, report), = check.reports
    assert report.dtype == "float64" and "head.weight" in report.failed, str(report)
    assert len(check.alerts) == 1 and "head.weight" in check.alerts[0].where


def test_tbptt_module_checks_its_first_chunk():
    check = GradientCheck(on_failure="raise")
    trainer, messages = _fit(LitLSTM(), _seq_loader(), callbacks=[check], max_steps=3)
    (_, report), = check.reports
    assert report.passed and len(report.params) == 6, str(report)
    assert "checked chunk 1 of 3" in report.notes[0]
    assert messages == [] and trainer.global_step == 3


def test_tbptt_module_with_a_wrong_backward_is_caught():
    check = GradientCheck()
    _, messages = _fit(LitLSTM(bad_factor=1.2), _seq_loader(), callbacks=[check], max_steps=1)
    (_, report), = check.reports
    assert "head.weight" in report.failed and report.suspect == "head.weight", str(report)
    assert len(check.alerts) == 1


# --- modules it must skip, with one warning ---------------------------------------------------------

def test_manual_optimization_gan_is_skipped_and_untouched(tmp_path):
    pl.seed_everything(0)
    plain = GAN()
    _fit(plain, max_steps=4)
    pl.seed_everything(0)
    checked = GAN()
    check = GradientCheck(on_failure="raise")
    trainer, messages = _fit(checked, callbacks=[check], max_steps=4, tmp_path=tmp_path)
    _skips(messages, "manual optimization (automatic_optimization=False)")
    assert check.reports == [] and check.skipped[0][0] == 0
    assert checked.steps == plain.steps == 2 and trainer.global_step == 4  # 2 batches x 2 optimizers
    _same_state(plain, checked)
    (entry,) = _record(trainer)
    assert entry["data"]["skipped"].startswith("manual optimization") and "check_gradients" in entry["data"]["hint"]


def test_no_trainable_parameters_is_skipped():
    check = GradientCheck()
    trainer, messages = _fit(FrozenLit(), callbacks=[check], max_steps=-1, max_epochs=1)
    _skips(messages, "no trainable parameters")
    assert trainer.current_epoch == 1


def test_own_generator_randomness_is_detected_and_skipped():
    check = GradientCheck(on_failure="raise", every_n_steps=1)
    _, messages = _fit(OwnRngLit(), callbacks=[check])
    _skips(messages, "training_step is not a deterministic function of the weights")  # warned once
    assert [s for s, _ in check.skipped] == [0, 1] and check.reports == []
    _no_alert(check, messages)


def test_dqn_like_step_is_skipped_and_its_environment_and_buffer_are_untouched():
    def run(callbacks):
        pl.seed_everything(0)
        model = DQNLit()
        trainer, messages = _fit(model, callbacks=callbacks, max_steps=3)
        return model, messages

    plain, _ = run([])
    check = GradientCheck(on_failure="raise")
    checked, messages = run([check])
    _skips(messages, "not a deterministic function of the weights (dropout, randomness, environment interaction?)")
    _no_alert(check, messages)
    assert checked.env.steps == plain.env.steps == 3 and len(checked.buffer) == len(plain.buffer) == 3
    assert np.array_equal(checked.env.state, plain.env.state)
    _same_state(plain, checked)


def test_training_step_that_only_runs_in_float32_is_checked_in_float32():
    class Picky(_Base):
        def training_step(self, batch, batch_idx):
            x, y = batch
            if x.dtype != torch.float32:
                raise RuntimeError("this step only runs on float32 inputs")
            return F.cross_entropy(self(x), y)

    check = GradientCheck(on_failure="raise")
    _, messages = _fit(Picky(), callbacks=[check])
    assert check.reports[0][1].dtype == "float32" and check.reports[0][1].passed
    _no_alert(check, messages)


def test_step_failing_on_the_copy_in_every_dtype_is_skipped_not_raised():
    class SelfAware(_Base):
        def __init__(self):
            super().__init__()
            self.me = id(self)

        def training_step(self, batch, batch_idx):
            if id(self) != self.me:
                raise RuntimeError("this step refuses to run on a copy")
            x, y = batch
            return F.cross_entropy(self(x), y)

    check = GradientCheck(on_failure="raise")
    trainer, messages = _fit(SelfAware(), callbacks=[check])
    _skips(messages, "this step refuses to run on a copy")
    assert trainer.global_step == 2


def test_module_that_cannot_be_copied_is_skipped():
    import threading

    class Locked(DictLit):
        def __init__(self):
            super().__init__()
            self.lock = threading.Lock()

    _, messages = _fit(Locked(), callbacks=[GradientCheck(on_failure="raise")])
    _skips(messages, "the module cannot be copied")


# --- randomness and state: training is bit for bit the run without the check -------------------------

def test_training_with_randomness_and_batchnorm_is_bit_identical():
    def run(callbacks):
        pl.seed_everything(0)
        model = RandomLit()
        _fit(model, callbacks=callbacks, max_steps=4)
        return model, (torch.rand(3), random.random(), np.random.rand(3))

    (plain, draws_plain), (checked, draws_checked) = run([]), run([check := GradientCheck(every_n_steps=2)])
    assert [s for s, _ in check.reports] == [0, 2]
    assert all(r.passed for _, r in check.reports), str(check.reports[0][1])  # re-seeded: the check is valid
    _same_state(plain, checked)
    assert int(checked.net[1].num_batches_tracked) == 4
    assert torch.equal(draws_plain[0], draws_checked[0]) and draws_plain[1] == draws_checked[1]
    assert np.array_equal(draws_plain[2], draws_checked[2])


def test_check_gradients_restores_python_and_numpy_rng():
    random.seed(1)
    np.random.seed(1)
    expected = (random.random(), np.random.rand())
    random.seed(1)
    np.random.seed(1)
    check_gradients(RandomLit(), next(iter(_loader())), n_directions=1)
    assert (random.random(), np.random.rand()) == expected


def test_nondeterminism_is_an_explained_error_outside_the_trainer():
    with pytest.raises(GradcheckUnsupported, match=r"not a deterministic function of the weights.*To check by hand"):
        check_gradients(OwnRngLit(), next(iter(_loader())))


# --- time budget ---------------------------------------------------------------------------------

class DeepLit(_Base):
    def __init__(self, depth=12):
        super().__init__()
        self.net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(depth)], nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


def test_time_budget_checks_the_most_informative_tensors_and_reports_coverage(tmp_path):
    check = GradientCheck(max_seconds=1e-4)  # room for the one tensor that is always checked
    trainer, messages = _fit(DeepLit(), callbacks=[check], tmp_path=tmp_path,
                             logger=pl.loggers.CSVLogger(str(tmp_path)))
    (_, report), = check.reports
    assert report.passed and report.total_tensors == 26 and report.checked_tensors == 1
    assert [p.name for p in report.params] == ["net.0.0.weight"]  # the first tensor sees every input gradient
    assert report.unchecked[0] == "net.0.0.bias" and len(report.unchecked) == 25
    assert any("checked 1 of 26 tensors (64 of 891 elements)" in m and "the rest were not checked" in m
               and "max_seconds" in m for m in messages), messages
    rows = [e for e in _record(trainer) if e["type"] == "gradcheck"]
    assert rows[0]["data"]["checked_tensors"] == 1 and rows[0]["data"]["total_tensors"] == 26
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv"), encoding="utf-8") as f:
        metrics = [r for r in csv.DictReader(f) if r.get("gradcheck/checked_tensors")]
    assert float(metrics[0]["gradcheck/checked_tensors"]) == 1 and float(metrics[0]["gradcheck/total_tensors"]) == 26


def test_time_budget_order_spreads_across_depth():
    from bpkit.gradcheck.check import informative_order

    order = informative_order(26)
    assert order[:4] == [0, 25, 12, 6] and sorted(order) == list(range(26))
    model = DeepLit()
    full = check_gradients(model, next(iter(_loader())), max_seconds=None)
    assert full.complete and full.checked_tensors == 26 and "checked 26 of 26 tensors" in full.coverage
    # with a budget that is not reached, the two passes (gradient direction, then random ones) add up to the same
    budgeted = check_gradients(model, next(iter(_loader())), max_seconds=600.0)
    assert [(p.name, p.probes) for p in budgeted.params] == [(p.name, 3) for p in full.params]
    assert [p.rel_error for p in budgeted.params] == pytest.approx([p.rel_error for p in full.params], rel=1e-6)


def test_default_budget_is_a_few_seconds_and_validated():
    from bpkit import BpkitConfigError

    assert GradientCheck().max_seconds == 5.0 and GradientCheck(max_seconds=None).max_seconds is None
    for bad in (0, -1.0, "soon", float("nan")):
        with pytest.raises(BpkitConfigError, match="max_seconds="):
            GradientCheck(max_seconds=bad)


def test_float32_round_off_is_inconclusive_not_a_failure():
    # a large constant in the loss drowns float32 finite differences in round-off; float64 decides: all right
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    batch = next(iter(_loader()))
    loss = lambda out, y: F.cross_entropy(out, y) + 3000.0  # noqa: E731
    r32 = check_gradients(net, batch, loss_fn=loss, dtype=torch.float32, n_directions=2)
    assert r32.passed and r32.failed == [] and r32.inconclusive, str(r32)
    assert all("inconclusive in float32" in p.reason for p in r32.params if p.inconclusive)
    assert check_gradients(net, batch, loss_fn=loss, n_directions=2).passed
