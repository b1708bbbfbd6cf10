"""bpkit.GradientProbe: the framework-free gradient engine, in plain PyTorch loops and Lightning Fabric."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from bpkit import GradientProbe
from bpkit.detect import NonFiniteGradientError
from bpkit.errors import BpkitConfigError
from examples import fabric_loop, plain_loop
from tests.hostreads import HostReadCounter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return model(torch.randn(16, 5, generator=g)).pow(2).mean()


def test_log_step_metrics_equal_a_float64_reference():
    model = _net()
    ref = _net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    probe = GradientProbe(model, log_every_n_steps=4, histograms=False)
    for step in range(8):
        _loss(model, step).backward()
        g = torch.Generator().manual_seed(step)
        ref(torch.randn(16, 5, generator=g).double()).pow(2).mean().backward()
        expected = {f"grad/norm/{n}": p.grad.norm().item() for n, p in ref.named_parameters()}
        expected.update({f"grad/max/{n}": p.grad.abs().max().item() for n, p in ref.named_parameters()})
        expected["grad/norm_total"] = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm().item()
        before = {n: p.detach().clone() for n, p in ref.named_parameters()}
        assert probe.step(step) is True
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        if probe.is_log_step(step):
            metrics = probe.flush()
            assert probe.flushed_step == step
            for key, value in expected.items():
                assert metrics[key] == pytest.approx(value, rel=1e-5), key
            for n, p in ref.named_parameters():
                ratio = ((p - before[n]).norm() / before[n].norm()).item()
                assert metrics[f"update/ratio/{n}"] == pytest.approx(ratio, rel=1e-4)
        else:
            assert not probe.pending
    assert probe.flush() == {}  # nothing left


@pytest.mark.parametrize("samples", [None, 2048])
def test_every_statistic_every_step_on_a_model_above_the_cpu_per_tensor_threshold(samples):
    """300x300 layers (more than 64k elements: the CPU's one-read max and update paths) against float64; histograms
    exact, or sampled (``histogram_samples``): estimated counts that add up to each tensor's size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 4))
    ref = nn.Sequential(*[type(m)(*m.weight.shape[::-1]) if isinstance(m, nn.Linear) else nn.ReLU() for m in model])
    ref.load_state_dict(model.state_dict())
    ref = ref.double()
    opt, ref_opt = torch.optim.Adam(model.parameters(), 1e-3), torch.optim.Adam(ref.parameters(), 1e-3)
    probe = GradientProbe(model, log_every_n_steps=1, histogram_every_n_steps=1, histogram_samples=samples)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(32, 300, generator=g)
        model(x).pow(2).mean().backward()
        ref(x.double()).pow(2).mean().backward()
        before = {n: p.detach().clone() for n, p in ref.named_parameters()}
        probe.step(step)
        opt.step()
        ref_opt.step()
        metrics = probe.flush()
        for n, p in ref.named_parameters():
            assert metrics[f"grad/max/{n}"] == pytest.approx(p.grad.abs().max().item(), rel=1e-5)
            assert metrics[f"grad/norm/{n}"] == pytest.approx(p.grad.norm().item(), rel=1e-5)
            ratio = ((p - before[n]).norm() / before[n].norm()).item()
            assert metrics[f"update/ratio/{n}"] == pytest.approx(ratio, rel=1e-3)
            counts, edges = probe.last_histograms[f"weight/hist/{n}"]
            assert len(edges) == len(counts) + 1
            if samples is None or sizes[n] <= samples:
                assert counts.sum() == sizes[n]  # exact (no zeros among the weights)
            else:
                assert abs(int(counts.sum()) - sizes[n]) <= len(counts)  # scaled estimates, rounded per bin
        opt.zero_grad()
        ref_opt.zero_grad()


def test_named_parameters_and_no_host_read_between_log_steps():
    model = _net()
    probe = GradientProbe(list(model.named_parameters()), log_every_n_steps=10, on_nonfinite="warn")
    with HostReadCounter() as reads:
        for step in range(9):  # no log step
            _loss(model, step).backward()
            probe.step(step, loss=_loss(model, step).detach())
            model.zero_grad()
    assert reads.count == 0, reads.sites
    metrics = probe.flush()  # buffered steps are read and replayed; no log step pending: no per-layer metrics
    assert "grad/norm_total" not in metrics


def test_nan_step_is_skipped_and_weights_and_state_are_untouched():
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    probe = GradientProbe(model, log_every_n_steps=2)
    _loss(model, 0).backward()
    assert probe.step(0)
    opt.step()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    (_loss(model, 1) * float("nan")).backward()
    assert probe.step(1) is False
    assert all(p.grad is None for p in model.parameters())
    opt.step()  # even a step taken anyway changes nothing: the gradients are gone
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(v, opt.state[model[0].weight][k]) for k, v in state.items())
    metrics = probe.flush()
    assert metrics["grad/skipped_steps"] == 1.0 and metrics["grad/alert/nonfinite"] == 1.0
    assert [a.kind for a in probe.take_new_alerts()] == ["nonfinite"]
    assert probe.take_new_alerts() == []


