"""The framework-free truncated-BPTT engine (bpkit.tbptt.engine) in plain PyTorch loops, no Lightning.

References are hand-written loops (chunk, forward, backward, step, detach) in float64 and a hand-computed
scalar recurrence, never the engine's own output.
"""

from __future__ import annotations

import ast
import copy
import doctest
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import bpkit.tbptt.engine as engine_module
from bpkit.errors import BpkitConfigError
from bpkit.tbptt import TruncatedBPTT, split_batch

ENGINE_FILE = Path(engine_module.__file__)


class GradRecorder:
    """An optimizer wrapper that records the gradients of every step; without ``inner`` the weights stay."""

    def __init__(self, params, inner=None):
        self.params = list(params)
        self.inner = inner
        self.steps: list[list[torch.Tensor]] = []

    def step(self):
        self.steps.append([p.grad.detach().clone() for p in self.params])
        if self.inner is not None:
            self.inner.step()

    def zero_grad(self):
        for p in self.params:
            p.grad = None


class Net(torch.nn.Module):
    def __init__(self, cell="lstm", features=2, hidden=5):
        super().__init__()
        rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]
        self.rnn = rnn(features, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x, h=None):
        out, h = self.rnn(x, h)
        return self.head(out), h


def data(n=3, t=10, features=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, t, features, generator=g, dtype=dtype),
            torch.randn(n, t, 1, generator=g, dtype=dtype))


def nets(cell, seed=0):
    torch.manual_seed(seed)
    net = Net(cell).double()
    return net, copy.deepcopy(net)


def step_fn_for(net):
    def step(chunk, hiddens):
        x, y = chunk
        out, hiddens = net(x, hiddens)
        return F.mse_loss(out, y), hiddens
    return step


def detach(h):
    return tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()


# -- equality with hand-written loops ------------------------------------------------------------

@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_plain_loop_gradients_and_weights_equal_hand_written_loop(cell):
    net, ref = nets(cell)
    batches = [data(seed=s) for s in (0, 1)]  # two batches of one stream: the state carries over
    k = 4  # T=10: chunks 4, 4, 2 (an uneven last chunk)

    recorder = GradRecorder(net.parameters(), torch.optim.Adam(net.parameters(), lr=0.05))
    tbptt = TruncatedBPTT(chunk_size=k)
    grads, h = [], None
    for batch in batches:
        result = tbptt.run(batch, step_fn_for(net), recorder, hiddens=h)
        h = result.hiddens
        assert (result.num_chunks, result.num_updates) == (3, 3)
    grads = recorder.steps

    # the reference: chunk by slicing, forward, backward, step, detach
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    ref_grads, h = [], None
    for x, y in batches:
        for s in range(0, x.shape[1], k):
            out, h = ref(x[:, s:s + k], h)
            F.mse_loss(out, y[:, s:s + k]).backward()
            ref_grads.append([p.grad.clone() for p in ref.parameters()])
            ref_opt.step()
            ref_opt.zero_grad()
            h = detach(h)

    assert len(grads) == len(ref_grads) == 6
    for got_step, want_step in zip(grads, ref_grads):
        for got, want in zip(got_step, want_step):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert not torch.equal(next(net.parameters()), next(nets(cell)[0].parameters()))  # it did train


def test_accumulate_chunks_equals_summed_gradients():
    net, ref = nets("gru")
    x, y = data(t=10)  # chunks 3, 3, 3, 1 -> updates after chunks 2 and 4
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    result = TruncatedBPTT(3, accumulate_chunks=2).run((x, y), step_fn_for(net), opt)
    assert result.num_updates == 2

    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    h = None
    for group in ([0, 3], [6, 9]):
        for s in group:
            out, h = ref(x[:, s:s + 3], h)
            (F.mse_loss(out, y[:, s:s + 3]) / 2).backward()
            h = h.detach()
        ref_opt.step()
        ref_opt.zero_grad()
    for got, want in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k1,k2", [(2, 6), (3, 6), (4, 4)])
