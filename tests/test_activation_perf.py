"""The fast paths of the activation statistics (issue 22) against a plain reference: small CPU tensors reduced
together per shape (staged), the one-by-one CPU path for large tensors, and sampled histograms."""

import numpy as np
import pytest
import torch

import bpkit.stats.activations as acts
from bpkit import ActivationProbe, BpkitConfigError
from bpkit.stats.activations import ActivationStats


def plain(y: torch.Tensor, dim: int, kind=None, t=0.99, bins=16, rng=(-4.0, 4.0), log=False):
    """The straightforward statistics of one tensor, one reduction each, as bpkit computed them before the fast
    paths: float32 two-pass mean/variance, count_nonzero per unit, the saturation count, and the float32 bin index
    floor((v - low) * bins / (high - low)) clamped to the edge bins, NaN in none (log: log10|y| of non-zeros)."""
    yf = y.detach().float()
    var, mean = torch.var_mean(yf.double(), correction=0)
    others = tuple(d for d in range(yf.dim()) if d != dim)
    nonzero = torch.count_nonzero(yf, dim=others)
    out = {"mean": mean.item(), "std": var.sqrt().item(), "zeros": yf.numel() - int(nonzero.sum()),
           "dead": int((nonzero == 0).sum()), "units": yf.shape[dim]}
    if kind == "tanh":
        out["saturated"] = int(torch.count_nonzero(yf.abs() > t))
    elif kind == "sigmoid":
        out["saturated"] = int(torch.count_nonzero((yf - 0.5).abs() > t - 0.5))
    values = yf.reshape(-1)
    if log:
        values = values[values != 0].abs().log10()
    low, high = rng
    idx = ((values - low) * (bins / (high - low))).clamp(0, bins - 1)
    idx = idx[~idx.isnan()].long()
    out["hist"] = torch.bincount(idx, minlength=bins).numpy().astype(np.float64)
    return out


def inputs():
    g = torch.Generator().manual_seed(0)
    zero_heavy = torch.relu(torch.randn(64, 48, generator=g) - 1.5)
    zero_heavy[:, 3] = 0.0
    with_nan = torch.randn(32, 24, generator=g) * 3
    with_nan[0, 0] = float("nan")
    with_nan[5, 7] = float("inf")
    with_nan[6, 2] = -float("inf")
    with_nan[1, :] = -0.0
    edges = torch.linspace(-4.5, 4.5, 73).repeat(8, 1)  # every bin edge (8 bins a unit) and values beyond
    return {
        "random": (torch.randn(64, 40, generator=g) * 2, 1, None),
        "zero-heavy": (zero_heavy, 1, None),
        "nan-inf": (with_nan, 1, None),
        "half": ((torch.randn(16, 8, 5, 5, generator=g) * 3).half(), 1, None),
        "bfloat16": ((torch.randn(8, 12, 20, generator=g)).bfloat16(), 2, None),
        "bin-edges": (edges, 1, None),
        "tanh": (torch.tanh(torch.randn(128, 16, generator=g) * 4), 1, "tanh"),
        "sigmoid": (torch.sigmoid(torch.randn(128, 16, generator=g) * 4), 1, "sigmoid"),
        "1-d": (torch.randn(50, generator=g), 0, None),
        "big": (torch.relu(torch.randn(70_000, generator=g).view(700, 100)), 1, None),  # > staging size
        # non-contiguous outputs (an LSTM's (T, B, F) output seen batch first), small and large
        "transposed": (torch.randn(12, 10, 8, generator=g).transpose(0, 1), 2, None),
        "transposed-big": (torch.randn(32, 64, 40, generator=g).transpose(0, 1), 2, None),
    }


def _rng(kind):
    return {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}.get(kind, (-4.0, 4.0))


def _check(got, ref, exact_moments=False):
    nan = np.isnan(ref["mean"])
    assert np.isnan(got.mean) == nan and np.isnan(got.std) == (nan or np.isnan(ref["std"]))
    if not nan:
        assert got.mean == pytest.approx(ref["mean"], rel=1e-6, abs=1e-7)
        assert got.std == pytest.approx(ref["std"], rel=1e-5, abs=1e-7)
    assert got.zero_frac * got.count == pytest.approx(ref["zeros"], abs=1e-6)
    assert got.dead_frac * ref["units"] == pytest.approx(ref["dead"], abs=1e-9)
    if "saturated" in ref:
        assert got.saturated_frac * got.count == pytest.approx(ref["saturated"], abs=1e-6)
    np.testing.assert_array_equal(got.hist[0], ref["hist"])


