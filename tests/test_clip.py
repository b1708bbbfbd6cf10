"""bpkit.clip policies against independent references (torch's own clipping, float64 loops, numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bpkit.clip import AGC, POLICIES, AutoClip, NormClip, SkipOnSpike, ValueClip, ZClip, make_policy
from bpkit.errors import BpkitConfigError



def _params(seed: int = 0, dtype=torch.float64, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (6,), (4, 3, 3, 3), (4,), (6, 5), (2, 6), (2,), ()]
    params = []
    for s in shapes:
        p = torch.randn(s, generator=g, dtype=dtype).requires_grad_()
        p.grad = scale * torch.randn(s, generator=g, dtype=dtype)
        params.append(p)
    return params


def _clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        q.grad = p.grad.clone()
        out.append(q)
    return out


def _grad_for_norm(norm: float) -> torch.Tensor:
    return torch.tensor([norm * 0.6, norm * 0.8], dtype=torch.float64)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e3])
def test_norm_matches_clip_grad_norm(norm_type, max_norm):
    ours = _params()
    ref = _clone(ours)
    res = NormClip(max_norm=max_norm, norm_type=norm_type).clip_(ours)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type)
    torch.testing.assert_close(res.norm_pre.double(), ref_total, rtol=1e-6, atol=0)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12)
    assert bool(res.clipped) == (float(ref_total) > max_norm)
    post = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad, norm_type) for p in ours]), norm_type)
    torch.testing.assert_close(res.norm_post.double(), post, rtol=1e-5, atol=0)
    # and the parameters after an SGD step are the same
    for group in (ours, ref):
        torch.optim.SGD(group, lr=0.1).step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("clip_value", [0.1, 0.7, 100.0])
def test_value_matches_clip_grad_value(clip_value):
    ours = _params(1)
    ref = _clone(ours)
    res = ValueClip(clip_value=clip_value).clip_(ours)
    torch.nn.utils.clip_grad_value_(ref, clip_value)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    max_abs = max(float(q.grad.abs().max()) for q in _params(1))
    assert bool(res.clipped) == (max_abs > clip_value)


def _agc_reference(weights: list[np.ndarray], grads: list[np.ndarray], clip_factor: float, eps: float,
                   skip: set[int] = frozenset()) -> list[np.ndarray]:
    """AGC written unit by unit in float64 numpy, independent of the implementation."""
    out = []
    for i, (w, g) in enumerate(zip(weights, grads)):
        g = g.copy()
        if i in skip:
            out.append(g)
            continue
        if w.ndim <= 1:
            units = [Ellipsis]
        else:
            units = [(r,) for r in range(w.shape[0])]
        for u in units:
            w_norm = math.sqrt(float(np.sum(w[u] ** 2)))
            g_norm = math.sqrt(float(np.sum(g[u] ** 2)))
            max_norm = max(w_norm, eps) * clip_factor
            if g_norm > max_norm:
                g[u] = g[u] * (max_norm / max(g_norm, 1e-6))
        out.append(g)
    return out


@pytest.mark.parametrize("clip_factor", [0.01, 0.3, 10.0])
def test_agc_matches_unitwise_formula(clip_factor):
    params = _params(2, scale=0.5)
    with torch.no_grad():
        params[1].zero_()  # a zero-initialised unit: eps decides its bound
    w_np = [p.detach().numpy().copy() for p in params]
    g_np = [p.grad.numpy().copy() for p in params]
    res = AGC(clip_factor=clip_factor, eps=1e-3).clip_(params)
    expected = _agc_reference(w_np, g_np, clip_factor, 1e-3)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.grad.numpy(), e, rtol=1e-12, atol=1e-15)
    pre = math.sqrt(sum(float(np.sum(g ** 2)) for g in g_np))
    post = math.sqrt(sum(float(np.sum(g ** 2)) for g in expected))
    assert float(res.norm_pre) == pytest.approx(pre, rel=1e-6)
    assert float(res.norm_post) == pytest.approx(post, rel=1e-6)
    assert bool(res.clipped) == any(not np.array_equal(g, e) for g, e in zip(g_np, expected))


def test_agc_non_contiguous_grad_and_conv():
    conv = nn.Conv2d(3, 4, 3).double()
    conv.weight.grad = torch.randn(4, 3, 3, 3, dtype=torch.float64).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    conv.bias.grad = torch.randn(4, dtype=torch.float64)
    assert not conv.weight.grad.is_contiguous()
    w_np = [p.detach().numpy().copy() for p in conv.parameters()]
    g_np = [p.grad.numpy().copy() for p in conv.parameters()]
    AGC(clip_factor=0.05).clip_(conv.parameters())
    for p, e in zip(conv.parameters(), _agc_reference(w_np, g_np, 0.05, 1e-3)):
        np.testing.assert_allclose(p.grad.numpy(), e, rtol=1e-12)


def test_agc_exclude_auto_and_by_name():
    def net():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        m(torch.randn(16, 4, dtype=torch.float64)).pow(2).sum().mul(100).backward()
        return m

    m = net()
    w_np = [p.detach().numpy().copy() for p in m.parameters()]
    g_np = [p.grad.numpy().copy() for p in m.parameters()]
    agc = AGC(clip_factor=0.01, exclude="auto").bind(m)
    assert agc.excluded_names == ["4.weight", "4.bias"]
    agc.clip_(m.parameters())
    expected = _agc_reference(w_np, g_np, 0.01, 1e-3, skip={4, 5})
    for p, e in zip(m.parameters(), expected):
        np.testing.assert_allclose(p.grad.numpy(), e, rtol=1e-12)
    assert not np.array_equal(g_np[0], expected[0])  # the hidden layers were clipped

    m2 = net()
    AGC(clip_factor=0.01, exclude=["0", "2.bias"]).bind(m2).clip_(m2.parameters())
    expected = _agc_reference(w_np, g_np, 0.01, 1e-3, skip={0, 1, 3})
    for p, e in zip(m2.parameters(), expected):
        np.testing.assert_allclose(p.grad.numpy(), e, rtol=1e-12)


@pytest.mark.parametrize("percentile,history,steps", [(10.0, 1000, 30), (50.0, 7, 20), (0.0, 5, 9), (100.0, 4, 10),
                                                      (37.5, 16, 16)])
def test_autoclip_threshold_is_numpy_percentile(percentile, history, steps):
    rng = np.random.default_rng(0)
    norms = np.exp(rng.normal(0.0, 1.0, steps))
    ac = AutoClip(percentile=percentile, history=history)
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    seen = []
    for n in norms:
        p.grad = _grad_for_norm(n)
        res = ac.clip_([p])
        seen.append(n)
        window = np.asarray(seen[-history:], dtype=np.float32)
        expected = np.percentile(window, percentile)
        assert float(res.threshold) == pytest.approx(expected, rel=1e-6)
        np.testing.assert_allclose(ac.recorded().numpy(), window, rtol=1e-7)
        # clip_grad_norm_'s rule to that threshold
        assert float(p.grad.norm()) == pytest.approx(min(n, n * expected / (n + 1e-6)), rel=1e-6)


def test_autoclip_ignores_nonfinite_norms():
    ac = AutoClip(percentile=50, history=10)
    p = torch.zeros(2, requires_grad=True)
    for n in [1.0, 2.0, float("inf"), 3.0]:
        p.grad = _grad_for_norm(n).float()
        res = ac.clip_([p])
    assert float(res.threshold) == pytest.approx(np.percentile([1.0, 2.0, 3.0], 50))
    p.grad = torch.tensor([float("inf"), 1.0])
    ac.clip_([p])
    assert not torch.isnan(p.grad).any()


class _ZClipReference:
    """The published ZClip update, step by step in Python floats (written from the paper's algorithm)."""

    def __init__(self, alpha, z_thresh, warmup, mode="zscore", option="adaptive_scaling", max_norm=None, eps=1e-6):
        self.alpha, self.z, self.warmup, self.mode, self.option = alpha, z_thresh, warmup, mode, option
        self.max_norm, self.eps = max_norm, eps
        self.buf, self.mu, self.var = [], None, None

    def step(self, g: float) -> float:
        """Return the norm after clipping."""
        if self.mu is None:
            self.buf.append(g)
            if len(self.buf) == self.warmup:
                self.mu = sum(self.buf) / len(self.buf)
                self.var = sum((x - self.mu) ** 2 for x in self.buf) / len(self.buf)
            if self.max_norm is None:
                return g
            return g * min(1.0, self.max_norm / (g + 1e-6))  # clip_grad_norm_ during warm-up
        sd = math.sqrt(self.var)
        new = None
        if self.mode == "percentile":
            if g > self.mu + self.z * sd:
                new = self.mu + self.z * sd
        else:
            zs = (g - self.mu) / (sd + self.eps)
            if zs > self.z:
                new = self.mu + self.z * sd / (zs / self.z) if self.option == "adaptive_scaling" else self.mu
        x = g if new is None else new
        bound = x if self.max_norm is None else min(x, self.max_norm)
        self.mu = self.alpha * self.mu + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mu) ** 2
        return g * bound / (g + 1e-6) if g > bound else g


