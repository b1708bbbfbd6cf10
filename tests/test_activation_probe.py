"""bpkit.ActivationProbe, the framework-free engine of ActivationMonitor: a plain torch loop against statistics
computed by hand, the same metric keys and values as the callback, nothing left on the model, state round trips,
the cross-rank sum, no Lightning import; and ActivationMonitor's alerts across a checkpoint resume."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn
from torch.utils.data import DataLoader

import bpkit
from bpkit import ActivationProbe, BpkitConfigError
from bpkit.callbacks import ActivationMonitor

PROBE_FILE = Path(bpkit.__file__).parent / "probe" / "activation.py"


class TwoBranch(nn.Module):
    """A ReLU branch and a tanh branch side by side, so a dead ReLU does not starve the tanh."""

    def __init__(self, dead: bool = False, saturated: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.relu = nn.Linear(8, 16), nn.ReLU()
        self.b, self.tanh = nn.Linear(8, 16), nn.Tanh()
        self.head = nn.Linear(32, 4)
        with torch.no_grad():
            if dead:
                self.a.bias.fill_(-100.0)  # every ReLU unit is zero for every sample
            if saturated:
                self.b.weight.mul_(50.0)  # |b(x)| >> 3: tanh at +-1 almost everywhere

    def forward(self, x):
        return self.head(torch.cat([self.relu(self.a(x)), self.tanh(self.b(x))], dim=1))


def batches(n: int, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 8, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


class Capture:
    """Module outputs and output gradients through the test's OWN hooks, in float64."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.grad: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.out[name].append(output.detach().double().clone())
            output.register_hook(lambda g: self.grad[name].append(g.detach().double().clone()))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def by_hand(tensors: list[torch.Tensor]) -> dict[str, float]:
    """Over all micro-batches of a step; a unit (last dim) is dead in a micro-batch where it is zero for all of its
    samples, and ``dead_frac`` averages that over the micro-batches."""
    a = torch.cat(tensors)
    dead = [(t == 0).all(dim=0).double().mean().item() for t in tensors]
    return {"mean": a.mean().item(), "std": a.std(unbiased=False).item(), "zero_frac": (a == 0).double().mean().item(),
            "dead_frac": sum(dead) / len(dead)}


# --------------------------------------------------------------------------- a plain torch loop
def test_plain_loop_detects_dead_relu_and_saturated_tanh_with_hand_computed_statistics():
    model = TwoBranch(dead=True, saturated=True)
    names = ["a", "relu", "b", "tanh", "head"]
    probe = ActivationProbe(model, patience=2, gradients=True, bins=8)
    assert probe.names == names
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = batches(6)
    flushed, alerts_per_step = [], []
    for step in range(3):
        ref = Capture(model, names)
        with probe.watch(step):
            for x, y in data[2 * step: 2 * step + 2]:  # two micro-batches summed into one step
                (nn.functional.cross_entropy(model(x), y) / 2).backward()
        ref.remove()
        opt.step()
        opt.zero_grad()
        flushed.append((probe.flush(), ref))
        alerts_per_step.append([(a.kind, a.where) for a in probe.new_alerts])

    for metrics, ref in flushed:
        for name in names:
            want, want_g = by_hand(ref.out[name]), by_hand(ref.grad[name])
            for stat in ("mean", "std", "zero_frac", "dead_frac"):
                assert metrics[f"act/{stat}/{name}"] == pytest.approx(want[stat], rel=1e-5, abs=1e-6), (name, stat)
                tol = 1e-5 * want_g["std"] if stat == "mean" else 1e-12
                assert metrics[f"act_grad/{stat}/{name}"] == pytest.approx(want_g[stat], rel=1e-4, abs=tol)
        tanh = torch.cat(ref.out["tanh"])
        assert metrics["act/saturated_frac/tanh"] == pytest.approx((tanh.abs() > 0.99).double().mean().item())
        assert metrics["act/saturated_frac/tanh"] > 0.5 and "act/saturated_frac/relu" not in metrics
        assert metrics["act/dead_frac/relu"] == 1.0 and metrics["act/zero_frac/relu"] == 1.0
    counts, edges = probe.last_histograms["act/hist/tanh"]  # the last flush's
    assert counts.sum() == 2 * 16 * 16 and edges.tolist() == pytest.approx(np.linspace(-1, 1, 9).tolist())
    hist = np.histogram(torch.cat(flushed[-1][1].out["tanh"]).clamp(-1, 1).numpy(), bins=8, range=(-1, 1))[0]
    assert counts.tolist() == hist.tolist()
    # patience 2: both alerts at the second flush, none before or after; only the planted modules
    assert alerts_per_step == [[], [("dead", "relu"), ("saturated", "tanh")], []]
    assert [(a.kind, a.step) for a in probe.alerts] == [("dead", 1), ("saturated", 1)]


def test_a_healthy_model_raises_nothing():
    model = TwoBranch()
    probe = ActivationProbe(model, patience=1)
    for step, (x, y) in enumerate(batches(4)):
        with probe.watch(step):
            nn.functional.cross_entropy(model(x), y).backward()
        assert probe.flush()["act/dead_frac/relu"] < 0.5
    assert probe.alerts == []


