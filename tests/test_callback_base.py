"""What every bpkit callback shares (bpkit/callbacks/_base.py): the order-independent norm hand-off between
GradientMonitor and GradientClipping, alert throttling, `.alerts` across a resume, and the layering rules."""

from __future__ import annotations

import ast
import copy
import pathlib
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bpkit.alert import Alert
from bpkit.callbacks import GradientCheck, GradientClipping, GradientMonitor
from bpkit.callbacks._base import BpkitCallback
from tests._helpers import MemoryLogger, spy_on_shared_norms

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _data(n: int = 8, spikes=(5,)) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n * 8, 6, generator=g)
    y = x[:, :1].sin()
    for b in spikes:
        y[b * 8:(b + 1) * 8] *= 60.0
    return DataLoader(TensorDataset(x, y), batch_size=8)


class Net(pl.LightningModule):
    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == self.nan_at:
            x = x * float("nan")
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _trainer(callbacks, tmp_path, **kw) -> pl.Trainer:
    base = dict(accelerator="cpu", max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
                logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path), log_every_n_steps=1)
    base.update(kw)
    return pl.Trainer(callbacks=callbacks, **base)


@pytest.mark.parametrize("clipping_first", [False, True])
def test_monitor_sees_unclipped_gradients_and_clipping_reuses_its_norm_in_either_order(tmp_path, monkeypatch,
                                                                                       clipping_first):
    # reference: torch's own norm before clipping and torch's clip_grad_norm_, in a plain loop
    model = Net()
    ref, pre = copy.deepcopy(model.net), []
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for x, y in _data():
        opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        pre.append(float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)))
        opt.step()

    hits = spy_on_shared_norms(monkeypatch)
    monitor, clip = GradientMonitor(histograms=False), GradientClipping("norm", max_norm=0.5)
    logger = MemoryLogger()
    callbacks = [clip, monitor] if clipping_first else [monitor, clip]
    _trainer(callbacks, tmp_path, logger=logger).fit(model, _data())
    logged = logger.series("grad/norm_total")
    assert [logged[s] for s in sorted(logged)] == pytest.approx(pre, rel=1e-5)
    assert hits == [True] * 8  # the clipper used the monitor's norm on every step
    for p, q in zip(model.net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_a_step_skipped_by_a_monitor_placed_after_the_clipper_is_not_clipped_or_applied(tmp_path):
    model = Net(nan_at=2)
    before = copy.deepcopy(model.net)
    clip, monitor = GradientClipping("norm", max_norm=0.5), GradientMonitor(histograms=False)
    _trainer([clip, monitor], tmp_path, max_steps=3).fit(model, _data())
    assert monitor.skipped_steps == 1 and [a.kind for a in monitor.alerts] == ["nonfinite"]
    assert all(torch.isfinite(p).all() for p in model.net.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.net.parameters(), before.parameters()))


def _same(a: list[Alert], b: list[Alert]) -> bool:
    """Equal alerts (a NaN value equals a NaN value)."""
    key = lambda x: (x.kind, x.step, x.where, repr(x.value), repr(x.threshold), x.message)  # noqa: E731
    return len(a) == len(b) and all(key(p) == key(q) for p, q in zip(a, b))


def _resume(tmp_path, make_callback, model_fn, steps=(4, 8)):
    first = make_callback()
    trainer = _trainer([first], tmp_path, max_steps=steps[0])
    trainer.fit(model_fn(), _data())
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    second = make_callback()
    _trainer([second], tmp_path, max_steps=steps[1]).fit(model_fn(), _data(), ckpt_path=str(ckpt))
    return first, second


def test_gradient_monitor_alerts_survive_a_resume(tmp_path):
    first, second = _resume(tmp_path, lambda: GradientMonitor(histograms=False), lambda: Net(nan_at=1))
    assert [a.kind for a in first.alerts] == ["nonfinite"]
    assert _same(second.alerts[: len(first.alerts)], first.alerts)


def test_gradient_clipping_alerts_survive_a_resume(tmp_path):
    first, second = _resume(tmp_path, lambda: GradientClipping("skip"), lambda: Net(nan_at=2))
    assert first.alerts and first.alerts[0].kind == "nonfinite"
    assert _same(second.alerts[: len(first.alerts)], first.alerts)


class WrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 3  # wrong on purpose: the derivative of 2x is 2


class WrongWeightNet(Net):
    """The custom function sits on a parameter's path: its gradient is wrong."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x * WrongBackward.apply(self.scale)), y)


def test_gradient_check_alerts_survive_a_resume(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, second = _resume(tmp_path, lambda: GradientCheck(progress=False), WrongWeightNet)
    assert [a.kind for a in first.alerts] == ["gradcheck"]
    assert _same(second.alerts[: len(first.alerts)], first.alerts)


def _fake_trainer(tmp_path):
    return types.SimpleNamespace(loggers=[], default_root_dir=str(tmp_path), is_global_zero=True,
                                 log_every_n_steps=10)


def test_emit_warns_a_kind_once_per_ten_log_intervals_but_keeps_every_alert(tmp_path):
    class Probe(BpkitCallback):
        who, metric_prefix = "bpkit Probe", "probe"

    cb, trainer = Probe(), _fake_trainer(tmp_path)
    assert cb.log_interval(trainer) == 10
    alerts = [Alert("nonfinite", s, "w", float("nan"), 0.0, f"NaN at {s}") for s in (1, 2, 50, 101, 102)]
    alerts.append(Alert("spike", 3, "loss", 9.0, 1.0, "spike"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb.emit(trainer, alerts)
    warned = sorted(str(w.message) for w in caught)
    assert warned == sorted(str(a) for a in (alerts[0], alerts[3], alerts[5]))  # steps 1 and 101; the spike
    assert cb.alerts == alerts
    record = (tmp_path / "bpkit_record.jsonl").read_text().splitlines()
    assert sum('"type": "alert"' in line for line in record) == 6
    assert sum('"probe/alert/nonfinite"' in line for line in record) == 5
    state = cb.state_dict()
    other = Probe()
    other.load_state_dict(state)
    assert other.alerts == alerts


def test_optimizer_index_names_the_optimizer_or_its_lightning_wrapper():
    a, b = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1)
    trainer = types.SimpleNamespace(optimizers=[a, b])
    wrapped = types.SimpleNamespace(_optimizer=b)
    assert BpkitCallback.optimizer_index(trainer, a) == 0
    assert BpkitCallback.optimizer_index(trainer, b) == 1
    assert BpkitCallback.optimizer_index(trainer, wrapped) == 1
    assert BpkitCallback.several_optimizers(trainer)


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_callbacks_use_no_private_name_of_another_package():
    for path in sorted((ROOT / "bpkit" / "callbacks").glob("*.py")):
        tree = ast.parse(path.read_text())
        for module, names in _imports(path):
            if module.startswith("bpkit.") and not module.startswith("bpkit.callbacks"):
                assert not any(p.startswith("_") for p in module.split(".")[1:]), (path.name, module)
                assert not any(n.startswith("_") for n in names), (path.name, module, names)
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   for a in node.names if node.module and node.module.startswith("bpkit.")
                   and not node.module.startswith("bpkit.callbacks")}
        for node in ast.walk(tree):  # e.g. `probe._plans`, `norms._stack`: no reaching into an engine's internals
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                assert not (node.attr.startswith("_") and not node.attr.startswith("__")), (path.name, node.attr)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                    node.value.attr == "probe":
                assert not node.attr.startswith("_"), (path.name, node.attr)


def test_the_engines_import_no_lightning():
    engines = [ROOT / "bpkit" / d for d in ("stats", "detect", "clip", "gradcheck", "probe")]
    for path in [p for d in engines for p in d.glob("*.py")] + [ROOT / "bpkit" / "schedules.py"]:
        for module, _ in _imports(path):
            assert not module.startswith(("lightning", "pytorch_lightning", "bpkit.callbacks")), (path, module)


class NanLoss(Net):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == 1 else loss


def test_run_record_alerts_survive_a_resume(tmp_path):
    from bpkit.callbacks import RunRecord

    first, second = _resume(tmp_path, RunRecord, NanLoss)
    assert [(a.kind, a.where) for a in first.alerts] == [("nonfinite", "loss")]
    assert _same(second.alerts[: len(first.alerts)], first.alerts)