def _spiky_norms(n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    norms = list(1.0 + 0.1 * rng.standard_normal(n))
    for i in range(12, n, 9):
        norms[i] *= float(rng.uniform(2.0, 30.0))
    return norms


@pytest.mark.parametrize("kwargs", [
    {},
    {"clip_option": "mean"},
    {"mode": "percentile"},
    {"max_norm": 1.05, "warmup_steps": 5},
    {"max_norm": 1.0},  # the official code's cap (bpkit's default is None)
    {"alpha": 0.9, "z_thresh": 1.5, "warmup_steps": 3},
])
def test_zclip_matches_reference(kwargs):
    cfg = {"alpha": 0.97, "z_thresh": 2.5, "warmup_steps": 10, "max_norm": None, **kwargs}
    zc = ZClip(**cfg)
    ref = _ZClipReference(cfg["alpha"], cfg["z_thresh"], cfg["warmup_steps"], cfg.get("mode", "zscore"),
                          cfg.get("clip_option", "adaptive_scaling"), cfg.get("max_norm"))
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    clipped = 0
    for g in _spiky_norms(80):
        p.grad = _grad_for_norm(g)
        res = zc.clip_([p])
        expected = ref.step(g)
        assert float(p.grad.norm()) == pytest.approx(expected, rel=1e-5)
        assert float(res.norm_post) == pytest.approx(expected, rel=1e-5)
        clipped += bool(res.clipped)
    assert clipped >= 5
    assert float(zc.stats.mean) == pytest.approx(ref.mu, rel=1e-5)
    assert float(zc.stats.var) == pytest.approx(ref.var, rel=1e-4)


def test_zclip_default_has_no_cap_and_leaves_calm_steps_bitwise():
    """At its defaults ZClip clips nothing in warm-up and nothing that is not an outlier, however large the norm
    (the official code's cap of 1.0 would clip all of these), and still pulls a spike back."""
    zc = ZClip()
    assert zc.max_norm is None
    rng = np.random.default_rng(0)
    p = torch.zeros(3, requires_grad=True)
    for step in range(60):
        g = torch.as_tensor(rng.standard_normal(3), dtype=torch.float32)
        g = g / g.norm() * float(20.0 + rng.uniform(-1.0, 1.0))  # calm: norms 20 +- 1, uniform (|z| < 1.8)
        p.grad = g.clone()
        res = zc.clip_([p])
        assert torch.equal(p.grad, g) and not bool(res.clipped), step
    p.grad = torch.tensor([200.0, 0.0, 0.0])
    res = zc.clip_([p])
    assert bool(res.clipped) and float(p.grad.norm()) < 25.0


def test_zclip_nonfinite_leaves_grads_and_stats():
    zc = ZClip(warmup_steps=3)
    p = torch.zeros(2, requires_grad=True)
    for g in [1.0, 1.2, 0.8, 1.0]:
        p.grad = _grad_for_norm(g).float()
        zc.clip_([p])
    mean, var = zc.stats.mean.clone(), zc.stats.var.clone()
    p.grad = torch.tensor([float("inf"), 1.0])
    res = zc.clip_([p])
    assert torch.equal(p.grad, torch.tensor([float("inf"), 1.0])) and not bool(res.clipped)
    assert torch.equal(zc.stats.mean, mean) and torch.equal(zc.stats.var, var)


def test_skip_flags_match_reference_and_leave_grads():
    norms = _spiky_norms(60, seed=3) + [float("nan")]
    sk = SkipOnSpike(z_thresh=4.0, warmup_steps=8)
    # reference: ZClip statistics, skipped norms not folded in
    buf, mu, var, alpha = [], None, None, 0.97
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    skipped = 0
    for g in norms:
        p.grad = _grad_for_norm(g)
        before = p.grad.clone()
        res = sk.clip_([p])
        if mu is None:
            buf.append(g)
            expect = not math.isfinite(g)
            if len(buf) == 8:
                mu = sum(buf) / 8
                var = sum((x - mu) ** 2 for x in buf) / 8
        else:
            expect = (not math.isfinite(g)) or (g - mu) / (math.sqrt(var) + 1e-6) > 4.0
            if not expect:
                mu = alpha * mu + (1 - alpha) * g
                var = alpha * var + (1 - alpha) * (g - mu) ** 2
        assert bool(res.skip) == expect
        torch.testing.assert_close(p.grad, before, equal_nan=True)
        skipped += expect
    assert skipped >= 3


@pytest.mark.parametrize("name,kwargs", [("autoclip", {"percentile": 30, "history": 5}), ("zclip", {"warmup_steps": 4}),
                                         ("skip", {"warmup_steps": 4, "z_thresh": 2.0})])
def test_state_dict_round_trip(name, kwargs):
    norms = _spiky_norms(40, seed=5)
    a = make_policy(name, **kwargs)
    p = torch.zeros(2, requires_grad=True)
    for g in norms[:17]:
        p.grad = _grad_for_norm(g).float()
        a.clip_([p])
    b = make_policy(name, **kwargs)
    b.load_state_dict(a.state_dict())
    for g in norms[17:]:
        outs = []
        for pol in (a, b):
            p.grad = _grad_for_norm(g).float()
            res = pol.clip_([p])
            outs.append((float(res.threshold), float(p.grad.norm()), bool(res.clipped)))
        assert outs[0] == outs[1]


def test_registry_names():
    assert set(POLICIES) == {"norm", "value", "agc", "autoclip", "zclip", "skip"}
    for name, cls in POLICIES.items():
        assert isinstance(make_policy(name), cls) and cls.name == name


@pytest.mark.parametrize("name,kwargs,match", [
    ("bogus", {}, r"policy='bogus' is invalid: expected one of norm, value, agc"),
    ("norm", {"max_norm": -1.0}, r"max_norm=-1.0 is invalid: expected a number > 0"),
    ("norm", {"max_norm": 0}, r"max_norm=0 is invalid"),
    ("norm", {"norm_type": 0.5}, r"norm_type=0.5 is invalid"),
    ("value", {"clip_value": -0.1}, r"clip_value=-0.1 is invalid"),
    ("agc", {"clip_factor": -0.01}, r"clip_factor=-0.01 is invalid"),
    ("agc", {"eps": -1.0}, r"eps=-1.0 is invalid"),
    ("autoclip", {"percentile": 101}, r"percentile=101 is invalid: expected a number >= 0.0 and <= 100.0"),
    ("autoclip", {"percentile": -1}, r"percentile=-1 is invalid"),
    ("autoclip", {"history": 0}, r"history=0 is invalid: expected an integer >= 1"),
    ("zclip", {"alpha": 1.0}, r"alpha=1.0 is invalid"),
    ("zclip", {"z_thresh": -2.5}, r"z_thresh=-2.5 is invalid"),
    ("zclip", {"warmup_steps": 0}, r"warmup_steps=0 is invalid"),
    ("zclip", {"mode": "median"}, r"mode='median' is invalid: expected one of zscore, percentile"),
    ("skip", {"z_thresh": 0}, r"z_thresh=0 is invalid"),
    ("norm", {"max_nrom": 1.0}, r"norm.max_nrom=1.0 is invalid: expected arguments of the 'norm' policy: max_norm"),
])
def test_bad_input(name, kwargs, match):
    with pytest.raises(BpkitConfigError, match=match):
        make_policy(name, **kwargs)


def test_agc_bad_module_and_names():
    with pytest.raises(BpkitConfigError, match=r"module='ReLU' is invalid: expected a module with parameters"):
        AGC().bind(nn.ReLU())
    with pytest.raises(BpkitConfigError, match=r"exclude='head' is invalid: expected a module or parameter name"):
        AGC(exclude="head").bind(nn.Linear(2, 2))
    with pytest.raises(BpkitConfigError, match=r"exclude='auto' is invalid: expected AGC.bind\(model\)"):
        lin = nn.Linear(2, 2)
        lin(torch.randn(3, 2)).sum().backward()
        AGC(exclude="auto").clip_(lin.parameters())


def test_norm_never_makes_nan():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([float("inf"), 1.0, -2.0])
    res = NormClip(max_norm=1.0).clip_([p])
    assert torch.equal(p.grad, torch.tensor([float("inf"), 1.0, -2.0])) and not bool(res.clipped)


@pytest.mark.parametrize("name", ["norm", "value", "agc", "autoclip", "zclip", "skip"])
def test_bf16_grads(name):
    lin = nn.Linear(8, 4).to(torch.bfloat16)
    lin(torch.randn(5, 8, dtype=torch.bfloat16)).float().pow(2).sum().mul(50).backward()
    res = make_policy(name).clip_(lin.parameters())
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in lin.parameters())
    assert res.threshold.dtype == torch.float32
