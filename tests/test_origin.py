"""Where a problem starts: the module that mixes the samples of a batch (GradientCheck's batch-independence check)
and the module where a NaN is born (GradientMonitor's non-finite skip). Each case is built in plain torch and its
ground truth asserted first."""

from __future__ import annotations

import torch
from torch import nn

from bpkit.gradcheck import check_batch_independence


class ViewInsteadOfTranspose(nn.Module):
    """``score`` then ``head``; between them the parent's forward reshapes (B, F) to (F, B) with ``view`` and back
    where a transpose was meant: every sample's output then depends on other samples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.score = nn.Linear(6, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.score(x))
        b, f = h.shape
        h = h.reshape(f, b).softmax(dim=1).reshape(b, f)  # the bug: should be h.t().softmax(1).t()
        return self.head(h)


class CentresOverTheBatch(nn.Module):
    def forward(self, x):
        return x - x.mean(dim=0, keepdim=True)


def _leaks_in_plain_torch(model: nn.Module, x: torch.Tensor) -> float:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x)[0].sum(), x)
    return float(g[1:].abs().max())


def test_the_mixing_between_two_modules_is_named():
    model, x = ViewInsteadOfTranspose().double(), torch.randn(8, 6, dtype=torch.float64)
    assert _leaks_in_plain_torch(model, x) > 1e-6  # ground truth: sample 0's output hears the others
    report = check_batch_independence(model, x)
    assert not report.passed
    assert report.origin.startswith("between `score` and `head`")
    assert "parent module's forward" in report.origin
    assert "where: between `score` and `head`" in str(report)


def test_a_module_that_mixes_samples_itself_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), CentresOverTheBatch(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    assert _leaks_in_plain_torch(model, x) > 1e-6
    report = check_batch_independence(model, x)
    assert report.origin.startswith("`1`: its input keeps samples apart, its output mixes them")


def test_the_mixing_before_the_first_module_is_named():
    class Prelude(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.Linear(4, 2)

        def forward(self, x):
            return self.rnn(x.reshape(x.shape[1], x.shape[0]).t().contiguous().reshape(x.shape))

    model, x = Prelude().double(), torch.randn(5, 4, dtype=torch.float64)
    assert _leaks_in_plain_torch(model, x) > 1e-6
    assert check_batch_independence(model, x).origin.startswith("before `rnn`")


def test_a_correct_model_has_no_origin():
    torch.manual_seed(0)
    report = check_batch_independence(nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2)), torch.randn(6, 5))
    assert report.passed and report.origin is None


# ---------------------------------------------------------------- where a NaN is born

import copy  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from bpkit import GradientProbe  # noqa: E402
from bpkit.callbacks import GradientCheck, GradientMonitor  # noqa: E402


class UnitNorm(nn.Module):
    """Scales each row to unit length, with the epsilon outside the square root: finite forward, but the derivative
    of sqrt at 0 is infinite, so a blank record's gradient is NaN."""

    def forward(self, x):
        return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-6)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh())
        self.feat = UnitNorm()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.feat(self.stem(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _records(blank_batch: int = 2, blank_row: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 8, generator=g), torch.randint(0, 3, (48,), generator=g)
    x[blank_batch * 8 + blank_row] = 0.0  # one blank record
    return x, y


def test_a_nan_born_in_the_backward_of_sqrt_is_traced_to_its_module_and_sample(tmp_path):
    x, y = _records()
    # ground truth in plain torch: the loss of that batch is finite, its gradient is not, and only the blank record
    # makes it so
    model = Classifier()
    F.cross_entropy(model(x[16:24]), y[16:24]).backward()
    assert torch.isfinite(F.cross_entropy(model(x[16:24]), y[16:24]))
    assert not torch.isfinite(model.stem[0].weight.grad).all()
    model.zero_grad()
    keep = torch.arange(8) != 5
    F.cross_entropy(model(x[16:24][keep]), y[16:24][keep]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    # reference: a plain loop that skips that step
    ref = Classifier()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for b in range(6):
        opt.zero_grad()
        F.cross_entropy(ref(x[b * 8:(b + 1) * 8]), y[b * 8:(b + 1) * 8]).backward()
        if b != 2:
            opt.step()

    model, monitor = Classifier(), GradientMonitor(histograms=False)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[monitor], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="backward pass of `feat`"):
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    (alert,) = [a for a in monitor.alerts if a.kind == "nonfinite"]
    assert alert.step == 2 and alert.where.startswith("stem.0.weight")  # the tensors, input side first
    assert alert.origin == "feat (backward: non-finite input gradient from a finite output gradient; samples 5)"
    assert monitor.skipped_steps == 1
    for p, q in zip(model.parameters(), ref.parameters()):  # the replay changed nothing
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    record = (tmp_path / "bpkit_record.jsonl").read_text()
    assert '"origin": "feat (backward' in record


class LogOfInput(nn.Module):
    def forward(self, x):
        return torch.log(x)


def test_a_nan_born_in_a_forward_pass_names_the_module_and_the_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 4), LogOfInput(), nn.Linear(4, 1))
    x = torch.randn(6, 4)
    with torch.no_grad():  # ground truth: sample 3 reaches the log with a negative value
        h = model[2](model[1](model[0](x)))
    h_bad = (h <= 0).any(dim=1).nonzero().flatten().tolist()
    assert h_bad, "the test needs a sample with a non-positive input to the log"
    probe = GradientProbe(model)
    loss = model(x).sum()
    loss.backward()
    calls = []

    def replay():
        calls.append(1)
        return model(x).sum()

    assert probe.step(0, replay=replay) is False and calls == [1]
    (alert,) = probe.alerts
    assert alert.origin == f"3 (forward: non-finite output from finite inputs; samples {', '.join(map(str, h_bad))})"
    assert "forward pass of `3`" in alert.message


def test_a_healthy_step_never_replays():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    probe, calls = GradientProbe(model, log_every_n_steps=2), []
    for step in range(4):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        assert probe.step(step, replay=lambda: calls.append(1))
        model.zero_grad()
    assert calls == []


class MixingModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = ViewInsteadOfTranspose()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_gradient_check_names_where_samples_mix(tmp_path):
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    check = GradientCheck(batch_independence=True, progress=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, callbacks=[check], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="between `net.score` and `net.head`"):
        trainer.fit(MixingModule(), DataLoader(TensorDataset(x, y), batch_size=8))
    (alert,) = check.alerts
    assert alert.where == "batch" and alert.origin.startswith("between `net.score` and `net.head`")


def test_the_replay_leaves_torchmetrics_and_logging_alone(tmp_path):
    import torchmetrics

    class Counted(Classifier):
        def __init__(self):
            super().__init__()
            self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3)
            self.calls = 0

        def training_step(self, batch, batch_idx):
            self.calls += 1
            x, y = batch
            self.acc.update(self(x).argmax(1), y)
            return super().training_step(batch, batch_idx)

    x, y = _records()
    model, logged = Counted(), []
    monitor = GradientMonitor(histograms=False)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[monitor], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning):
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    assert model.calls == 7  # 6 batches and one replay of the NaN batch
    assert model.acc._update_count == 6  # the replay's update was taken back
    assert monitor.alerts[0].origin.startswith("feat (backward")
    off = GradientMonitor(histograms=False, locate_nonfinite=False)
    again = Counted()
    pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[off], logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False,
               default_root_dir=str(tmp_path)).fit(again, DataLoader(TensorDataset(x, y), batch_size=8))
    assert again.calls == 6 and off.alerts[0].origin is None
