"""GradientCheck callback with the real Lightning Trainer."""

from __future__ import annotations

import csv
import json
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bpkit import Alert, BpkitConfigError
from bpkit.callbacks import GradientCheck
from bpkit.callbacks._sink import RECORD_NAME
from bpkit.data import DigitsDataModule
from bpkit.gradcheck import GradcheckError
from bpkit.models import MLP, RNN, ResNet
from bpkit.task import BackpropTask
from tests.hostreads import HostReadCounter
from tests.test_gradcheck import _CustomLinear, _SeqHead



class Lit(pl.LightningModule):
    def __init__(self, bad_factor: float | None = None, dropout: float = 0.0, width: int = 16):
        super().__init__()
        middle = _CustomLinear(width, width, bad_factor) if bad_factor is not None else nn.Linear(width, width)
        self.net = nn.Sequential(nn.Linear(8, width), nn.Tanh(), middle, nn.Tanh(), nn.Dropout(dropout),
                                 nn.Linear(width, 3))
        self.calls = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MixingLit(Lit):
    """Right gradients, but sample outputs depend on other samples' inputs."""

    def __init__(self):
        super().__init__()
        self.seq = _SeqHead(buggy=True)

    def forward(self, x):
        return self.seq(torch.cat([x, x[:, :2]], 1).view(x.shape[0], 5, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


def _loader(n=64, batch_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=True)


def _trainer(tmp_path=None, callbacks=(), max_steps=3, **kwargs):
    defaults = dict(accelerator="cpu", max_steps=max_steps, enable_progress_bar=False, enable_model_summary=False,
                    logger=CSVLogger(str(tmp_path)) if tmp_path is not None else False, enable_checkpointing=False,
                    default_root_dir=str(tmp_path) if tmp_path is not None else None)
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def _record(trainer):
    path = os.path.join(trainer.log_dir, RECORD_NAME)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_checks_at_start_logs_table_and_scalars(tmp_path):
    pl.seed_everything(0)
    check = GradientCheck()
    trainer = _trainer(tmp_path, [check], max_steps=3)
    trainer.fit(Lit(dropout=0.3), _loader())
    assert [step for step, _ in check.reports] == [0]
    report = check.reports[0][1]
    assert report.passed, str(report)
    assert [p.name for p in report.params] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias",
                                               "net.5.weight", "net.5.bias"]
    assert check.alerts == []
    entries = [e for e in _record(trainer) if e["type"] == "gradcheck"]
    assert len(entries) == 1 and entries[0]["step"] == 0 and entries[0]["data"]["passed"] is True
    assert [p["name"] for p in entries[0]["data"]["params"]] == [p.name for p in report.params]
    with open(os.path.join(trainer.log_dir, "metrics.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    values = [float(r["gradcheck/max_rel_error"]) for r in rows if r.get("gradcheck/max_rel_error")]
    assert values == [pytest.approx(report.max_rel_error)]


def test_training_is_unchanged_by_the_check():
    def run(with_check: bool):
        pl.seed_everything(0)
        model = Lit(dropout=0.5)
        callbacks = [GradientCheck(every_n_steps=2, batch_independence=True)] if with_check else []
        _trainer(None, callbacks, max_steps=5).fit(model, _loader())
        return model

    plain, checked = run(False), run(True)
    for (name, a), (_, b) in zip(plain.state_dict().items(), checked.state_dict().items()):
        assert torch.equal(a, b), name
    assert checked.calls == plain.calls == 5  # the copy's training_step calls never reach the module


def test_every_n_steps():
    check = GradientCheck(every_n_steps=2, n_directions=1)
    _trainer(None, [check], max_steps=5).fit(Lit(), _loader())
    assert [step for step, _ in check.reports] == [0, 2, 4]


def test_planted_bug_warns_with_an_alert_and_training_goes_on(tmp_path):
    check = GradientCheck()
    trainer = _trainer(tmp_path, [check], max_steps=3)
    with pytest.warns(UserWarning, match=r"bpkit gradcheck @ step 0.*look first at net.2.weight: autograd is 1.1"):
        trainer.fit(Lit(bad_factor=1.1), _loader())
    assert trainer.global_step == 3
    (alert,) = check.alerts
    assert alert.kind == "gradcheck" and alert.step == 0
    assert alert.where.split(", ") == ["net.0.weight", "net.0.bias", "net.2.weight"]
    assert alert.value > alert.threshold == 1e-3
    alerts = [e["data"] for e in _record(trainer) if e["type"] == "alert"]
    assert alerts == [alert.to_dict()]


def test_on_failure_raise():
    check = GradientCheck(on_failure="raise")
    with pytest.warns(UserWarning, match="bpkit gradcheck"), \
            pytest.raises(GradcheckError, match=r"(?s)failed at step 0.*net.2.weight.*sign error"):
        _trainer(None, [check], max_steps=3).fit(Lit(bad_factor=-1.0), _loader())


def test_batch_independence_alert():
    check = GradientCheck(batch_independence=True)
    with pytest.warns(UserWarning, match="batch independence failed"):
        _trainer(None, [check], max_steps=1).fit(MixingLit(), _loader())
    (alert,) = check.alerts
    assert alert.where == "batch" and alert.value > 0
    assert all(p.passed for p in check.reports[0][1].params)


def test_no_host_reads_on_steps_without_a_check():
    reads = HostReadCounter(enabled=False)

    class Arm(Callback):
        def on_train_batch_end(self, trainer, *args):
            reads.enabled = True  # count from the end of the checked step 0 on

    check = GradientCheck()
    with reads:
        _trainer(None, [check, Arm()], max_steps=4).fit(Lit(), _loader())
    assert len(check.reports) == 1
    assert reads.count == 0, reads.sites


def test_state_dict_round_trip():
    check = GradientCheck()
    check.alerts.append(Alert("gradcheck", 3, "net.2.weight", 0.1, 1e-3, "wrong"))
    check._last_step = 3
    other = GradientCheck()
    other.load_state_dict(json.loads(json.dumps(check.state_dict())))
    assert other.alerts == check.alerts and other._last_step == 3
    assert GradientCheck(every_n_steps=5).state_key != GradientCheck().state_key


def test_progress_bar_when_asked(capsys):
    check = GradientCheck(progress=True, n_directions=1)
    _trainer(None, [check], max_steps=1).fit(Lit(), _loader())
    assert "Gradient check" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    ({"on_failure": "explode"}, r"on_failure='explode' is invalid: expected one of warn, raise"),
    ({"every_n_steps": 0}, r"every_n_steps=0 is invalid: expected an integer >= 1"),
    ({"mode": "exact"}, r"mode='exact' is invalid"),
    ({"eps": 0}, r"eps=0 is invalid: expected a number > 0"),
    ({"dtype": "float128"}, r"dtype='float128' is invalid: expected one of float64, float32"),
    ({"progress": "sometimes"}, r"progress='sometimes' is invalid"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(BpkitConfigError, match=match):
        GradientCheck(**kwargs)


def test_params_glob_matching_nothing_fails_at_the_first_batch():
    with pytest.raises(BpkitConfigError, match=r"params='encoder\.\*' is invalid: .*net\.0\.weight"):
        _trainer(None, [GradientCheck(params="encoder.*")], max_steps=1).fit(Lit(), _loader())


def test_hydra_config_adds_the_callback(tmp_path):
    from tests._hydra import compose_train

    cfg = compose_train(["callbacks=[default,gradient_check]", "callbacks.gradient_check.on_failure=raise"],
                        str(tmp_path))
    assert {"checkpoint", "run_record", "gradient_check"} <= set(cfg.callbacks)
    check = instantiate(cfg.callbacks.gradient_check)
    assert isinstance(check, GradientCheck) and check.on_failure == "raise" and check.mode == "directional"


@pytest.mark.parametrize("layout, make", [
    ("flat", lambda: MLP(64, 10, depth=3, width=32, norm="batch", dropout=0.2)),
    ("sequence", lambda: RNN("lstm", input_size=8, hidden_size=16, out_features=10)),
    ("image", lambda: ResNet(1, 10, depth=2, width=4)),
], ids=["mlp", "lstm", "resnet"])
def test_backprop_task_on_digits(layout, make):
    pl.seed_everything(0)
    task = BackpropTask(make(), "cross_entropy", num_classes=10, metrics=("acc",))
    check = GradientCheck(n_directions=2)
    _trainer(None, [check], max_steps=2, limit_val_batches=0).fit(task, DigitsDataModule(batch_size=16,
                                                                                         layout=layout))
    (step, report), = check.reports
    assert report.passed, str(report)
    assert report.params[0].name.startswith("model.") and len(report.params) == len(list(task.parameters()))