@pytest.mark.parametrize("case", list(inputs()))
@pytest.mark.parametrize("staged", [True, False])
def test_fast_paths_equal_the_plain_reference(case, staged, monkeypatch):
    if not staged:
        monkeypatch.setattr(acts, "_STAGE_MAX", 0)
    y, dim, kind = inputs()[case]
    s = ActivationStats(["m"], {"m": kind}, bins=16, saturation_threshold=0.95)
    s.update("m", y, dim)
    got = s.summarize(s.packed().numpy())["m"]
    _check(got, plain(y, dim, kind, t=0.95, bins=16, rng=_rng(kind)))


@pytest.mark.parametrize("staged", [True, False])
def test_log_magnitude_fast_paths_equal_the_plain_reference(staged, monkeypatch):
    if not staged:
        monkeypatch.setattr(acts, "_STAGE_MAX", 0)
    g = torch.randn(32, 10) * 10.0 ** torch.randint(-9, 0, (32, 10))
    g[:, 4] = 0.0
    g[3, 3] = float("nan")
    s = ActivationStats(["m"], None, bins=14, log_magnitude=True, log_range=(-12.0, 2.0))
    s.update("m", g, 1)
    got = s.summarize(s.packed().numpy())["m"]
    _check(got, plain(g, 1, bins=14, rng=(-12.0, 2.0), log=True))


def test_many_calls_mixed_paths_keep_call_order_and_sum_per_module(monkeypatch):
    """Staged (small) and one-by-one (large) calls of several modules, interleaved, with an early reduction of the
    staged tensors: per module the statistics of all its tensors together, and the per-unit tail in call order (what
    a cross-rank sum lines up)."""
    monkeypatch.setattr(acts, "_STAGE_BUDGET", 3000)
    torch.manual_seed(5)
    names = ["a", "b", "c"]
    calls = [("a", torch.relu(torch.randn(20, 30))), ("b", torch.randn(700, 100)), ("c", torch.tanh(torch.randn(20, 30))),
             ("a", torch.relu(torch.randn(20, 30))), ("c", torch.tanh(torch.randn(9, 30))), ("b", torch.randn(700, 100))]
    s = ActivationStats(names, {"c": "tanh"}, bins=8)
    for name, y in calls:
        s.update(name, y, 1)
    packed = s.packed().numpy()
    got = s.summarize(packed)
    for name in names:
        ys = [y for n, y in calls if n == name]
        ref = plain(torch.cat(ys), 1, "tanh" if name == "c" else None, bins=8, rng=_rng("tanh" if name == "c" else None))
        ref["dead"] = sum(plain(y, 1)["dead"] for y in ys)
        ref["units"] = 30 * len(ys) if name != "b" else 200
        _check(got[name], ref)
        assert got[name].calls == len(ys)
    tail = packed[3 * (acts._HEAD + 8):]
    expected = np.concatenate([torch.count_nonzero(y, dim=0).numpy() for _, y in calls])
    np.testing.assert_array_equal(tail, expected)
    assert s._layout == [(names.index(n), y.shape[1]) for n, y in calls]


def test_sampled_histograms_estimate_big_tensors_and_count_small_ones_exactly():
    torch.manual_seed(6)
    big = torch.randn(512, 512)
    exact = ActivationStats(["m"], None, bins=16)
    sampled = ActivationStats(["m"], None, bins=16, histogram_samples=32768)
    for s in (exact, sampled):
        s.update("m", big, 1)
    e, p = (s.summarize(s.packed().numpy())["m"] for s in (exact, sampled))
    np.testing.assert_array_equal(e.hist[0], plain(big, 1)["hist"])
    assert p.hist[0].sum() == pytest.approx(big.numel())
    # within a few %: total variation distance 3% at most, every bin within 4 binomial sigmas
    assert np.abs(p.hist[0] - e.hist[0]).sum() / big.numel() < 0.03
    scale = big.numel() / 32768
    assert (np.abs(p.hist[0] - e.hist[0]) <= 4 * np.sqrt(e.hist[0] * scale) + scale).all()
    # everything else stays exact
    assert (p.mean, p.std, p.zero_frac, p.dead_frac) == (e.mean, e.std, e.zero_frac, e.dead_frac)
    # a tensor no bigger than the sample: counted exactly, equal
    small = torch.randn(64, 64)
    for n in (4096, 10_000):
        s = ActivationStats(["m"], None, bins=16, histogram_samples=n)
        s.update("m", small, 1)
        np.testing.assert_array_equal(s.summarize(s.packed().numpy())["m"].hist[0], plain(small, 1)["hist"])


