"""The curvature engine against independent references: the exact Hessian of linear regression
(H = 2/n [X 1]^T [X 1]) and torch.autograd.functional.hessian of a small MLP in float64."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.func import functional_call

from bpkit.curvature import CurvatureProbe, lanczos, preserved_module, preserved_rng, saddle_alert, stability
from bpkit.errors import BpkitConfigError


def _linreg(seed: int, n: int = 300, d: int = 40):
    torch.manual_seed(seed)
    x = torch.randn(n, d) + 0.3
    y = torch.randn(n)
    lin = torch.nn.Linear(d, 1)
    a = torch.cat([x, torch.ones(n, 1)], 1).double()
    h = 2.0 / n * a.T @ a  # the exact Hessian of the MSE, whatever the weights
    return lin, (lambda: torch.nn.functional.mse_loss(lin(x).squeeze(1), y)), h


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_regression_exact_hessian(seed):
    lin, loss_fn, h = _linreg(seed)
    ev = torch.linalg.eigvalsh(h)
    m = CurvatureProbe(seed=seed).measure(loss_fn, list(lin.parameters()), step=0)
    assert m["curvature/lambda_max"] == pytest.approx(ev[-1].item(), rel=0.01)
    assert m["curvature/lambda_min"] == pytest.approx(ev[0].item(), rel=0.05)
    assert m["curvature/trace"] == pytest.approx(h.trace().item(), rel=0.15)
    assert m["curvature/hvps"] <= 20 + 30  # max_iter Lanczos steps and trace_samples probes
    # the stated tolerance: each extreme Ritz value is within its residual of an eigenvalue
    assert abs(m["curvature/lambda_max"] - ev[-1].item()) <= m["curvature/residual"] * ev[-1].item() + 1e-5


def _mlp(seed: int, width: int = 16):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double()
    ref = torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.Tanh(), torch.nn.Linear(width, 3)).double()

    def f(w):
        ps, i = {}, 0
        for k, s in zip(names, shapes):
            ps[k] = w[i:i + s.numel()].reshape(s)
            i += s.numel()
        return torch.nn.functional.cross_entropy(functional_call(ref, ps, (x.double(),)), y)

    h = torch.autograd.functional.hessian(f, flat)
    return net, (lambda: torch.nn.functional.cross_entropy(net(x), y)), h


def test_mlp_against_autograd_hessian():
    errors = []
    for seed in range(5):
        net, loss_fn, h = _mlp(seed)
        ev = torch.linalg.eigvalsh(h)
        assert ev[0] < 0  # an MLP's Hessian is indefinite: lambda_min is a real negative eigenvalue
        m = CurvatureProbe(seed=seed).measure(loss_fn, list(net.parameters()), step=0)
        assert m["curvature/lambda_max"] == pytest.approx(ev[-1].item(), rel=0.01)
        assert m["curvature/lambda_min"] == pytest.approx(ev[0].item(), rel=0.05)
        tr = h.trace().item()
        # unbiased: within 4 standard errors, and the error is what the stderr says
        assert abs(m["curvature/trace"] - tr) <= 4 * m["curvature/trace_stderr"] + 1e-6
        errors.append(abs(m["curvature/trace"] / tr - 1))
    assert max(errors) <= 0.15  # at the default 30 probes (10 probes: up to 23% on these seeds)


def test_lanczos_exact_on_small_and_bounded_by_residual():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    ev = torch.cat([torch.tensor([-4.0, 9.0]), torch.rand(58, generator=g) * 4 - 1]).double()
    a = (q * ev) @ q.T
    r = lanczos(lambda v: a @ v, 60, max_iter=60, tol=1e-8, dtype=torch.float64)
    assert r.lambda_max == pytest.approx(9.0, abs=1e-6) and r.lambda_min == pytest.approx(-4.0, abs=1e-6)
    r = lanczos(lambda v: a @ v, 60, max_iter=8, tol=1e-8, dtype=torch.float64)
    assert not r.converged and r.iterations == 8
    assert abs(r.lambda_max - 9.0) <= r.residual_max + 1e-9


def test_sharpness_x_lr_sgd_momentum_and_adam_against_explicit_matrices():
    lin, loss_fn, h = _linreg(0, n=200, d=10)
    params = list(lin.parameters())
    lam = torch.linalg.eigvalsh(h)[-1].item()
    sgd = torch.optim.SGD(params, lr=0.01)
    m = CurvatureProbe().measure(loss_fn, params, 0, sgd)
    assert m["curvature/sharpness_x_lr"] == pytest.approx(0.01 * lam, rel=0.01)
    assert m["curvature/lr_limit"] == pytest.approx(2 / lam, rel=0.01)
    mom = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    assert CurvatureProbe().measure(loss_fn, params, 0, mom)["curvature/sharpness_x_lr"] == pytest.approx(
        0.01 * lam / 1.9, rel=0.01)
    adam = torch.optim.Adam(params, lr=0.01)
    assert "curvature/sharpness_x_lr" not in CurvatureProbe().measure(loss_fn, params, 0, adam)  # no state yet
    for _ in range(5):
        adam.zero_grad()
        loss_fn().backward()
        adam.step()
    # the reference: Adam's preconditioner P = sqrt(v_hat) + eps, lambda_max(P^-1/2 H P^-1/2) lr (1-b1)/(1+b1)
    v = torch.cat([adam.state[p]["exp_avg_sq"].reshape(-1) for p in params]).double() / (1 - 0.999 ** 5)
    d = 1 / (v.sqrt() + 1e-8).sqrt()
    ref = torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1].item() * 0.01 * 0.1 / 1.9
    got = CurvatureProbe(max_iter=11).measure(loss_fn, params, 0, adam)["curvature/sharpness_x_lr"]
    assert got == pytest.approx(ref, rel=0.01)
    assert stability(adam, params, preconditioned=False).rule == "raw"


def test_saddle_of_x2_minus_y2_and_rules():
    w = torch.nn.Parameter(torch.tensor([1e-4, 1e-4]))
    probe = CurvatureProbe()
    m = probe.measure(lambda: 1.0 + w[0] ** 2 - w[1] ** 2, [w], step=7)
    assert m["curvature/lambda_min"] == pytest.approx(-2.0, rel=1e-4)
    assert [a.kind for a in probe.take_new_alerts()] == ["saddle"]
    w.data = torch.tensor([0.5, 1e-4])  # a large gradient: not stuck
    probe.measure(lambda: 1.0 + w[0] ** 2 - w[1] ** 2, [w], step=8)
    assert probe.take_new_alerts() == []
    assert saddle_alert(0, -0.001, 1.0, 1e-6, 1.0) is None  # negligible negative curvature


@pytest.mark.parametrize("kwargs", [{"every_n_steps": -1}, {"max_iter": 0}, {"tol": 0.0}, {"trace_samples": 1.5},
                                    {"saddle": {"neg": 1}}, {"sharpness": "yes"}, {"preconditioned": "false"}])
def test_bad_options_name_the_key(kwargs):
    with pytest.raises(BpkitConfigError) as err:
        CurvatureProbe(**kwargs)
    assert list(kwargs)[0] in str(err.value)


def test_preserved_rng_and_module():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with preserved_rng():
        random.random(), np.random.rand(), torch.rand(5)
    after = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    assert after == (random.random(), np.random.rand(), torch.rand(1).item())
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Dropout(0.5)).train()
    net[2].eval()
    stats = net[1].running_mean.clone(), int(net[1].num_batches_tracked)
    with preserved_module(net):
        assert not net.training
        net[1].train()
        net(torch.randn(8, 3) + 3)
    assert torch.equal(net[1].running_mean, stats[0]) and int(net[1].num_batches_tracked) == stats[1]
    assert net.training and net[1].training and not net[2].training


def test_plot_sharpness_writes_a_png_with_the_limit_line(tmp_path, monkeypatch):
    import matplotlib.axes

    from bpkit.curvature.plots import plot_sharpness

    lines = []
    original = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                        lambda self, y=0, *a, **k: lines.append(y) or original(self, y, *a, **k))
    out = plot_sharpness([0, 5, 10], [0.4, 2.3, 1.9], tmp_path / "sub" / "s.png", lambda_min_ratio=[-0.3, -0.1, 0.0])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert 2.0 in lines
