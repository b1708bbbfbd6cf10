"""bpkit.gradcheck: finite differences against autograd, checked against independent references."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpkit import BpkitConfigError
from bpkit.gradcheck import GradcheckError, check_batch_independence, check_gradients
from bpkit.models import MLP, RNN, ResNet



def _cls_batch(n=16, d=8, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


# --- planted bugs -------------------------------------------------------------------------------

class _LinearFn(torch.autograd.Function):
    """y = x W^T with a backward scaled by ``factor`` (1.0: right; 1.1: 10% off; -1.0: sign error)."""

    @staticmethod
    def forward(ctx, x, weight, factor):
        ctx.save_for_backward(x, weight)
        ctx.factor = factor
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return ctx.factor * grad @ weight, ctx.factor * grad.t() @ x, None


class _CustomLinear(nn.Linear):
    def __init__(self, i, o, factor):
        super().__init__(i, o)
        self.factor = factor

    def forward(self, x):
        return _LinearFn.apply(x, self.weight, self.factor) + self.bias


class _Deep(nn.Module):
    """Five tanh layers 8 -> 12 -> ... -> 3; layer ``bad_layer`` runs its matmul through ``_LinearFn``."""

    def __init__(self, bad_layer: int, factor: float, depth: int = 5, width: int = 12):
        super().__init__()
        torch.manual_seed(1)
        sizes = [8] + [width] * (depth - 1) + [3]
        self.layers = nn.ModuleList(
            _CustomLinear(sizes[i], sizes[i + 1], factor) if i == bad_layer else nn.Linear(sizes[i], sizes[i + 1])
            for i in range(depth))

    def forward(self, x):
        for j, layer in enumerate(self.layers):
            x = layer(x)
            if j < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


# --- passes on the reference models -------------------------------------------------------------

@pytest.mark.parametrize("mode", ["directional", "full"])
def test_passes_on_mlp_with_batchnorm_and_dropout(mode):
    torch.manual_seed(0)
    net = MLP(8, 3, depth=3, width=12, norm="batch", dropout=0.3)
    report = check_gradients(net, _cls_batch(), loss_fn=F.cross_entropy, mode=mode, max_elements=4)
    assert report.passed, str(report)
    assert [p.name for p in report.params] == [n for n, _ in net.named_parameters()]
    assert report.max_rel_error < 1e-4


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_passes_on_rnn_cells(cell):
    torch.manual_seed(0)
    net = RNN(cell, input_size=2, hidden_size=8, num_layers=2, out_features=1)
    batch = (torch.randn(4, 12, 2), torch.randn(4, 1))
    report = check_gradients(net, batch, loss_fn=F.mse_loss)
    assert report.passed, str(report)
    assert len(report.params) == len(list(net.parameters()))
    assert report.max_rel_error < 1e-4


def test_passes_on_resnet_with_batchnorm_train_and_eval():
    torch.manual_seed(0)
    net = ResNet(1, 10, depth=2, width=4, norm="batch")
    batch = (torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,)))
    for train in (True, False):
        report = check_gradients(net, batch, loss_fn=F.cross_entropy, train=train)
        assert report.passed, str(report)
        assert report.max_rel_error < 1e-4


def test_float32_copy_with_its_own_defaults():
    torch.manual_seed(0)
    report = check_gradients(MLP(8, 3, depth=3, width=12, activation="tanh"), _cls_batch(),
                             loss_fn=F.cross_entropy, dtype=torch.float32)
    assert report.passed, str(report)
    assert report.dtype == "float32" and report.eps == 1e-3


# --- the user's model and RNG are untouched -----------------------------------------------------

def test_model_rng_and_batch_are_not_modified():
    torch.manual_seed(0)
    net = MLP(8, 3, depth=3, width=12, norm="batch", dropout=0.5)
    net.train()
    before = copy.deepcopy(net.state_dict())
    x, y = _cls_batch()
    x_before = x.clone()
    rng = torch.get_rng_state()
    check_gradients(net, (x, y), loss_fn=F.cross_entropy, batch_independence=True)
    after = net.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert net.training and all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(x, x_before) and x.dtype == torch.float32


# --- planted wrong backwards --------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["directional", "full"])
@pytest.mark.parametrize("factor, words", [(1.1, "1.1"), (-1.0, "sign error")])
def test_planted_wrong_backward_is_named(mode, factor, words):
    net = _Deep(bad_layer=2, factor=factor)
    report = check_gradients(net, _cls_batch(), loss_fn=F.cross_entropy, mode=mode, max_elements=8)
    assert not report.passed
    by_name = {p.name: p for p in report.params}
    assert not by_name["layers.2.weight"].passed
    assert words in by_name["layers.2.weight"].reason
    # layers after the bad one are untouched; before it the wrong input gradient is inherited
    for name in ("layers.2.bias", "layers.3.weight", "layers.3.bias", "layers.4.weight", "layers.4.bias"):
        assert by_name[name].passed, (name, str(report))
    assert "layers.0.weight" in report.failed
    assert report.suspect == "layers.2.weight"
    text = str(report)
    assert "layers.2.weight" in text and "FAIL" in text and "suspect: layers.2.weight" in text


def test_same_model_with_right_backward_passes():
    report = check_gradients(_Deep(bad_layer=2, factor=1.0), _cls_batch(), loss_fn=F.cross_entropy)
    assert report.passed, str(report)


def test_detached_parameter_is_reported():
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 3)
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            # bug: the scale reaches the loss, but not autograd
            return self.a(x) * (self.scale.detach() + 0 * self.scale)

    report = check_gradients(Detached(), _cls_batch(), loss_fn=F.cross_entropy)
    failed = {p.name: p for p in report.params if not p.passed}
    assert list(failed) == ["scale"]
    assert "autograd" in failed["scale"].reason and failed["scale"].grad_norm == 0.0


# --- agreement with torch.autograd.gradcheck ----------------------------------------------------

class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wrong):
        ctx.save_for_backward(x)
        ctx.wrong = wrong
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x**2 * (1.1 if ctx.wrong else 1.0), None


class _MulSum(torch.autograd.Function):
    """(x * y).sum(-1) with a sign error on y's gradient when wrong."""

    @staticmethod
    def forward(ctx, x, y, wrong):
        ctx.save_for_backward(x, y)
        ctx.wrong = wrong
        return (x * y).sum(-1)

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        g = g.unsqueeze(-1)
        return g * y, (-1.0 if ctx.wrong else 1.0) * g * x, None


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wrong):
        ctx.save_for_backward(x)
        ctx.wrong = wrong
        return F.softplus(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # wrong: the derivative of softplus is the sigmoid, not tanh
        return g * (torch.tanh(x) if ctx.wrong else torch.sigmoid(x)), None


def _inputs(*shapes):
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes)