def test_sampled_histograms_move_the_sample_and_cover_every_element_over_stride_calls():
    from bpkit.stats.sampling import sample_layout

    y = torch.randn(400, 250, generator=torch.Generator().manual_seed(9)) * 1.5
    _, stride = sample_layout(tuple(y.shape), 1000)
    assert stride > 2
    s = ActivationStats(["m"], None, bins=8, histogram_samples=1000)
    seen = []
    for _ in range(stride):
        s.update("m", y, 1)
        seen.append(s.summarize(s.packed().numpy())["m"].hist[0])
        s.reset()
    # one call alone: an estimate; the calls together saw every element once (each call scaled to 100000)
    assert not np.array_equal(seen[0], seen[1])
    np.testing.assert_allclose(np.sum(seen, axis=0), plain(y, 1, bins=8)["hist"] * stride, rtol=0.02)


def test_sampled_log_magnitude_histogram_leaves_zeros_out():
    torch.manual_seed(7)
    g = torch.randn(300, 100) * 1e-3
    g[:, :50] = 0.0
    s = ActivationStats(["m"], None, bins=14, log_magnitude=True, histogram_samples=2000)
    s.update("m", g, 1)
    st = s.summarize(s.packed().numpy())["m"]
    assert st.zero_frac == 0.5
    assert (st.hist[0] >= 0).all()
    assert st.hist[0].sum() == pytest.approx(15_000, rel=0.05)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "many"])
def test_histogram_samples_bad_values_are_config_errors(bad):
    with pytest.raises(BpkitConfigError, match="histogram_samples"):
        ActivationStats(["m"], histogram_samples=bad)
    with pytest.raises(BpkitConfigError, match="histogram_samples"):
        ActivationProbe(None, histogram_samples=bad)


def test_probe_with_sampled_histograms_on_a_model():
    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(16, 512), torch.nn.ReLU(), torch.nn.Linear(512, 4))
    exact, sampled = ActivationProbe(model), ActivationProbe(model, histogram_samples=2048)
    assert sampled.histogram_samples == 2048 and exact.histogram_samples is None
    x = torch.randn(128, 16)
    out = {}
    for probe in (exact, sampled):
        with probe.watch(0):
            model(x)
        out[probe] = (probe.flush(), dict(probe.last_histograms))
    (m_e, h_e), (m_s, h_s) = out[exact], out[sampled]
    assert m_e.keys() == m_s.keys()
    for key, value in m_e.items():  # mean, std, zeros, dead: exact either way
        assert m_s[key] == (pytest.approx(value, rel=1e-6) if "/std/" in key or "/mean/" in key else value), key
    for key in h_e:
        assert h_s[key][0].sum() == pytest.approx(h_e[key][0].sum())
    np.testing.assert_array_equal(h_s["act/hist/2"][0], h_e["act/hist/2"][0])  # 128 x 4: smaller than the sample


def test_work_buffers_follow_the_shapes_of_the_interval():
    s = ActivationStats(["m"], None, bins=4)
    for rows in (10, 11, 12):
        s.update("m", torch.randn(rows, 8), 1)
        s.packed()
        s.reset()
        assert len(s._scratch) == 1  # the buffers of earlier shapes are dropped


@pytest.mark.parametrize("log", [False, True])
def test_staged_sampled_histograms_equal_the_one_by_one_sample(log, monkeypatch):
    """Small tensors are sampled in their group exactly as one tensor alone is sampled (same offset)."""
    torch.manual_seed(10)
    ys = [torch.randn(64, 256) * 2 for _ in range(3)]
    if log:
        ys[0][:, :100] = 0.0
    kw = dict(bins=16, histogram_samples=1000, log_magnitude=log)
    got = []
    for stage_max in (1 << 16, 0):
        monkeypatch.setattr(acts, "_STAGE_MAX", stage_max)
        s = ActivationStats(["a", "b", "c"], None, **kw)
        for _ in range(2):  # the second call moves the offset
            for name, y in zip("abc", ys):
                s.update(name, y, 1)
            got.append(s.summarize(s.packed().numpy()))
            s.reset()
    for staged, alone in zip(got[:2], got[2:]):
        for name in "abc":
            np.testing.assert_allclose(staged[name].hist[0], alone[name].hist[0], rtol=1e-12)
            assert staged[name].hist[0].sum() == pytest.approx(64 * 256 - (6400 if log and name == "a" else 0),
                                                              rel=0.1)
    assert not np.array_equal(got[0]["a"].hist[0], got[1]["a"].hist[0])
