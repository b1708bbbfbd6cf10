"""Truncated BPTT: parameters after training equal hand-written float64 reference loops, plus the 1.x contract."""

from __future__ import annotations

import copy
import functools
from collections import namedtuple

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from bpkit.errors import BpkitConfigError
from bpkit.models import RNN
from bpkit.tbptt import TBPTTModule, TBPTTTask, detach_hiddens, split_batch
from tests.hostreads import HostReadCounter

T, B, K = 10, 3, 4



def trainer(**kwargs) -> pl.Trainer:
    base = dict(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False)
    base.update(kwargs)
    return pl.Trainer(**base)


def seq_data(n=B, t=T, features=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, features, generator=g)
    y = torch.randn(n, t, 1, generator=g)
    return x, y


def one_batch(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=len(x))


def task_and_reference(cell, lr=0.05, optimizer=torch.optim.Adam, **tbptt):
    torch.manual_seed(0)
    model = RNN(cell, input_size=2, hidden_size=5, out_features=1, output="all")
    reference = copy.deepcopy(model).double()
    task = TBPTTTask(model, "mse", functools.partial(optimizer, lr=lr), metrics=(), **tbptt)
    return task, reference


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def reference_k1_k2(model, x, y, k1, k2, lr, clip=None, optimizer=torch.optim.Adam):
    """Williams-Peng style TBPTT(k1, k2), written from the definition in single calls: the update for the
    steps [n k1, e) runs the net from the stored state at a = max(0, e - k2) and backpropagates the loss
    of those last steps only; the state where the next update starts is recomputed with the same weights."""
    opt = optimizer(model.parameters(), lr=lr)
    steps = x.shape[1]
    h_at_a, a = None, 0
    for n in range(-(-steps // k1)):
        s, e = n * k1, min((n + 1) * k1, steps)
        out, _ = model(x[:, a:e], h_at_a)
        loss = F.mse_loss(out[:, s - a:], y[:, s:e])
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        next_a = max(0, (n + 2) * k1 - k2)
        with torch.no_grad():
            if next_a > a:
                _, h_next = model(x[:, a:next_a], h_at_a)
                h_at_a = tuple(h.clone() for h in h_next) if isinstance(h_next, tuple) else h_next.clone()
        a = next_a
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_one_batch_equals_reference_loop_float64(cell):
    task, reference = task_and_reference(cell, truncated_bptt_steps=K)
    x, y = seq_data()
    fit = trainer(precision="64-true")
    fit.fit(task, one_batch(x, y))
    assert fit.global_step == 3  # chunks 4, 4, 2

    # the plainest loop: chunk, forward, backward, step, detach
    opt = torch.optim.Adam(reference.parameters(), lr=0.05)
    h = None
    for s in range(0, T, K):
        out, h = reference(x[:, s:s + K].double(), h)
        F.mse_loss(out, y[:, s:s + K].double()).backward()
        opt.step()
        opt.zero_grad()
        h = tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()
    start = params(task_and_reference(cell)[1])
    for got, want, init in zip(task.model.parameters(), reference.parameters(), start):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=1e-12)
        assert not torch.equal(want, init)


@pytest.mark.parametrize("k", [T, 16, None])
def test_k_at_least_T_equals_full_bptt(k):
    task, reference = task_and_reference("lstm", truncated_bptt_steps=k)
    x, y = seq_data()
    fit = trainer(precision="64-true")
    fit.fit(task, one_batch(x, y))
    assert fit.global_step == 1
    opt = torch.optim.Adam(reference.parameters(), lr=0.05)
    out, _ = reference(x.double())
    F.mse_loss(out, y.double()).backward()
    opt.step()
    for got, want in zip(task.model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k1,k2", [(3, 6), (2, 6), (4, 4)])
def test_k1_k2_equals_reference_from_definition(k1, k2):
    task, reference = task_and_reference("gru", truncated_bptt_steps=k1, backprop_steps=k2)
    x, y = seq_data(t=11)
    fit = trainer(precision="64-true")
    fit.fit(task, one_batch(x, y))
    assert fit.global_step == -(-11 // k1)
    reference_k1_k2(reference, x.double(), y.double(), k1, k2, 0.05)
    for got, want in zip(task.model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=1e-12)


def test_accumulate_chunks_equals_summed_gradients():
    task, reference = task_and_reference("rnn_tanh", truncated_bptt_steps=3, accumulate_chunks=2)
    x, y = seq_data(t=10)  # chunks 3,3,3,1 -> updates after chunks 2 and 4
    fit = trainer(precision="64-true")
    fit.fit(task, one_batch(x, y))
    assert fit.global_step == 2
    opt = torch.optim.Adam(reference.parameters(), lr=0.05)
    h, xd, yd = None, x.double(), y.double()
    for group in ([0, 3], [6, 9]):
        for s in group:
            out, h = reference(xd[:, s:s + 3], h)
            (F.mse_loss(out, yd[:, s:s + 3]) / 2).backward()
            h = h.detach()
        opt.step()
        opt.zero_grad()
    for got, want in zip(task.model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=1e-12)


def test_sequence_target_only_last_chunk_has_loss():
    torch.manual_seed(0)
    model = RNN("lstm", input_size=2, hidden_size=5, out_features=1, output="last")
    reference = copy.deepcopy(model).double()
    task = TBPTTTask(model, "mse", functools.partial(torch.optim.SGD, lr=0.1), metrics=(), truncated_bptt_steps=4)
    x, _ = seq_data()
    y = x[:, :, :1].sum(1)  # (B, 1): one target per sequence
    fit = trainer(precision="64-true")
    fit.fit(task, one_batch(x, y))
    assert fit.global_step == 1  # only the last chunk has a loss
    with torch.no_grad():
        _, h = reference(x[:, :8].double())
    out, _ = reference(x[:, 8:].double(), h)
    F.mse_loss(out, y.double()).backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for got, want in zip(task.model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=1e-12)


class Recorder(TBPTTModule):
    """A 1.x-style module that records what each chunk received."""

    def __init__(self, k=K, hidden="tuple", **options):
        super().__init__()
        self.truncated_bptt_steps = k
        for key, value in options.items():
            setattr(self, key, value)
        self.lstm = torch.nn.LSTM(2, 4, batch_first=True)
        self.head = torch.nn.Linear(4, 1)
        self.hidden_kind = hidden
        self.calls: list[dict] = []

    def training_step(self, batch, batch_idx, hiddens):
        x, y = batch["x"], batch["pair"][1]
        state = None
        if hiddens is not None:
            state = (hiddens["h"], hiddens["c"]) if self.hidden_kind == "dict" else hiddens
        out, (h, c) = self.lstm(x, state)
        loss = F.mse_loss(self.head(out), y)
        self.calls.append({"len": x.shape[1], "hiddens": hiddens, "graph": graph_size(loss),
                           "batch_idx": batch_idx, "returned": (h, c)})
        new = {"h": h, "c": c} if self.hidden_kind == "dict" else (h, c)
        return {"loss": loss, "hiddens": new}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def graph_size(t: torch.Tensor) -> int:
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return len(seen)


def dict_loader(t=T, n=2 * B, batch_size=B):
    x, y = seq_data(n=n, t=t)
    rows = [{"x": x[i], "pair": [x[i, :, :1], y[i]]} for i in range(n)]
    return DataLoader(rows, batch_size=batch_size)


@pytest.mark.parametrize("hidden", ["tuple", "dict"])
def test_chunks_have_length_k_and_hiddens_carried_detached(hidden):
    module = Recorder(k=3, hidden=hidden)
    trainer().fit(module, dict_loader(t=10))
    per_batch = [module.calls[i:i + 4] for i in (0, 4)]
    for calls in per_batch:
        assert [c["len"] for c in calls] == [3, 3, 3, 1]
        assert calls[0]["hiddens"] is None  # reset at each batch
        for prev, cur in zip(calls, calls[1:]):
            got = cur["hiddens"] if hidden == "tuple" else (cur["hiddens"]["h"], cur["hiddens"]["c"])
            for g, p in zip(got, prev["returned"]):
                assert not g.requires_grad and g.grad_fn is None
                torch.testing.assert_close(g, p.detach())
    # the graph of a chunk does not grow with the chunks before it
    assert len({c["graph"] for c in module.calls if c["len"] == 3}) == 1


def test_graph_flat_in_sequence_length():
    sizes = {}
    for t in (12, 48):
        module = Recorder(k=4)
        trainer().fit(module, dict_loader(t=t, n=B))
        sizes[t] = max(c["graph"] for c in module.calls)
    assert sizes[12] == sizes[48]


def test_carry_hiddens_across_batches_and_reset_per_epoch():
    module = Recorder(k=5, tbptt_carry_hiddens=True)
    trainer(max_epochs=2).fit(module, dict_loader(t=10, n=2 * B))
    firsts = module.calls[::2]  # the first chunk of each batch: 2 epochs x 2 batches
    assert firsts[0]["hiddens"] is None and firsts[2]["hiddens"] is None  # each epoch starts fresh
    carried = firsts[1]["hiddens"]
    for g, p in zip(carried, module.calls[1]["returned"]):
        assert not g.requires_grad
        torch.testing.assert_close(g, p.detach())
    module.reset_hiddens()
    assert module._tbptt_hiddens is None


def test_split_batch_nested_structures_and_static_leaves():
    Pair = namedtuple("Pair", "a b")
    x = torch.arange(2 * 7).reshape(2, 7)
    batch = {"x": x, "nested": [Pair(x.unsqueeze(-1), "tag"), (x.float(),)], "label": torch.tensor([1, 0])}
    chunks = split_batch(batch, 3)
    assert [c["x"].shape[1] for c in chunks] == [3, 3, 1]
    assert torch.equal(torch.cat([c["x"] for c in chunks], 1), x)
    assert isinstance(chunks[1]["nested"][0], Pair) and chunks[1]["nested"][0].b == "tag"
    assert torch.equal(chunks[2]["nested"][1][0], x[:, 6:].float())
    assert all(c["label"] is batch["label"] for c in chunks)  # no time dimension: handed to every chunk
    assert [c.shape[0] for c in split_batch(torch.zeros(7, 2), 4, time_dim=0)] == [4, 3]


def test_detach_hiddens_any_structure():
    a = torch.ones(2, requires_grad=True) * 2
    out = detach_hiddens({"h": (a, [a]), "n": None, "step": 3})
    assert not out["h"][0].requires_grad and not out["h"][1][0].requires_grad
    assert out["n"] is None and out["step"] == 3


class LitModel(TBPTTModule):  # was: class LitModel(LightningModule)
    """Lightning 1.x's truncated-BPTT docs example with only the base class changed (also in test_dropin_matrix)."""

    def __init__(self):
        super().__init__()
        # Important: This property activates truncated backpropagation through time
        # Setting this value to 2 splits the batch into sequences of size 2
        self.truncated_bptt_steps = 2
        self.lstm = torch.nn.LSTM(1, 8, batch_first=True)
        self.linear = torch.nn.Linear(8, 1)

    # Truncated back-propagation through time
    def training_step(self, batch, batch_idx, hiddens):
        # the training step must be updated to accept a ``hiddens`` argument
        # hiddens are the hiddens from the previous truncated backprop step
        data, target = batch
        out, hiddens = self.lstm(data, hiddens)
        loss = F.mse_loss(self.linear(out), target)
        self.log("train_loss", loss)
        return {"loss": loss, "hiddens": hiddens}

    def validation_step(self, batch, batch_idx):
        data, target = batch
        out, _ = self.lstm(data)
        self.log("val_loss", F.mse_loss(self.linear(out), target))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_lightning_1x_docs_module_runs_with_only_the_base_class_changed():
    x = torch.randn(8, 7, 1)
    data = DataLoader(TensorDataset(x, x.cumsum(1)), batch_size=4)
    model = LitModel()
    fit = trainer(limit_val_batches=1)
    fit.fit(model, data, data)
    assert fit.global_step == 2 * 4  # 2 batches x chunks 2, 2, 2, 1
    assert {"train_loss", "val_loss", "tbptt/loss_seq"} <= set(fit.callback_metrics)


def test_tuple_return_and_none_loss():
    class Steps(Recorder):
        def training_step(self, batch, batch_idx, hiddens):
            out = super().training_step(batch, batch_idx, hiddens)
            skip = self.tbptt_split_idx == 0
            return (None if skip else out["loss"]), out["hiddens"]

    module = Steps(k=5)
    fit = trainer()
    fit.fit(module, dict_loader(t=10, n=B))
    assert fit.global_step == 1  # the first chunk only advanced the state


def test_every_chunk_is_an_optimizer_step_for_callbacks_and_clipping():
    seen = []

    class CountSteps(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(sum(float(p.grad.norm()) ** 2 for p in pl_module.parameters()) ** 0.5)

    from bpkit.callbacks import GradientClipping

    task, reference = task_and_reference("lstm", lr=0.5, optimizer=torch.optim.SGD, truncated_bptt_steps=3,
                                         backprop_steps=6)
    x, y = seq_data(t=10)
    fit = trainer(precision="64-true", callbacks=[CountSteps(), GradientClipping("norm", max_norm=0.05)])
    fit.fit(task, one_batch(x, y))
    assert len(seen) == 4 and all(n > 0.05 for n in seen)  # clipping had work to do on every chunk
    unclipped = reference_k1_k2(copy.deepcopy(reference), x.double(), y.double(), 3, 6, 0.5, optimizer=torch.optim.SGD)
    reference_k1_k2(reference, x.double(), y.double(), 3, 6, 0.5, clip=0.05, optimizer=torch.optim.SGD)
    # bpkit's clipping computes norms in float32 (by design): agreement to ~1e-7 relative, not 1e-12
    for got, want, free in zip(task.model.parameters(), reference.parameters(), unclipped.parameters()):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-9)
    assert max(float((a - b).abs().max()) for a, b in zip(reference.parameters(), unclipped.parameters())) > 1e-2


def test_gradient_monitor_acts_on_every_chunk():
    from bpkit.callbacks import GradientMonitor

    class NanInChunk(Recorder):
        def training_step(self, batch, batch_idx, hiddens):
            out = super().training_step(batch, batch_idx, hiddens)
            if batch_idx == 0 and self.tbptt_split_idx == 1:  # one bad chunk in the middle of a sequence
                out["loss"] = out["loss"] * float("nan")
            return out

    module = NanInChunk(k=3)
    monitor = GradientMonitor(on_nonfinite="skip", histograms=False, log_every_n_steps=1)
    fit = trainer(callbacks=[monitor])
    fit.fit(module, dict_loader(t=9, n=2 * B))
    assert fit.global_step == 6
    assert monitor.skipped_steps == 1
    assert [a.kind for a in monitor.alerts].count("nonfinite") >= 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("per,expected", [("chunk", 0.5 ** 3), ("batch", 0.5)])
def test_scheduler_steps_per_chunk_or_per_batch(per, expected):
    torch.manual_seed(0)
    model = RNN("rnn_tanh", input_size=2, hidden_size=4, out_features=1, output="all")
    task = TBPTTTask(model, "mse", functools.partial(torch.optim.SGD, lr=1.0), metrics=(),
                     scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
                     truncated_bptt_steps=K, scheduler_per=per)
    trainer().fit(task, one_batch(*seq_data()))
    assert task.optimizers().param_groups[0]["lr"] == pytest.approx(expected)


def test_epoch_schedulers_and_plateau_step_at_epoch_end():
    torch.manual_seed(0)
    model = RNN("rnn_tanh", input_size=2, hidden_size=4, out_features=1, output="all")
    sched = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.5, patience=0, threshold=10.0)
    task = TBPTTTask(model, "mse", functools.partial(torch.optim.SGD, lr=1.0), metrics=(), scheduler=sched,
                     scheduler_interval="epoch", scheduler_monitor="val/loss", truncated_bptt_steps=K)
    data = one_batch(*seq_data())
    trainer(max_epochs=3).fit(task, data, data)
    # threshold=10 (rel, mode min): no value counts as an improvement, not even the first -> halved every epoch
    assert task.optimizers().param_groups[0]["lr"] == pytest.approx(0.125)


def test_bf16_mixed_on_cpu_and_no_host_reads():
    task, _ = task_and_reference("rnn_tanh", truncated_bptt_steps=3)  # oneDNN has no bf16 LSTM on some CPUs
    before = params(task)
    x, y = seq_data(n=4, t=9)
    with HostReadCounter() as reads:
        fit = trainer(precision="bf16-mixed")
        fit.fit(task, DataLoader(TensorDataset(x, y), batch_size=2))
    assert reads.count == 0, reads.sites
    assert fit.global_step == 6
    assert torch.isfinite(fit.callback_metrics["train/loss"])
    assert all(not torch.equal(a, b) for a, b in zip(before, params(task)))


@pytest.mark.gpu
def test_16_mixed_on_gpu_matches_fp32_closely():
    results = []
    for precision in ("32-true", "16-mixed"):
        task, _ = task_and_reference("lstm", truncated_bptt_steps=3, lr=1e-2)
        fit = trainer(accelerator="gpu", devices=1, precision=precision)
        fit.fit(task, one_batch(*seq_data(t=12)))
        assert fit.global_step == 4
        results.append(torch.cat([p.detach().flatten().cpu() for p in task.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=2e-3)


def test_resume_mid_epoch_restores_carried_state_and_scheduler_count(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    x, y = seq_data(n=4 * B, t=8)
    data = DataLoader(TensorDataset(x, y), batch_size=B)
    task, _ = task_and_reference("gru", truncated_bptt_steps=4, carry_hiddens=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, save_last=False)
    trainer(max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(task, data)
    state = torch.load(tmp_path / "epoch=0-step=4.ckpt", weights_only=False)["bpkit_tbptt"]
    assert state["scheduler_steps"] == 4 and state["epoch"] == 0  # BackpropTask's constant schedule, per chunk
    assert state["hiddens"].shape == (1, B, 5) and not state["hiddens"].requires_grad

    resumed, _ = task_and_reference("gru", truncated_bptt_steps=4, carry_hiddens=True)
    fit = trainer(max_epochs=1)
    fit.fit(resumed, data, ckpt_path=tmp_path / "epoch=0-step=4.ckpt")
    assert fit.global_step == 8


@pytest.mark.parametrize("k,acc,expected", [(5, 1, 2 * 3), (5, 2, 2 * 2), (None, 1, 2)])
def test_length_dependent_schedule_counts_optimizer_steps(k, acc, expected):
    from bpkit.data import CopyDataModule

    dm = CopyDataModule(delay=9, n_symbols=3, alphabet=4, num_train=16, num_val=8, num_test=8, batch_size=8)
    model = RNN("gru", input_size=6, hidden_size=8, out_features=5, output="all")
    task = TBPTTTask(model, "cross_entropy", metrics=(), num_classes=5, scheduler="cosine",
                     truncated_bptt_steps=k, accumulate_chunks=acc)
    fit = trainer(limit_val_batches=0)
    fit.fit(task, dm)  # seq_len 15: chunks 5, 5, 5
    assert fit.global_step == expected
    assert fit.lr_scheduler_configs[0].scheduler.T_max == expected  # the cosine ends with the run


def test_task_on_bpkit_sequence_data_validates_full_sequences():
    from bpkit.data import AddingDataModule

    dm = AddingDataModule(seq_len=12, num_train=32, num_val=16, num_test=16, batch_size=16)
    model = RNN("gru", input_size=2, hidden_size=8, out_features=1, output="last")
    task = TBPTTTask(model, "mse", metrics=("mse",), truncated_bptt_steps=5, backprop_steps=10)
    lengths = []
    task.model.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    fit = trainer()
    fit.fit(task, dm)
    assert fit.global_step == 2  # 2 batches, one loss chunk each
    assert 12 in lengths and 2 in lengths and 5 in lengths  # val: whole sequences; train: chunks 5, 5, 2
    assert {"train/loss", "val/loss", "train/mse", "tbptt/loss_chunk"} <= set(fit.callback_metrics)


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_truncated_bptt_steps(k):
    module = Recorder()
    with pytest.raises(BpkitConfigError, match=r"truncated_bptt_steps=.* is invalid: expected an integer >= 1"):
        module.truncated_bptt_steps = k
    with pytest.raises(BpkitConfigError, match="truncated_bptt_steps"):
        TBPTTTask(RNN("lstm"), "mse", metrics=(), truncated_bptt_steps=k)


def test_bad_options():
    with pytest.raises(BpkitConfigError, match=r"tbptt_backprop_steps=5 is invalid: expected a multiple of "
                                               r"truncated_bptt_steps=2"):
        TBPTTTask(RNN("lstm"), "mse", metrics=(), truncated_bptt_steps=2, backprop_steps=5)
    with pytest.raises(BpkitConfigError, match=r"tbptt_scheduler_per='epoch' is invalid: expected one of chunk, batch"):
        TBPTTTask(RNN("lstm"), "mse", metrics=(), scheduler_per="epoch")
    with pytest.raises(BpkitConfigError, match="tbptt_accumulate_chunks=0"):
        TBPTTTask(RNN("lstm"), "mse", metrics=(), accumulate_chunks=0)


def test_batch_without_time_dimension_fails_clearly():
    with pytest.raises(BpkitConfigError, match=r"batch='tensors of shapes \(4,\), \(4,\)' is invalid: expected at "
                                               r"least one tensor with a time dimension at dim 1"):
        split_batch((torch.zeros(4), torch.zeros(4)), 2)
    with pytest.raises(BpkitConfigError, match=r"agree on their length along the time dim 1 \(found \[5, 6\]\)"):
        split_batch((torch.zeros(4, 5), torch.zeros(4, 6)), 2)
    module = Recorder()
    data = DataLoader(TensorDataset(torch.zeros(4), torch.zeros(4)), batch_size=2)
    with pytest.raises(BpkitConfigError, match="time dimension"):
        trainer().fit(module, data)


def test_training_step_without_hiddens_fails_clearly():
    class NoHiddens(Recorder):
        def training_step(self, batch, batch_idx, hiddens):
            return super().training_step(batch, batch_idx, hiddens)["loss"]

    with pytest.raises(BpkitConfigError, match=r"NoHiddens.training_step return value='Tensor' is invalid: "
                                               r"expected \{'loss': loss, 'hiddens': hiddens\}"):
        trainer().fit(NoHiddens(), dict_loader())

    class TwoArgs(Recorder):
        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(BpkitConfigError, match=r"training_step\(self, batch, batch_idx, hiddens\)"):
        trainer().fit(TwoArgs(), dict_loader())