def test_raise_and_stop_actions():
    model = _net()
    probe = GradientProbe(model, on_nonfinite="raise")
    (_loss(model, 0) * float("inf")).backward()
    with pytest.raises(NonFiniteGradientError, match="0.weight"):
        probe.step(0)
    model.zero_grad()
    probe = GradientProbe(model, on_nonfinite="stop")
    (_loss(model, 0) * float("nan")).backward()
    assert probe.step(0) is False and probe.should_stop


def test_two_optimizers_each_watch_their_own_parameters():
    model = _net()
    opt_a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model[2].parameters(), lr=0.1)
    probe = GradientProbe(model, log_every_n_steps=1, histograms=False, optimizers=[opt_a, opt_b])
    _loss(model, 0).backward()
    expected_a = torch.stack([p.grad.norm() for p in model[0].parameters()]).norm().item()
    probe.step(0, optimizer=opt_a)
    probe.step(0, optimizer=opt_b)
    metrics = probe.flush()
    assert metrics["grad/opt0/norm_total"] == pytest.approx(expected_a, rel=1e-6)
    assert "grad/norm/opt0/0.weight" in metrics and "grad/norm/opt1/2.weight" in metrics
    assert "grad/norm/opt0/2.weight" not in metrics


def test_state_dict_round_trip_keeps_alerts_and_rules():
    model = _net()
    probe = GradientProbe(model, log_every_n_steps=1)
    (_loss(model, 0) * float("nan")).backward()
    probe.step(0)
    probe.flush()
    state = probe.state_dict()
    other = GradientProbe(_net(), log_every_n_steps=1)
    other.load_state_dict(state)
    assert [a.to_dict()["message"] for a in other.alerts] == [a.to_dict()["message"] for a in probe.alerts]
    assert other.skipped_steps == 1
    assert other.state_dict()["plans"] == state["plans"]


@pytest.mark.parametrize("kwargs, key", [
    (dict(on_nonfinite="ignore"), "on_nonfinite"),
    (dict(group_by="layer"), "group_by"),
    (dict(log_every_n_steps=-1), "log_every_n_steps"),
    (dict(vanishing={"rel_mx": 1e-3}), "vanishing.rel_mx"),
    (dict(histogram_samples=0), "histogram_samples"),
    (dict(histogram_samples="many"), "histogram_samples"),
])
def test_bad_options_name_the_key(kwargs, key):
    with pytest.raises(BpkitConfigError, match=key.replace(".", r"\.")):
        GradientProbe(_net(), **kwargs)


def test_bad_model_and_globs_are_clear_errors():
    with pytest.raises(BpkitConfigError, match="model"):
        GradientProbe(42)
    model = _net()
    probe = GradientProbe(model, include="encoder.*")
    _loss(model, 0).backward()
    with pytest.raises(BpkitConfigError, match=r"include.*encoder\.\*.*0\.weight"):
        probe.step(0)


def test_plain_loop_example_finds_the_planted_vanishing_and_skips_the_nan_step(capsys):
    # ground truth first: the first layer's gradient is below 1e-6 of the last layer's at initialisation
    torch.manual_seed(0)
    model = plain_loop.make_model().double()
    x, y = next(plain_loop.batches(1, nan_at=-1))
    nn.functional.cross_entropy(model(x.double()), y).backward()
    assert model[0].weight.grad.norm() < 1e-6 * model[-1].weight.grad.norm()

    probe = plain_loop.main(steps=40, nan_at=7)
    kinds = {a.kind: a for a in probe.alerts}
    assert kinds["nonfinite"].step == 7 and probe.skipped_steps == 1
    assert kinds["vanishing"].where.startswith("0.weight")
    assert all(torch.isfinite(p).all() for p in probe.model.parameters())
    assert "skipped steps: 1; weights finite: True" in capsys.readouterr().out