_FUNCTIONS = [
    ("cube", lambda wrong: (lambda x: _Cube.apply(x, wrong)), [(5,)]),
    ("mulsum", lambda wrong: (lambda x, y: _MulSum.apply(x, y, wrong)), [(3, 4), (3, 4)]),
    ("softplus", lambda wrong: (lambda x: _Softplus.apply(x, wrong)), [(2, 3)]),
]


@pytest.mark.parametrize("name, make, shapes", _FUNCTIONS, ids=[f[0] for f in _FUNCTIONS])
@pytest.mark.parametrize("wrong", [False, True])
@pytest.mark.parametrize("mode", ["full", "directional"])
def test_agrees_with_torch_autograd_gradcheck(name, make, shapes, wrong, mode):
    fn = make(wrong)
    inputs = _inputs(*shapes)
    reference = torch.autograd.gradcheck(fn, inputs, raise_exception=False)
    report = check_gradients(fn, inputs, mode=mode)
    assert reference == (not wrong)
    assert report.passed == reference, str(report)
    assert [p.name for p in report.params] == [f"input.{i}" for i in range(len(shapes))]
    assert all(inp.grad is None for inp in inputs)


def test_function_of_a_single_tensor_is_checked_against_float64_reference():
    x = torch.randn(4, 3, dtype=torch.float32)
    report = check_gradients(lambda t: (t.sin() * t).sum(), x, mode="full")
    assert report.passed and report.params[0].name == "input" and report.params[0].probes == 12


def test_a_step_across_a_kink_is_confirmed_at_a_smaller_step():
    x = torch.tensor([5e-7, -2.0, 3.0], dtype=torch.float64)
    # at eps=1e-6 the central difference of relu at 5e-7 is 0.75, not 1; at 1e-7 it is exact
    fn = lambda t: (torch.relu(t) * torch.tensor([1.0, 2.0, 3.0], dtype=t.dtype)).sum()  # noqa: E731
    strict = check_gradients(fn, x, mode="full", confirm=False)
    assert not strict.passed and "element [0]" in strict.params[0].reason and "ratio 1.333" in strict.params[0].reason
    report = check_gradients(fn, x, mode="full")
    assert report.passed and "kink" in report.params[0].reason
    assert report.evaluations == 1 + 2 + 2 * 3 * 2  # autograd pass, determinism check, 3 elements x 2 steps
    # a wrong backward stays wrong at every step size
    wrong = check_gradients(lambda t: _Cube.apply(t, True).sum(), x, mode="full")
    assert not wrong.passed and wrong.evaluations == 1 + 2 + 2 * 3 * 3


