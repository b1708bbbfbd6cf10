"""Odd models and inputs, through every callback at once: frozen and unused parameters, tied weights, sparse
gradients, modules returning tuples or dicts, an empty batch, a model without parameters. Each gives correct
statistics (checked against float64 references taken from the live gradients) or a clear message."""

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bpkit.callbacks import ActivationMonitor, GradientClipping, GradientMonitor
from bpkit.callbacks.run_record import RunRecord
from bpkit.errors import BpkitConfigError


class Capture(Logger):
    name, version = "capture", 0

    def __init__(self):
        super().__init__()
        self.by_step = {}

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.by_step.setdefault(step, {}).update(metrics)


class Reference(pl.Callback):
    """Placed before the bpkit callbacks: the gradients as they arrive, in float64 (dense), per step."""

    def __init__(self):
        self.grads = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads[trainer.global_step] = {
            n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).double().clone()
            for n, p in pl_module.named_parameters() if p.grad is not None}


class Lit(pl.LightningModule):
    def __init__(self, net, forward=None, opt="adam"):
        super().__init__()
        self.net, self._forward, self.opt = net, forward, opt

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self._forward(self.net, x) if self._forward else self.net(x)
        return nn.functional.mse_loss(out, y)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=0.1) if self.opt == "sgd" else torch.optim.Adam(params, lr=1e-2)


def data(x=None, y=None, n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g) if x is None else x
    y = torch.randn(len(x), 2, generator=g) if y is None else y
    return DataLoader(TensorDataset(x, y), batch_size=8)


def run(lit, loader, clip=("norm", {"max_norm": 0.05}), steps=2, extra=(), act_modules="auto"):
    torch.manual_seed(0)
    ref, cap = Reference(), Capture()
    monitor = GradientMonitor(log_every_n_steps=1)
    acts = ActivationMonitor(act_modules, log_every_n_steps=1, gradients=True)
    clipping = GradientClipping(clip[0], log_every_n_steps=1, **clip[1])
    cbs = [ref, *extra, monitor, acts, clipping, RunRecord(log_every_n_steps=1, gradient_flow_image=False)]
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, callbacks=cbs, logger=cap, log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir="/tmp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(lit, loader)
    messages = [str(w.message) for w in caught if "bpkit" in str(w.message)]
    return trainer, ref, cap, monitor, acts, messages


def check_norms(ref, cap, step, names):
    """grad/norm/<name> and clip/norm_pre against the float64 norms of the live gradients."""
    grads = ref.grads[step]
    logged = cap.by_step[step]  # logged at the step of the batch, as its train/loss
    for name in names:
        want = grads[name].norm().item() if name in grads else 0.0
        assert logged[f"grad/norm/{name}"] == pytest.approx(want, rel=1e-5, abs=1e-12), name
    total = torch.stack([g.norm() for g in grads.values()]).norm().item()
    assert logged["grad/norm_total"] == pytest.approx(total, rel=1e-5)
    assert cap.by_step[step]["clip/norm_pre"] == pytest.approx(total, rel=1e-5)


def test_frozen_and_unused_parameters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen, self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.used(torch.relu(self.frozen(x)))

    _, ref, cap, monitor, _, messages = run(Lit(Net()), data())
    logged = cap.by_step[1]
    assert not any("frozen" in k for k in logged if k.startswith(("grad/", "weight/")))
    assert logged["grad/norm/net.unused.weight"] == 0.0  # watched, but no gradient this step
    check_norms(ref, cap, 0, ["net.used.weight", "net.used.bias", "net.unused.weight"])
    assert not [a for a in monitor.alerts if a.kind == "vanishing"]  # no gradient is not a vanishing one
    assert not [m for m in messages if "unused" in m]


def test_tied_weights_are_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
            self.dec.weight = self.enc.weight
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.dec(torch.tanh(self.enc(x))))

    _, ref, cap, _, _, _ = run(Lit(Tied()), data())
    assert "grad/norm/net.enc.weight" in cap.by_step[1] and "grad/norm/net.dec.weight" not in cap.by_step[1]
    check_norms(ref, cap, 0, ["net.enc.weight", "net.head.weight"])  # the total counts the shared tensor once
    assert set(ref.grads[0]) == {"net.enc.weight", "net.head.weight", "net.head.bias"}


@pytest.mark.parametrize("clip", [("norm", {"max_norm": 0.05}), ("value", {"clip_value": 1e-3}),
                                  ("agc", {"exclude": None})], ids=["norm", "value", "agc"])
def test_sparse_gradients(clip):
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 2, sparse=True)

        def forward(self, idx):
            return self.emb(idx)

    idx = torch.tensor([1, 3, 3, 7, 1, 9, 11, 3] * 2)
    trainer, ref, cap, _, _, messages = run(Lit(Bag(), opt="sgd"), data(idx, torch.randn(16, 2)), clip=clip)
    assert trainer.global_step == 2
    grad = ref.grads[0]["net.emb.weight"]
    check_norms(ref, cap, 0, ["net.emb.weight"])
    assert cap.by_step[0]["grad/max/net.emb.weight"] == pytest.approx(grad.abs().max().item(), rel=1e-5)
    if clip[0] == "norm":
        assert cap.by_step[0]["clip/norm_post"] == pytest.approx(0.05, rel=1e-4)
    elif clip[0] == "value":
        assert cap.by_step[0]["clip/clipped"] == 1.0
        assert cap.by_step[0]["clip/norm_post"] <= 1e-3 * np.sqrt(grad.count_nonzero().item()) + 1e-9
    else:
        assert any("sparse gradients" in m and "not clipped" in m for m in messages), messages
        assert cap.by_step[0]["clip/norm_post"] == pytest.approx(cap.by_step[0]["clip/norm_pre"])