# --------------------------------------------------------------------------- the same keys and values as the callback
class Lit(LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(callbacks, data, logger=False, max_steps=2):
    trainer = Trainer(accelerator="cpu", callbacks=callbacks, logger=logger, log_every_n_steps=1, max_steps=max_steps,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Lit(TwoBranch()), data)
    return trainer


def _record(root: Path) -> list[dict]:
    return [json.loads(line) for line in open(next(root.rglob("bpkit_record.jsonl")))]


def test_flush_keys_and_values_equal_what_the_callback_logs(tmp_path):
    data = batches(2)
    loader = DataLoader([(x[i], y[i]) for x, y in data for i in range(len(x))], batch_size=16)
    monitor = ActivationMonitor(log_every_n_steps=1, gradients=True, bins=8)
    _fit([monitor], loader, logger=CSVLogger(tmp_path))
    record = _record(tmp_path)
    logged = {e["step"]: e["data"] for e in record if e["type"] == "scalars"}
    logged_hists = {e["step"]: e["data"] for e in record if e["type"] == "histograms"}

    # the same model, the same first batch, in a plain loop
    lit = Lit(TwoBranch())
    probe = ActivationProbe(lit, gradients=True, bins=8)
    x, y = data[0]
    with probe.watch(0):
        nn.functional.cross_entropy(lit(x), y).backward()
    metrics = probe.flush()
    assert set(metrics) == set(logged[0]) == set(logged[1])
    assert any(k.startswith("act_grad/std/") for k in metrics) and "act/saturated_frac/net.tanh" in metrics
    assert set(probe.last_histograms) == set(logged_hists[0])
    for key, value in metrics.items():  # step 0 is measured before the first update in both
        assert logged[0][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    for key, (counts, edges) in probe.last_histograms.items():
        assert logged_hists[0][key]["counts"] == counts.tolist(), key
    assert monitor.probe.names == probe.names and monitor.hook_calls == 2 * len(probe.names)


# --------------------------------------------------------------------------- hooks and the step protocol
def test_nothing_is_left_on_the_model_after_detach_even_on_an_exception():
    model = TwoBranch()
    probe = ActivationProbe(model, gradients=True)

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                   for m in model.modules())

    assert hooks() == 0  # constructing attaches nothing
    probe.attach(0)
    probe.attach(0)  # the next micro-batch of the same step: no second hook
    assert hooks() == len(probe.names) == 5 and probe.attached
    probe.detach()
    assert hooks() == 0 and not probe.attached and probe.pending_step == 0
    with pytest.raises(RuntimeError, match="step 0 are not flushed yet"):
        probe.attach(1)
    with pytest.raises(ZeroDivisionError):
        with probe.watch(0):
            model(torch.randn(4, 8))
            1 / 0
    assert hooks() == 0
    model(torch.randn(4, 8))  # outside the window: not counted
    assert probe.hook_calls == 5
    assert probe.flush()["act/mean/head"] != 0.0 and probe.pending_step is None and hooks() == 0
    assert probe.flush() == {} and probe.last_histograms == {} and probe.new_alerts == []
    with pytest.raises(RuntimeError, match="no model"):
        ActivationProbe(None).attach(0)


def test_state_dict_round_trip_keeps_alerts_and_rules():
    def run(probe, model, steps, first):
        for step in range(first, first + steps):
            x, _ = batches(1, seed=step)[0]
            with probe.watch(step):
                model(x)
            probe.flush()

    model = TwoBranch(dead=True)
    probe = ActivationProbe(model, patience=2)
    run(probe, model, 3, 0)
    assert [(a.kind, a.where, a.step) for a in probe.alerts] == [("dead", "relu", 1)]
    state = json.loads(json.dumps(probe.state_dict()))  # plain data
    assert state["rules"]["flagged"]["dead"] == ["relu"] and state["rules"]["over"]["dead"] == {"relu": 3}

    resumed = ActivationProbe(model, patience=2)
    resumed.load_state_dict(state)
    assert resumed.alerts == probe.alerts and resumed.state_dict() == state
    run(resumed, model, 2, 3)
    assert resumed.alerts == probe.alerts  # already flagged: not raised again
    fresh = ActivationProbe(model, patience=2)  # the control: without the state the alert comes back
    run(fresh, model, 2, 3)
    assert [(a.kind, a.step) for a in fresh.alerts] == [("dead", 4)]


def test_a_cross_rank_sum_equals_one_process_on_the_whole_batch():
    """Two simulated ranks with half the batch each, summed through ``reduce``: the statistics of the whole
    batch, a unit dead only where it is zero on both halves, output gradients divided by the world size."""
    model = TwoBranch()
    with torch.no_grad():
        model.a.bias[:8] = -100.0  # units 0-7 dead on every sample
    x, y = batches(1, size=32)[0]
    x[:16, :] = 0.0
    with torch.no_grad():
        model.a.bias[8] = 0.0  # unit 8 is zero on rank 0's half (zero input), alive on rank 1's
        model.a.weight[8] = 1.0

    whole = ActivationProbe(model, gradients=True, bins=8)
    with whole.watch(0):
        nn.functional.cross_entropy(model(x), y).backward()
    want = whole.flush()

    bufs: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(2, timeout=60)

    def reduce_for(rank):
        def reduce(t):
            bufs[rank] = t.clone()
            barrier.wait()
            return bufs[0] + bufs[1]
        return reduce

    copies = [copy.deepcopy(model) for _ in range(2)]
    ranks = [ActivationProbe(copies[r], gradients=True, bins=8, world_size=2, reduce=reduce_for(r)) for r in range(2)]
    for r, probe in enumerate(ranks):
        part = slice(16 * r, 16 * (r + 1))
        with probe.watch(0):
            nn.functional.cross_entropy(copies[r](x[part]), y[part]).backward()
    results: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, ranks[r].flush())) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1]
    assert set(results[0]) == set(want)
    assert want["act/dead_frac/relu"] == 0.5  # units 0-7; unit 8 lives on the second half
    for key, value in want.items():
        assert results[0][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for key, (counts, _) in whole.last_histograms.items():
        assert ranks[0].last_histograms[key][0].tolist() == counts.tolist(), key


# --------------------------------------------------------------------------- layering and bad input
def test_the_probe_imports_no_lightning():
    tree = ast.parse(PROBE_FILE.read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported and not [m for m in imported if m.split(".")[0] in ("lightning", "pytorch_lightning",
                                                                        "lightning_fabric")]
    assert not [m for m in imported if m.startswith("bpkit.callbacks")]
    code = ("import sys, torch; from bpkit import ActivationProbe; p = ActivationProbe(torch.nn.Linear(2, 2)); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_glob_matching_nothing_names_the_glob_and_the_modules():
    with pytest.raises(BpkitConfigError, match=r"modules='enc\.\*' is invalid: .*5 modules: a, relu, b, tanh, head"):
        ActivationProbe(TwoBranch(), modules=["head", "enc.*"])
    probe = ActivationProbe(None, modules="enc.*")  # no model yet: checked when one is bound
    with pytest.raises(BpkitConfigError, match=r"modules='enc\.\*'"):
        probe.bind(TwoBranch())
    assert ActivationProbe(TwoBranch(), modules=["t*", "a"]).names == ["a", "tanh"]


@pytest.mark.parametrize("kwargs,match", [
    ({"modules": []}, r"modules=\[\]"), ({"modules": 3}, "modules=3"), ({"bins": 0}, "bins=0"),
    ({"histograms": "no"}, "histograms='no'"), ({"gradients": 1}, "gradients=1"),
    ({"hist_range": (1, -1)}, "hist_range"),
    ({"dead_threshold": 1.0}, "dead_threshold=1.0"), ({"saturation_threshold": 0.5}, "saturation_threshold=0.5"),
    ({"patience": 0}, "patience=0"), ({"reduce": 3}, "reduce=3"), ({"world_size": 0}, "world_size=0"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(BpkitConfigError, match=match):
        ActivationProbe(None, **kwargs)


def test_a_model_that_is_not_a_module_is_named():
    with pytest.raises(BpkitConfigError, match="model='dict' is invalid: expected a torch.nn.Module"):
        ActivationProbe({"a": 1})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the callback: alerts across a resume
class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.metrics: dict[int, dict[str, float]] = {}

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, *args, **kwargs):
        pass


def test_monitor_alerts_survive_a_checkpoint_resume_and_are_logged(tmp_path):
    data = DataLoader([(x[i], y[i]) for x, y in batches(8) for i in range(16)], batch_size=16)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    monitor, logger = ActivationMonitor(log_every_n_steps=1, patience=2), MemoryLogger()
    trainer = Trainer(accelerator="cpu", max_steps=3, callbacks=[monitor, ckpt], logger=logger, log_every_n_steps=1,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Lit(TwoBranch(dead=True)), data)
    assert [(a.kind, a.where, a.step) for a in monitor.alerts] == [("dead", "net.relu", 1)]
    assert logger.metrics[1]["act/alert/dead"] == 1.0
    assert not any("act/alert/dead" in logger.metrics[s] for s in (0, 2))

    resumed, logger2 = ActivationMonitor(log_every_n_steps=1, patience=2), MemoryLogger()
    trainer = Trainer(accelerator="cpu", max_steps=6, callbacks=[resumed], logger=logger2, log_every_n_steps=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Lit(TwoBranch()), data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert sorted(logger2.metrics) == [3, 4, 5]  # resumed after step 2: still dead, already flagged
    assert logger2.metrics[3]["act/dead_frac/net.relu"] == 1.0
    assert resumed.alerts == monitor.alerts and resumed.probe.alerts == monitor.alerts
    assert not any(k.startswith("act/alert/") for m in logger2.metrics.values() for k in m)
    assert resumed.state_dict()["rules"] == monitor.state_dict()["rules"] | {
        "over": {"dead": {"net.relu": 6}, "saturated": {}}}