# --- Lightning-like modules (duck typed: no Trainer) -------------------------------------------

class _StepModule(nn.Module):
    """Anything with training_step; logs like a LightningModule would and returns various shapes."""

    def __init__(self, returns="tensor"):
        super().__init__()
        self.net = MLP(8, 3, depth=2, width=10, dropout=0.2)
        self.returns = returns
        self.logged = []

    def log(self, name, value, **kwargs):
        self.logged.append(name)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        if self.returns == "dict":
            return {"loss": loss, "extra": 1}
        if self.returns == "tuple":
            return loss, 0
        if self.returns == "none":
            return None
        return loss


@pytest.mark.parametrize("returns", ["tensor", "dict", "tuple"])
def test_training_step_loss_is_found(returns):
    torch.manual_seed(0)
    module = _StepModule(returns)
    report = check_gradients(module, _cls_batch())
    assert report.passed, str(report)
    assert [p.name for p in report.params][0] == "net.blocks.0.linear.weight"
    assert module.logged == []  # logging is switched off on the copy and the original is not called


def test_real_lightning_module_outside_a_trainer():
    import lightning.pytorch as pl

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = MLP(8, 3, depth=3, width=10, norm="batch")

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train/loss", loss, prog_bar=True)
            self.log_dict({"a": loss})
            return {"loss": loss}

    report = check_gradients(Lit(), _cls_batch(), params="net.blocks.1.*")
    assert report.passed, str(report)
    assert [p.name for p in report.params] == ["net.blocks.1.linear.weight", "net.blocks.1.linear.bias",
                                               "net.blocks.1.norm.weight", "net.blocks.1.norm.bias"]


def test_foreign_hooks_do_not_fire_on_the_copy_but_model_hooks_do():
    net = MLP(8, 3, depth=2, width=10)
    calls = {"foreign": 0, "own": 0}

    def foreign(module, inputs, output):
        calls["foreign"] += 1

    def own(module, inputs, output):
        calls["own"] += 1
        return output * 2  # part of the model's function

    foreign.__module__ = "bpkit.callbacks.activation_monitor"
    net.head.register_forward_hook(foreign)
    net.head.register_forward_hook(own)
    report = check_gradients(net, _cls_batch(), loss_fn=F.cross_entropy, n_directions=1)
    assert report.passed
    assert calls["foreign"] == 0 and calls["own"] == report.evaluations
    assert len(net.head._forward_hooks) == 2


# --- batch independence -------------------------------------------------------------------------

class _SeqHead(nn.Module):
    """(B, T, F) -> (B, out). ``buggy`` uses view where a transpose was meant, mixing samples."""

    def __init__(self, buggy):
        super().__init__()
        self.buggy = buggy
        self.lin = nn.Linear(2, 4)
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x):
        b, t, f = x.shape
        tb = x.view(t, b, f) if self.buggy else x.transpose(0, 1)  # time-major for the (imagined) kernel
        h = torch.tanh(self.lin(tb))
        return self.head(h.transpose(0, 1).reshape(b, -1))


def test_batch_independence_catches_a_mixing_view():
    x, y = torch.randn(6, 5, 2), torch.randint(0, 3, (6,))
    bad = check_batch_independence(_SeqHead(buggy=True), (x, y))
    assert not bad.passed
    assert all(s["leaking"] > 0 for s in bad.samples)
    assert "mixes samples" in str(bad)
    good = check_batch_independence(_SeqHead(buggy=False), (x, y))
    assert good.passed, str(good)
    assert all(s["max_leak"] == 0.0 and s["own_grad_norm"] > 0 for s in good.samples)
    # the gradients of the buggy model are right: only the independence option sees the bug
    report = check_gradients(_SeqHead(buggy=True), (x, y), loss_fn=F.cross_entropy, batch_independence=True)
    assert all(p.passed for p in report.params) and not report.passed
    assert report.to_dict()["batch_independence"]["passed"] is False