def test_sparse_gradient_histogram_counts_the_unstored_zeros():
    from bpkit.stats.histograms import LogHistogramSpec, log_histograms

    emb = nn.Embedding(20, 3, sparse=True)
    emb(torch.tensor([2, 5, 5])).sum().backward()
    sparse_rows = log_histograms([emb.weight.grad])
    dense_rows = log_histograms([emb.weight.grad.to_dense()])
    assert torch.equal(sparse_rows, dense_rows)
    assert LogHistogramSpec.split(sparse_rows[0].numpy())[1] == 20 * 3 - 2 * 3  # zeros: the rows never looked up


def test_modules_returning_tuples_and_dicts():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            y = self.lin(x)
            return y, {"aux": y * 2}

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            out, extra = self.pair(x)
            return {"out": out + 0 * extra["aux"], "n": 3}

    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                seen["y"] = pl_module.net.pair.lin(batch[0]).detach().double()

    _, ref, cap, _, acts, _ = run(Lit(Named(), forward=lambda net, x: net(x)["out"]), data(), extra=[Spy()],
                                  act_modules=["net", "net.pair", "net.pair.lin"])
    logged = cap.by_step[0]
    y = seen["y"]
    for module in ("net.pair", "net.pair.lin"):  # the tuple's first tensor is the Linear's output itself
        assert logged[f"act/mean/{module}"] == pytest.approx(y.mean().item(), rel=1e-5, abs=1e-7)
        assert logged[f"act/std/{module}"] == pytest.approx(y.std(correction=0).item(), rel=1e-5)
    # a dict output: its first floating tensor ("out"; the int 3 is not a tensor)
    assert logged["act/mean/net"] == pytest.approx(y.mean().item(), rel=1e-5, abs=1e-7)
    check_norms(ref, cap, 0, ["net.pair.lin.weight"])


def test_an_empty_batch_gives_zero_gradients_and_no_activation_statistics():
    class EmptySecond(Lit):
        def training_step(self, batch, batch_idx):
            x, y = batch
            if batch_idx == 1:
                x, y = x[:0], y[:0]  # e.g. a filter that dropped every sample: the loss is NaN, the gradients 0
            return nn.functional.mse_loss(self.net(x), y)

    lit = EmptySecond(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    trainer, ref, cap, monitor, _, messages = run(lit, data(n=24), steps=3)
    assert trainer.global_step == 3
    assert all(float(g.abs().max()) == 0.0 for g in ref.grads[1].values())
    assert cap.by_step[1]["grad/norm_total"] == 0.0 and cap.by_step[1]["grad/norm/net.0.weight"] == 0.0
    assert cap.by_step[1]["clip/norm_pre"] == 0.0 and cap.by_step[1]["clip/clipped"] == 0.0
    # no element went through the modules: step 1 has no act/ statistics (absent, not NaN); the others do
    assert not any(k.startswith("act/") for k in cap.by_step[1]) and "act/mean/net.0" in cap.by_step[2]
    assert all(np.isfinite(v) for m in cap.by_step.values() for k, v in m.items() if not k.startswith("train"))
    assert monitor.alerts == []
    # RunRecord names the NaN loss of the empty batch; nothing else is flagged
    assert [m for m in messages if "loss training_step returned is nan at step 1" not in m] == []


def test_a_model_without_parameters_gets_a_clear_message():
    class NoParams(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def training_step(self, batch, batch_idx):
            return self.act(batch[0]).sum().requires_grad_()

        def configure_optimizers(self):
            return None

    trainer, _, cap, monitor, acts, messages = run(NoParams(), data())
    assert trainer.global_step == 2  # Lightning steps without an optimizer
    assert [m for m in messages if "no trainable parameters" in m] == [
        "bpkit GradientMonitor: NoParams has no trainable parameters; there are no gradients to monitor and "
        "nothing is logged."]
    prefixes = {k.split("/")[0] for m in cap.by_step.values() for k in m}
    assert monitor.alerts == [] and "grad" not in prefixes and "act" in prefixes  # the ReLU is still watched
    with pytest.raises(BpkitConfigError, match=r"module='NoParams' is invalid: expected a module with parameters"):
        pl.Trainer(accelerator="cpu", max_steps=1, callbacks=[GradientClipping("agc")], logger=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False).fit(NoParams(), data())
    with pytest.raises(BpkitConfigError, match=r"include=\['w\*'\] is invalid: .*no trainable parameters"):
        pl.Trainer(accelerator="cpu", max_steps=1, callbacks=[GradientMonitor(include="w*")], logger=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False).fit(NoParams(), data())
