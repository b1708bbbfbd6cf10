"""Pure-torch activation statistics and dead/saturated rules, against float64/numpy references."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bpkit import BpkitConfigError
from bpkit.detect.activations import ActivationRules
from bpkit.stats.activations import ActivationStats, is_auto_module, output_tensor, saturation_kind, unit_dim


def reference(y: torch.Tensor, dim: int, kind=None, t=0.99, bins=16, rng=(-4.0, 4.0), log=False):
    """Hand-written float64/numpy statistics of one tensor."""
    a = y.detach().double().numpy()
    moved = np.moveaxis(a, dim, 0).reshape(a.shape[dim], -1)
    out = {
        "mean": a.mean(), "std": a.std(), "zero_frac": (a == 0).mean(),
        "dead_frac": np.mean([np.all(row == 0) for row in moved]),
    }
    if kind == "tanh":
        out["saturated_frac"] = (np.abs(a) > t).mean()
    elif kind == "sigmoid":
        out["saturated_frac"] = ((a > t) | (a < 1 - t)).mean()
    if log:
        vals = np.log10(np.abs(a[a != 0]))
    else:
        vals = a.ravel()
    out["hist"] = np.histogram(np.clip(vals, *rng), bins=bins, range=rng)[0]
    return out


def check(stats, ref, count_tol=2):
    assert stats.mean == pytest.approx(ref["mean"], rel=1e-5, abs=1e-6)
    assert stats.std == pytest.approx(ref["std"], rel=1e-5, abs=1e-6)
    assert stats.zero_frac == pytest.approx(ref["zero_frac"], abs=1e-12)
    assert stats.dead_frac == pytest.approx(ref["dead_frac"], abs=1e-12)
    if "saturated_frac" in ref:
        assert stats.saturated_frac == pytest.approx(ref["saturated_frac"], abs=1e-12)
    else:
        assert stats.saturated_frac is None
    counts = stats.hist[0]
    assert counts.sum() == ref["hist"].sum()
    # float32 vs float64 binning may move a value that sits on a bin edge by one bin
    assert np.abs(counts - ref["hist"]).sum() <= count_tol


def summarize_one(y, dim, kind=None, **kw):
    s = ActivationStats(["m"], {"m": kind}, **kw)
    s.update("m", y, dim)
    return s.summarize(s.packed().numpy())["m"]


@pytest.mark.parametrize("shape,dim", [((64, 32), 1), ((16, 8, 5, 5), 1), ((8, 12, 20), 2)])
def test_relu_outputs_match_reference(shape, dim):
    torch.manual_seed(0)
    y = torch.relu(torch.randn(shape) * 2 - 0.5)
    dead_units = [0, 3] if dim == 1 else [1]
    y.index_fill_(dim, torch.tensor(dead_units), 0.0)
    st_ = summarize_one(y, dim, bins=16)
    ref = reference(y, dim, bins=16)
    assert ref["dead_frac"] == len(dead_units) / shape[dim]
    check(st_, ref)
    assert st_.count == y.numel() and st_.calls == 1


@pytest.mark.parametrize("kind,fn", [("tanh", torch.tanh), ("sigmoid", torch.sigmoid)])
def test_saturation_matches_reference(kind, fn):
    torch.manual_seed(1)
    y = fn(torch.randn(128, 16) * 4)
    st_ = summarize_one(y, 1, kind=kind, bins=20, saturation_threshold=0.95)
    rng = (-1.0, 1.0) if kind == "tanh" else (0.0, 1.0)
    ref = reference(y, 1, kind=kind, t=0.95, bins=20, rng=rng)
    assert 0.1 < ref["saturated_frac"] < 0.9
    check(st_, ref)
    assert st_.hist[1][0] == rng[0] and st_.hist[1][-1] == rng[1]


def test_gradient_log_magnitude_histogram_skips_zeros():
    torch.manual_seed(2)
    g = torch.randn(32, 10) * 10.0 ** torch.randint(-9, 0, (32, 10))
    g[:, 4] = 0.0
    s = ActivationStats(["m"], None, bins=14, log_magnitude=True, log_range=(-12.0, 2.0))
    s.update("m", g, 1)
    st_ = s.summarize(s.packed().numpy())["m"]
    ref = reference(g, 1, bins=14, rng=(-12.0, 2.0), log=True)
    check(st_, ref)
    assert st_.hist[0].sum() == g.numel() - 32


def test_accumulates_over_calls_and_sums_like_ranks():
    """Several calls (micro-batches) and a sum of two accumulators' packed buffers (what a cross-rank
    all-reduce does) both give the statistics of all the data together."""
    torch.manual_seed(3)
    a, b = torch.relu(torch.randn(20, 6)), torch.relu(torch.randn(30, 6) + 1)
    a[:, 2] = 0.0
    both = torch.cat([a, b])
    s = ActivationStats(["m"], None, bins=8)
    s.update("m", a, 1)
    s.update("m", b, 1)
    one = s.summarize(s.packed().numpy())["m"]
    r1, r2 = ActivationStats(["m"], None, bins=8), ActivationStats(["m"], None, bins=8)
    r1.update("m", a, 1)
    r2.update("m", b, 1)
    summed = r1.summarize((r1.packed() + r2.packed()).numpy())["m"]
    ref = reference(both, 1, bins=8)
    ref["dead_frac"] = (1 / 6 + 0) / 2  # dead in the first batch only: averaged over the two batches
    for got in (one, summed):
        check(got, ref)
        assert got.calls == 2 and got.count == both.numel()
    s.reset()
    assert s.summarize(s.packed().numpy()) == {}


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.floats(-3, 3), st.floats(0.1, 5), st.integers(0, 2**31 - 1))
def test_mean_std_zero_property(rows, cols, shift, scale, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.relu(torch.randn(rows, cols, generator=g) * scale + shift)
    st_ = summarize_one(y, 1, bins=4)
    ref = reference(y, 1, bins=4)
    check(st_, ref)


def test_output_tensor_and_unit_dims():
    t = torch.randn(2, 3)
    assert output_tensor(t) is t
    assert output_tensor((t, (torch.zeros(1), torch.zeros(1)))) is t
    assert output_tensor({"idx": torch.zeros(2, dtype=torch.long), "h": t}) is t
    assert output_tensor(torch.zeros(2, dtype=torch.long)) is None
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(2, 4, 3), torch.tensor([4, 2]), batch_first=True)
    assert output_tensor(packed) is packed.data
    assert unit_dim(nn.Conv1d(2, 3, 1), torch.zeros(4, 3, 7)) == 1
    assert unit_dim(nn.ReLU(), torch.zeros(4, 3, 7, 7)) == 1
    assert unit_dim(nn.LSTM(2, 3), torch.zeros(4, 7, 3)) == 2
    assert unit_dim(nn.Linear(2, 3), torch.zeros(4, 3)) == 1
    assert saturation_kind(nn.Tanh()) == "tanh" and saturation_kind(nn.Sigmoid()) == "sigmoid"
    assert saturation_kind(nn.ReLU()) is None
    assert is_auto_module(nn.GRU(2, 2)) and is_auto_module(nn.GELU()) and not is_auto_module(nn.Dropout())


def test_rules_patience_recovery_and_state():
    rules = ActivationRules(dead_threshold=0.5, saturated_fraction=0.8, patience=2)
    assert rules.update(0, {"a": 0.9, "b": 0.1}, {"t": 0.95}) == []
    alerts = rules.update(1, {"a": 0.9, "b": 0.6}, {"t": 0.99})
    assert [(a.kind, a.where) for a in alerts] == [("dead", "a"), ("saturated", "t")]
    assert alerts[0].value == 0.9 and alerts[0].threshold == 0.5 and alerts[0].step == 1
    assert "dead units" in alerts[0].message and "a (90% of units)" in alerts[0].message
    state = rules.state_dict()
    again = ActivationRules(dead_threshold=0.5, saturated_fraction=0.8, patience=2)
    again.load_state_dict(state)
    for r in (rules, again):  # 'a' is already flagged; 'b' reaches patience now
        out = r.update(2, {"a": 0.9, "b": 0.6}, {"t": 0.1})
        assert [(a.kind, a.where) for a in out] == [("dead", "b")]
    # after recovering, a module can be flagged again
    rules.update(3, {"a": 0.0}, {})
    rules.update(4, {"a": 0.7}, {})
    assert [a.where for a in rules.update(5, {"a": 0.7}, {})] == ["a"]


@pytest.mark.parametrize("kwargs,match", [
    ({"dead_threshold": 1.5}, "dead_threshold=1.5"),
    ({"dead_threshold": -0.1}, "dead_threshold=-0.1"),
    ({"saturated_fraction": 2}, "saturated_fraction=2"),
    ({"patience": 0}, "patience=0"),
])
def test_rules_bad_input(kwargs, match):
    with pytest.raises(BpkitConfigError, match=match):
        ActivationRules(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"saturation_threshold": 1.2}, r"saturation_threshold=1.2 is invalid: expected a number > 0.5 and < 1"),
    ({"saturation_threshold": 0.3}, "saturation_threshold=0.3"),
    ({"hist_range": (2, 1)}, r"hist_range=\(2, 1\)"),
    ({"bins": -1}, "bins=-1"),
])
def test_stats_bad_input(kwargs, match):
    with pytest.raises(BpkitConfigError, match=match):
        ActivationStats(["m"], **kwargs)