def test_batch_independence_matches_a_hand_written_jacobian():
    torch.manual_seed(0)
    model = _SeqHead(buggy=True)
    x = torch.randn(4, 5, 2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: model.double()(t), x)  # (B, out, B, T, F)
    expected = {i: sorted(j for j in range(4) if j != i and jac[i, :, j].abs().max() > 0) for i in range(4)}
    report = check_batch_independence(_SeqHead(buggy=True), x.float(), samples=[0, 1, 2, 3])
    # same leaks as the exact Jacobian (the random output weights cannot cancel them)
    got = {s["sample"]: s["leaking"] for s in report.samples}
    assert got == {i: len(v) for i, v in expected.items()}


@pytest.mark.parametrize("make, x", [
    (lambda: MLP(8, 3, depth=3, width=10, norm="batch", dropout=0.5), torch.randn(8, 8)),
    (lambda: RNN("gru", input_size=2, hidden_size=6, out_features=2, output="all"), torch.randn(5, 7, 2)),
    (lambda: ResNet(1, 10, depth=2, width=4), torch.randn(5, 1, 8, 8)),
], ids=["mlp", "gru", "resnet"])
def test_batch_independence_passes_on_correct_models(make, x):
    report = check_batch_independence(make(), x)
    assert report.passed, str(report)
    assert [s["sample"] for s in report.samples] == sorted({0, x.shape[0] // 2, x.shape[0] - 1})


# --- report -------------------------------------------------------------------------------------

def test_report_dict_is_json_and_raise_if_failed():
    report = check_gradients(_Deep(bad_layer=4, factor=1.1), _cls_batch(), loss_fn=F.cross_entropy)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is False and d["failed"] == report.failed and d["suspect"] == "layers.4.weight"
    row = {p["name"]: p for p in d["params"]}["layers.4.weight"]
    assert row["shape"] == [3, 12] and row["passed"] is False and row["rel_error"] > report.rtol
    # the autograd pass, 2 for the determinism check, 2 passes per direction, 3 directions per tensor; failing
    # tensors are probed again at eps/10 and eps/100
    assert d["evaluations"] == 1 + 2 + 2 * 3 * (len(d["params"]) + 2 * len(d["failed"]))
    with pytest.raises(GradcheckError, match="layers.4.weight"):
        report.raise_if_failed()


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"eps": 0.0}, r"eps=0.0 is invalid: expected a number > 0"),
    ({"eps": -1e-6}, r"eps=-1e-06 is invalid"),
    ({"rtol": 0}, r"rtol=0 is invalid"),
    ({"mode": "exact"}, r"mode='exact' is invalid: expected one of directional, full"),
    ({"n_directions": 0}, r"n_directions=0 is invalid: expected an integer >= 1"),
    ({"params": "nope.*"}, r"params='nope\.\*' is invalid: expected a glob matching at least one .*blocks\.0"),
    ({"dtype": torch.int64}, r"dtype=torch.int64 is invalid"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(BpkitConfigError, match=match):
        check_gradients(MLP(8, 3, depth=2, width=4), _cls_batch(), loss_fn=F.cross_entropy, **kwargs)


def test_batch_the_model_cannot_take_names_the_shapes():
    with pytest.raises(BpkitConfigError, match=r"batch='\(Tensor\[4, 5\] float32, Tensor\[4\] int64\)' is invalid: "
                                               r"expected a batch that MLP accepts; calling it raised RuntimeError"):
        check_gradients(MLP(8, 3, depth=2, width=4), (torch.randn(4, 5), torch.zeros(4, dtype=torch.long)),
                        loss_fn=F.cross_entropy)


def test_missing_loss_is_explained():
    with pytest.raises(BpkitConfigError, match=r"loss='Tensor\[16, 3\] float64' is invalid: expected a scalar loss"):
        check_gradients(MLP(8, 3, depth=2, width=4), _cls_batch())
    with pytest.raises(BpkitConfigError, match=r"expected training_step to return the loss"):
        check_gradients(_StepModule("none"), _cls_batch())


def test_bad_input_to_batch_independence():
    with pytest.raises(BpkitConfigError, match=r"batch='Tensor\[4, 7\] int64' is invalid: expected a floating"):
        check_batch_independence(MLP(7, 2, depth=2, width=4), torch.zeros(4, 7, dtype=torch.long))
    with pytest.raises(BpkitConfigError, match=r"samples=\[9\] is invalid"):
        check_batch_independence(MLP(7, 2, depth=2, width=4), torch.randn(4, 7), samples=[9])