def test_backprop_steps_k2_equals_definition(k1, k2):
    net, ref = nets("lstm")
    x, y = data(t=11)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    result = TruncatedBPTT(k1, backprop_steps=k2).run((x, y), step_fn_for(net), opt)
    assert result.num_updates == -(-11 // k1)

    # TBPTT(k1, k2) from its definition: the update for steps [s, e) runs the net from the stored state at
    # a = max(0, e - k2) and backpropagates the loss of [s, e) only; the state where the next update starts is
    # advanced, without grad, with the weights of this update
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    h_at_a, a = None, 0
    for n in range(-(-11 // k1)):
        s, e = n * k1, min((n + 1) * k1, 11)
        out, _ = ref(x[:, a:e], h_at_a)
        F.mse_loss(out[:, s - a:], y[:, s:e]).backward()
        next_a = max(0, (n + 2) * k1 - k2)
        if next_a > a:
            with torch.no_grad():
                h_at_a = ref(x[:, a:next_a], h_at_a)[1]
        a = next_a
        ref_opt.step()
        ref_opt.zero_grad()
    for got, want in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_recomputed_chunks_are_flagged():
    seen = []
    w = torch.nn.Parameter(torch.tensor(0.5))
    tbptt = TruncatedBPTT(2, backprop_steps=4)

    def step(chunk, h):
        seen.append((tbptt.index, tbptt.num_chunks, tbptt.recomputing))
        h = chunk.sum(1) * w + (0 if h is None else h * w)
        return h.sum(), h

    tbptt.run(torch.ones(1, 6), step, torch.optim.SGD([w], lr=0.0))
    # window n re-runs chunk n-1 (recomputing) before chunk n
    assert seen == [(0, 3, False), (0, 3, True), (1, 3, False), (1, 3, True), (2, 3, False)]
    assert tbptt.recomputing is False


# -- the hidden state is cut at chunk boundaries: a hand-computed case ----------------------------

def test_no_gradient_flows_across_a_chunk_boundary_hand_computed():
    """h_t = w h_{t-1} + x_t, h_0 = 0, w = 0.5, x = 1, 2, 3, 4; chunks of 2; each chunk's loss is its last h.

    chunk 1: h1 = 1, h2 = 2.5;   dL/dw = dh2/dw = h1 + w dh1/dw = 1 + 0 = 1
    chunk 2: h3 = 4.25, h4 = 6.125 from h2 detached: dh3/dw = h2 = 2.5, dh4/dw = h3 + w dh3/dw = 4.25 + 1.25 = 5.5
    (full BPTT would give dh4/dw = 5.75: dh2/dw = 1 flows on through w * w)
    """
    w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    received = []

    def step(x, h):
        received.append(h)
        h = torch.zeros((), dtype=torch.float64) if h is None else h
        for t in range(x.shape[1]):
            h = w * h + x[0, t]
        return h, h

    recorder = GradRecorder([w])
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    result = TruncatedBPTT(chunk_size=2).run(x, step, recorder)
    assert [float(g[0]) for g in recorder.steps] == [1.0, 5.5]
    assert received[0] is None
    assert float(received[1]) == 2.5 and not received[1].requires_grad and received[1].grad_fn is None
    assert float(result.hiddens) == 6.125 and not result.hiddens.requires_grad
    assert float(w.detach()) == 0.5  # the recorder does not step

    # the same recurrence unrolled in one graph: the cut is what makes the difference
    h = torch.zeros((), dtype=torch.float64)
    for t in range(4):
        h = w * h + x[0, t]
    assert float(torch.autograd.grad(h, w)[0]) == 5.75


# -- hidden state structures ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["none", "tensor", "tuple", "nested"])
def test_hiddens_of_any_structure_are_carried_detached(kind):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(2, 3, batch_first=True)
    received, returned = [], []

    def pack(h, c):
        return {"tensor": h, "tuple": (h, c), "nested": {"state": [(h, c)], "step": 7}, "none": (h, c)}[kind]

    def unpack(s):
        if s is None:
            return None
        if kind == "tensor":
            return s, torch.zeros_like(s)
        if kind == "nested":
            assert s["step"] == 7  # non-tensor leaves pass through
            return s["state"][0]
        return s

    def step(chunk, hiddens):
        received.append(hiddens)
        out, (h, c) = lstm(chunk, unpack(hiddens))
        new = pack(h, c)
        returned.append(new)
        return {"loss": out.pow(2).mean(), "hiddens": new}

    start = None if kind == "none" else pack(torch.ones(1, 2, 3, requires_grad=True) * 0.1,
                                             torch.zeros(1, 2, 3))
    result = TruncatedBPTT(3).run(torch.randn(2, 7, 2), step, torch.optim.SGD(lstm.parameters(), lr=0.1),
                                  hiddens=start)
    assert result.num_chunks == 3 and len(received) == 3
    if kind == "none":
        assert received[0] is None
    for got, prev in zip(received, [start, *returned[:-1]]):
        if prev is None:
            continue
        got_leaves = [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
        prev_leaves = [t for t in torch.utils._pytree.tree_leaves(prev) if isinstance(t, torch.Tensor)]
        assert len(got_leaves) == len(prev_leaves) > 0
        for g, p in zip(got_leaves, prev_leaves):
            assert not g.requires_grad and g.grad_fn is None
            torch.testing.assert_close(g, p.detach())
    final = [t for t in torch.utils._pytree.tree_leaves(result.hiddens) if isinstance(t, torch.Tensor)]
    assert final and not any(t.requires_grad for t in final)


def test_none_loss_only_advances_the_state_and_optimizer_none_leaves_the_step_to_on_update():
    net, ref = nets("gru")
    x, _ = data(t=9)
    y = x[:, :, :1].sum(1)  # one target per sequence: only the last chunk has a loss
    tbptt = TruncatedBPTT(3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    updates = []

    def step(chunk, hiddens):
        out, hiddens = net(chunk, hiddens)
        last = tbptt.index == tbptt.num_chunks - 1
        return (F.mse_loss(out[:, -1], y) if last else None), hiddens

    def on_update():
        updates.append(tbptt.index)
        opt.step()
        opt.zero_grad()

    result = tbptt.run(x, step, None, on_update=on_update)
    assert updates == [2] and result.num_updates == 1
    assert result.chunk_losses[:2] == [None, None] and result.chunk_losses[2] is not None

    with torch.no_grad():
        _, h = ref(x[:, :6])
    out, _ = ref(x[:, 6:], h)
    F.mse_loss(out[:, -1], y).backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    for got, want in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_uneven_last_chunk_and_length_weighted_sequence_loss():
    net, _ = nets("lstm")
    x, y = data(t=10)
    chunks = split_batch((x, y), 4)
    assert [c[0].shape[1] for c in chunks] == [4, 4, 2]
    logged = []
    result = TruncatedBPTT(4).run((x, y), step_fn_for(net), None,
                                  on_chunk_loss=lambda loss, i: logged.append((i, loss)))
    assert [i for i, _ in logged] == [0, 1, 2]
    l0, l1, l2 = (float(loss) for _, loss in logged)
    assert float(result.loss) == pytest.approx((4 * l0 + 4 * l1 + 2 * l2) / 10, rel=1e-12)
    assert not result.loss.requires_grad


def test_whole_sequence_without_chunk_size_is_full_bptt():
    net, ref = nets("rnn")
    x, y = data(t=7)
    result = TruncatedBPTT(None).run((x, y), step_fn_for(net), torch.optim.SGD(net.parameters(), lr=0.1))
    assert (result.num_chunks, result.num_updates) == (1, 1)
    out, _ = ref(x)
    F.mse_loss(out, y).backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    for got, want in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_custom_backward_and_custom_chunks():
    net, _ = nets("gru")
    x, y = data(t=6)
    calls = []

    def backward(loss):
        calls.append(float(loss.detach()))
        loss.backward()

    chunks = [(x[:, :1], y[:, :1]), (x[:, 1:], y[:, 1:])]  # a split the engine did not make
    result = TruncatedBPTT(4).run((x, y), step_fn_for(net), None, chunks=chunks, backward=backward)
    assert result.num_chunks == 2 and len(calls) == 2


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, -3, 2.5, "4", True])
def test_bad_chunk_size_names_key_and_value(value):
    with pytest.raises(BpkitConfigError, match=rf"chunk_size={value!r} is invalid: expected an integer >= 1"):
        TruncatedBPTT(value)


def test_bad_options_name_key_and_value():
    with pytest.raises(BpkitConfigError, match=r"backprop_steps=5 is invalid: expected a multiple of chunk_size=2"):
        TruncatedBPTT(2, backprop_steps=5)
    with pytest.raises(BpkitConfigError, match=r"backprop_steps=0 is invalid: expected an integer >= 1"):
        TruncatedBPTT(2, backprop_steps=0)
    with pytest.raises(BpkitConfigError, match=r"accumulate_chunks=0 is invalid: expected an integer >= 1"):
        TruncatedBPTT(2, accumulate_chunks=0)
    with pytest.raises(BpkitConfigError, match=r"time_dim=-1 is invalid: expected an integer >= 0"):
        TruncatedBPTT(2, time_dim=-1)


def test_bad_step_output_and_loss_fail_clearly():
    x = torch.randn(2, 4, 1)
    w = torch.nn.Parameter(torch.ones(()))
    with pytest.raises(BpkitConfigError, match=r"step_fn return value='Tensor' is invalid: expected "
                                               r"\{'loss': loss, 'hiddens': hiddens\}"):
        TruncatedBPTT(2).run(x, lambda c, h: (c * w).sum(), None)
    with pytest.raises(BpkitConfigError, match=r"my_step return value='tuple of Tensor, NoneType'"):
        TruncatedBPTT(2).run(x, lambda c, h: ((c * w).sum(), None), None, owner="my_step")
    with pytest.raises(BpkitConfigError, match=r"step_fn loss='Tensor' is invalid: expected a tensor that "
                                               r"requires grad"):
        TruncatedBPTT(2).run(x, lambda c, h: (c.sum(), c), None)
    with pytest.raises(BpkitConfigError, match=r"batch='tensors of shapes \(4,\)' is invalid: expected at least "
                                               r"one tensor with a time dimension at dim 1"):
        TruncatedBPTT(2).run(torch.zeros(4), lambda c, h: (c, c), None)
    with pytest.raises(BpkitConfigError, match=r"chunks='\[\]' is invalid: expected at least one chunk"):
        TruncatedBPTT(2).run(x, lambda c, h: (c, c), None, chunks=[])


# -- no Lightning, and the docstring example runs --------------------------------------------------

def test_engine_module_imports_no_lightning_statically():
    tree = ast.parse(ENGINE_FILE.read_text())
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append("." * node.level + (node.module or ""))
    assert "torch" in imported  # the walk sees the imports
    banned = [m for m in imported if m.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric")
              or m.startswith(".")]
    assert not banned, banned
    bpkit_deps = [m for m in imported if m.startswith("bpkit")]
    assert bpkit_deps == ["bpkit.errors"], bpkit_deps


def test_importing_the_engine_loads_no_lightning():
    code = ("import sys; from bpkit.tbptt import TruncatedBPTT, split_batch, detach_hiddens; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_lightning_names_still_importable_from_the_package():
    from bpkit.tbptt import TBPTTModule, TBPTTTask

    assert TBPTTModule.__name__ == "TBPTTModule" and issubclass(TBPTTTask, TBPTTModule)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import bpkit.tbptt

        bpkit.tbptt.nope  # noqa: B018


def test_docstring_examples_run():
    result = doctest.testmod(engine_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10 and result.failed == 0