def test_fabric_example_in_bf16_uses_the_users_names_and_logs_through_fabric(tmp_path):
    from lightning.fabric.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="fabric")
    probe = fabric_loop.main(steps=40, nan_at=7, loggers=[logger])
    logger.finalize("success")
    kinds = {a.kind: a for a in probe.alerts}
    assert kinds["nonfinite"].step == 7 and probe.skipped_steps == 1
    assert kinds["vanishing"].where.startswith("0.weight")
    assert all("_forward_module" not in a.where for a in probe.alerts)
    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    assert "grad/norm/0.weight" in rows[0] and "grad/norm_total" in rows[0]
    assert [r["step"] for r in rows if r["grad/norm_total"]][:2] == ["9", "19"]


def test_examples_run_as_scripts():
    out = subprocess.run([sys.executable, "examples/plain_loop.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    assert "skipped steps: 1; weights finite: True" in out.stdout


def test_losses_kept_as_tensors_and_written_rows_replay_in_step_order():
    """The common step keeps its loss tensor until the read-back; other steps (a float loss, a micro-batch without
    an optimizer step) write a row: the spike rule and the crash record see them all, in step order."""
    from bpkit.detect import SpikeDetector

    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = GradientProbe(model, log_every_n_steps=7, histograms=False)
    reference = SpikeDetector(("loss", "grad_norm_total"))
    fed = []
    for step in range(30):
        loss = _loss(model, step)
        loss.backward()
        probe.step(step, optimizer=opt)
        total = probe.last_norms.total.item()
        opt.step()
        opt.zero_grad()
        if step % 4 == 3:
            probe.observe_loss(step, float(loss))  # a float: written into a row at once
        elif step % 4 == 1:
            probe.observe_loss(step, loss.double())  # not float32: written too
        else:
            probe.observe_loss(step, loss)  # kept as a tensor
        fed.append((step, [float(loss), total]))
        if probe.is_log_step(step):
            probe.flush()
    probe.flush()
    for step, values in fed:
        reference.update(values, step)
    state = probe._loss_spike.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.allclose(state[key].double(), value.double(), rtol=1e-6), key
    recent = probe.recent_steps()
    assert recent["steps"] == list(range(10, 30))
    assert recent["loss"] == pytest.approx([v[0] for _, v in fed[10:]], rel=1e-6)


def test_a_loss_that_views_a_bigger_tensor_is_copied_not_kept():
    model = _net()
    probe = GradientProbe(model, log_every_n_steps=5, histograms=False)
    per_sample = torch.arange(1.0, 1001.0)
    _loss(model, 0).backward()
    probe.step(0)
    probe.observe_loss(0, per_sample[3])  # a 0-d view into 1000 floats
    assert probe._loss_refs[1] == [] and len(probe._loss_rows) == 1
    model.zero_grad()
    _loss(model, 1).backward()
    probe.step(1)
    probe.observe_loss(1, per_sample[:5].mean())  # its own storage: kept until the read-back
    assert len(probe._loss_refs[1]) == 1
    probe.flush()
    assert probe.recent_steps()["loss"] == [4.0, 3.0]


def test_the_quick_step_path_gives_the_reference_norms_on_every_step(monkeypatch):
    """Steps that neither log nor check take the short path (after the first log step): per-tensor norms, the total
    (what a clipper reuses and the rules replay) equal a float64 reference on every step, and the path is taken."""
    model, ref = _net(), _net().double()
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.05), torch.optim.SGD(ref.parameters(), lr=0.05)
    probe = GradientProbe(model, log_every_n_steps=6, histograms=False, check_every_n_steps=4)
    quick = []
    original = GradientProbe._quick_step

    def counted(self, *args):
        result = original(self, *args)
        quick.append(result is not None)
        return result

    monkeypatch.setattr(GradientProbe, "_quick_step", counted)
    totals = []
    for step in range(24):
        _loss(model, step).backward()
        g = torch.Generator().manual_seed(step)
        ref(torch.randn(16, 5, generator=g).double()).pow(2).mean().backward()
        assert probe.step(step, optimizer=opt) is True
        norms = probe.last_norms
        expected = [p.grad.norm().item() for p in ref.parameters()]
        assert norms.per_tensor.tolist() == pytest.approx(expected, rel=1e-5)
        totals.append(torch.cat([p.grad.flatten() for p in ref.parameters()]).norm().item())
        assert norms.total.item() == pytest.approx(totals[-1], rel=1e-5)
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
        probe.observe_loss(step, _loss(model, 100 + step).detach())
        if probe.is_log_step(step):
            probe.flush()
    probe.flush()
    assert sum(quick) >= 12  # most steps after the first log step (5) are neither log steps nor early checks
    assert probe.recent_steps()["grad_norm_total"] == pytest.approx(totals[-20:], rel=1e-5)
