"""GradientMonitor through the real Lightning Trainer, against float64 references."""

import glob
import json
import math
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bpkit import BpkitConfigError
from bpkit.callbacks import GradientMonitor
from bpkit.detect import NonFiniteGradientError
from tests._helpers import MemoryLogger, OpRecorder, sgd_or_adam, step_if_manual
from tests.hostreads import HostReadCounter

warnings.filterwarnings("ignore", ".*bpkit.*")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run records, checkpoints and W&B files land in a temporary directory."""
    monkeypatch.chdir(tmp_path)


class Net(pl.LightningModule):
    def __init__(self, depth=3, width=16, lr=0.05, nan_at=None, nan_param="layers.2.weight", manual=False,
                 optimizer="sgd"):
        super().__init__()
        torch.manual_seed(0)
        sizes = [8] + [width] * (depth - 1)
        self.layers = nn.Sequential(*[m for i in range(depth - 1) for m in (nn.Linear(sizes[i], sizes[i + 1]),
                                                                            nn.Tanh())])
        self.head = nn.Linear(sizes[-1], 3)
        self.lr, self.nan_at, self.nan_param, self.optimizer_name = lr, nan_at, nan_param, optimizer
        self.automatic_optimization = not manual

    def forward(self, x):
        return self.head(self.layers(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        step_if_manual(self, loss)
        return loss

    def on_after_backward(self):
        if self.nan_at is not None and self.global_step == self.nan_at:
            dict(self.named_parameters())[self.nan_param].grad[0, 0] = float("nan")

    def configure_optimizers(self):
        return sgd_or_adam(self, self.optimizer_name, self.lr)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(256, 8, generator=g)
        y = torch.randint(0, 3, (256,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=16)


def _trainer(callbacks, steps=6, logger=None, **kw):
    kw.setdefault("accelerator", "cpu")
    return pl.Trainer(max_steps=steps, callbacks=callbacks, logger=logger if logger is not None else False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      log_every_n_steps=1, **kw)


class GradRecorder(Callback):
    """Runs after the monitor in on_before_optimizer_step: keeps float64 copies of the gradients it sees
    and the norms the monitor published for GradientClipping."""

    def __init__(self):
        self.grads, self.published = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for p in pl_module.parameters() if p.grad is not None]
        self.grads.append({n: p.grad.detach().double().clone() for n, p in pl_module.named_parameters()
                           if p.grad is not None})
        monitor = next(c for c in trainer.callbacks if isinstance(c, GradientMonitor))
        entry = monitor.step_norms(trainer, pl_module, optimizer)
        entry = entry if entry is not None and entry.param_ids == tuple(id(p) for p in params) else None
        self.published.append(None if entry is None else (entry.per_tensor.clone(), entry.total.clone()))


def _check_against_reference(logger, recorder, rel=1e-5):
    assert len(logger.metrics) == len(recorder.grads)
    for (step, logged), grads in zip(sorted(logger.metrics.items()), recorder.grads):
        for name, g in grads.items():
            assert logged[f"grad/norm/{name}"] == pytest.approx(torch.linalg.vector_norm(g).item(), rel=rel)
            assert logged[f"grad/max/{name}"] == pytest.approx(g.abs().max().item(), rel=rel)
        copies = [nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
        for c, g in zip(copies, grads.values()):
            c.grad = g.clone()
        total = torch.nn.utils.clip_grad_norm_(copies, float("inf")).item()
        assert logged["grad/norm_total"] == pytest.approx(total, rel=rel)
    for (per_tensor, total), grads in zip(recorder.published, recorder.grads):
        ref = [torch.linalg.vector_norm(g).item() for g in grads.values()]
        assert per_tensor.tolist() == pytest.approx(ref, rel=rel)


def test_norms_equal_float64_reference_and_are_published_for_clipping():
    logger, rec, mon = MemoryLogger(), GradRecorder(), GradientMonitor(log_every_n_steps=1)
    _trainer([mon, rec], logger=logger).fit(Net())
    _check_against_reference(logger, rec)
    assert all(p is not None for p in rec.published)
    keys = logger.keys()
    for prefix in ("grad/norm/", "grad/max/", "weight/norm/", "update/ratio/"):
        assert f"{prefix}head.weight" in keys


def test_bf16_mixed_precision_norms_are_of_the_fp32_gradients():
    logger, rec = MemoryLogger(), GradRecorder()
    _trainer([GradientMonitor(log_every_n_steps=1), rec], logger=logger, precision="bf16-mixed").fit(Net())
    assert all(g.dtype == torch.float64 for g in rec.grads[0].values())
    _check_against_reference(logger, rec)


def test_16_mixed_norms_are_unscaled():
    """Trainer(precision="16-mixed") falls back to bf16 on CPU, so the fp16 plugin is passed explicitly:
    torch.autocast(float16) on CPU with torch.amp.GradScaler("cpu"). The hook must see unscaled grads."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    logger, rec = MemoryLogger(), GradRecorder()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    trainer = _trainer([GradientMonitor(log_every_n_steps=1), rec], logger=logger, plugins=[plugin])
    trainer.fit(Net())
    assert trainer.precision_plugin.scaler.get_scale() >= 2.0**15  # a scale that would show if left in
    _check_against_reference(logger, rec)
    logger32 = MemoryLogger()
    _trainer([GradientMonitor(log_every_n_steps=1)], logger=logger32).fit(Net())
    first16, first32 = logger.metrics[min(logger.metrics)], logger32.metrics[min(logger32.metrics)]
    assert first16["grad/norm_total"] == pytest.approx(first32["grad/norm_total"], rel=2e-2)


def test_gradient_accumulation_is_seen_once_per_optimizer_step():
    logger, rec = MemoryLogger(), GradRecorder()
    trainer = _trainer([GradientMonitor(log_every_n_steps=1), rec], steps=3, logger=logger,
                       accumulate_grad_batches=2)
    trainer.fit(Net())
    assert len(rec.grads) == 3 == trainer.global_step
    _check_against_reference(logger, rec)


def test_manual_optimization():
    logger, rec = MemoryLogger(), GradRecorder()
    _trainer([GradientMonitor(log_every_n_steps=1), rec], steps=4, logger=logger).fit(Net(manual=True))
    assert len(rec.grads) == 4
    _check_against_reference(logger, rec)


def test_update_ratio_is_the_actual_update_over_the_weight():
    class Weights(Callback):
        def __init__(self):
            self.before, self.after = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before.append({n: p.detach().double().clone() for n, p in pl_module.named_parameters()})

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.after.append({n: p.detach().double().clone() for n, p in pl_module.named_parameters()})

    logger, w = MemoryLogger(), Weights()
    _trainer([w, GradientMonitor(log_every_n_steps=2)], logger=logger).fit(Net(optimizer="adam"))
    assert sorted(logger.metrics) == [1, 3, 5]  # the batch's own step, as Lightning logs its train/loss
    for step, logged in logger.metrics.items():
        b, a = w.before[step], w.after[step]
        for name in b:
            ref = (a[name] - b[name]).norm().item() / b[name].norm().item()
            assert logged[f"update/ratio/{name}"] == pytest.approx(ref, rel=1e-4)
            assert logged[f"weight/norm/{name}"] == pytest.approx(b[name].norm().item(), rel=1e-5)


def test_nan_at_step_k_is_skipped_named_and_training_continues():
    class Snap(Callback):
        def __init__(self):
            self.weights, self.state = {}, {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.weights[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            opt = trainer.optimizers[0]
            self.state[trainer.global_step] = {id(p): {k: v.clone() for k, v in opt.state[p].items()}
                                               for p in pl_module.parameters() if p in opt.state}

    k, snap, mon = 3, Snap(), GradientMonitor(log_every_n_steps=100)
    net = Net(nan_at=k, optimizer="adam")
    _trainer([snap, mon], steps=8).fit(net)
    nonfinite = [a for a in mon.alerts if a.kind == "nonfinite"]
    assert len(nonfinite) == 1 and nonfinite[0].step == k and nonfinite[0].where == "layers.2.weight"
    assert mon.skipped_steps == 1
    for name, before in snap.weights[k].items():
        assert torch.equal(before, snap.weights[k + 1][name]), name
    for pid, state in snap.state[k].items():
        for key, value in state.items():
            assert torch.equal(value, snap.state[k + 1][pid][key])
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert not all(torch.equal(v, dict(net.named_parameters())[n]) for n, v in snap.weights[k + 1].items())


def test_nan_with_raise_names_the_parameter_and_stop_stops_cleanly():
    with pytest.raises(NonFiniteGradientError, match="layers.2.weight"):
        _trainer([GradientMonitor(on_nonfinite="raise")], steps=6).fit(Net(nan_at=2))
    net, mon = Net(nan_at=2), GradientMonitor(on_nonfinite="stop")
    trainer = _trainer([mon], steps=6)
    trainer.fit(net)
    assert trainer.global_step == 3 and mon.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_nan_with_warn_is_reported_at_the_next_log():
    mon = GradientMonitor(on_nonfinite="warn", log_every_n_steps=4)
    with pytest.warns(UserWarning, match="NaN/Inf gradient at step 1"):
        _trainer([mon], steps=4).fit(Net(nan_at=1, nan_param="head.weight"))
    assert [(a.kind, a.step, a.where) for a in mon.alerts] == [("nonfinite", 1, "head.weight")]


class _Toggle(Callback):
    """Counts host reads only inside training steps, not at train end (where the last alerts are read)."""

    def __init__(self, reads):
        self.reads = reads

    def on_train_end(self, trainer, pl_module):
        self.reads.enabled = False


def test_zero_host_reads_on_steps_that_do_not_log():
    with HostReadCounter() as reads:
        _trainer([_Toggle(reads), GradientMonitor(on_nonfinite="warn", log_every_n_steps=50)], steps=8).fit(Net())
    assert reads.count == 0, reads.sites


def test_skip_action_reads_one_flag_per_step():
    with HostReadCounter() as reads:
        _trainer([_Toggle(reads), GradientMonitor(log_every_n_steps=50)], steps=8).fit(Net())
    assert reads.count == 8 and len(reads.sites) == 1, reads.sites


class SyncCheckedMonitor(GradientMonitor):
    """Runs the monitor's step hooks under torch.cuda.set_sync_debug_mode("error") after the first step
    (which builds the plan), except on logging steps, where the one readback is expected."""

    _guard = False

    def _guarded(self, fn, *args):
        if self._guard:
            torch.cuda.set_sync_debug_mode("error")
        try:
            return fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        self._guard = step > 0 and (step + 1) % self._interval != 0
        self._guarded(super().on_before_optimizer_step, trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._guarded(super().on_train_batch_end, trainer, pl_module, outputs, batch, batch_idx)


@pytest.mark.gpu
def test_no_device_sync_on_steps_that_do_not_log_on_cuda():
    mon = SyncCheckedMonitor(on_nonfinite="warn", log_every_n_steps=5)
    trainer = pl.Trainer(max_steps=12, callbacks=[mon], logger=False, accelerator="gpu", devices=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Net(optimizer="adam"))
    assert trainer.global_step == 12


class CountingMonitor(GradientMonitor):
    """Counts the aten ops the monitor dispatches in its hooks, per step."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.per_step = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with OpRecorder() as mode:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.per_step.append(list(mode.ops))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with OpRecorder() as mode:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.per_step[-1] += mode.ops


def test_ops_per_step_do_not_grow_with_the_number_of_tensors():
    runs = {}
    for depth in (10, 200):
        # a 200-layer tanh net does vanish: patience keeps alerts (and their resets) out of the count
        mon = CountingMonitor(log_every_n_steps=3, on_nonfinite="warn", vanishing={"patience": 1000})
        _trainer([mon], steps=3).fit(Net(depth=depth, width=4))
        runs[depth] = mon.per_step
    # non-logging steps: every dispatched op, views included, is the same list
    assert [str(o) for o in runs[10][1]] == [str(o) for o in runs[200][1]]
    # and it is small: foreach_norm, stack, total norm, and the copies into the device buffer (plus views)
    kernels = [str(o) for o in runs[10][1] if not o.is_view]
    assert len(kernels) <= 6 and len(runs[10][1]) <= 20, kernels
    # the logging step: the same kernels; only views (metadata, one per tensor to flatten it) grow
    kernels = {d: [str(o) for o in r[2] if not o.is_view] for d, r in runs.items()}
    assert kernels[10] == kernels[200]


def test_resume_from_checkpoint_restores_detector_state(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = GradientMonitor(log_every_n_steps=50)
    trainer = pl.Trainer(max_steps=10, callbacks=[first, ckpt], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(Net())
    saved = first.state_dict()

    class Check(Callback):
        def on_train_start(self, trainer, pl_module):
            got = second.state_dict()
            pairs = [(saved["loss_spike"], got["loss_spike"])]
            pairs += [(state, got["plans"][0]["detectors"][kind]) for kind, state in
                      saved["plans"][0]["detectors"].items()]
            for want, have in pairs:
                for key, value in want.items():
                    assert torch.equal(value.nan_to_num(-1), have[key].nan_to_num(-1)), key
            self.checked = True

    second, check = GradientMonitor(log_every_n_steps=50), Check()
    trainer2 = pl.Trainer(max_steps=14, callbacks=[second, check], logger=False, enable_progress_bar=False,
                          enable_model_summary=False, accelerator="cpu", enable_checkpointing=False,
                          default_root_dir=tmp_path)
    trainer2.fit(Net(), ckpt_path=str(tmp_path / "last.ckpt"))
    after = second.state_dict()["plans"][0]["detectors"]
    assert after["exploding"]["seen"].item() == 14  # the history continued from step 10
    assert check.checked and second.state_dict()["loss_spike"]["seen"].tolist() == [14, 14]


def test_group_by_module_and_include_exclude():
    logger, rec = MemoryLogger(), GradRecorder()
    mon = GradientMonitor(log_every_n_steps=1, group_by="module", exclude="layers.0.*", histograms=False)
    _trainer([mon, rec], steps=2, logger=logger).fit(Net())
    keys = logger.keys()
    assert "grad/norm/head" in keys and "grad/norm/layers.2" in keys
    assert not any("layers.0" in k for k in keys) and not any("/hist/" in k for k in keys)
    for (step, logged), grads in zip(sorted(logger.metrics.items()), rec.grads):
        ref = math.sqrt(sum(grads[f"head.{n}"].pow(2).sum().item() for n in ("weight", "bias")))
        assert logged["grad/norm/head"] == pytest.approx(ref, rel=1e-5)
    assert rec.published == [None, None]  # a partial selection never feeds clipping


def test_parameters_without_a_gradient_are_reported_as_zero_and_not_as_vanishing():
    class Partial(Net):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(4, 4)

    logger, rec = MemoryLogger(), GradRecorder()
    mon = GradientMonitor(log_every_n_steps=1, vanishing={"patience": 1}, check_every_n_steps=1)
    _trainer([mon, rec], steps=3, logger=logger).fit(Partial())
    for (step, logged), grads in zip(sorted(logger.metrics.items()), rec.grads):
        assert logged["grad/norm/unused.weight"] == 0.0
        assert logged["grad/norm/head.weight"] == pytest.approx(torch.linalg.vector_norm(grads["head.weight"]).item(),
                                                                rel=1e-5)
    assert not any(a.kind == "vanishing" for a in mon.alerts)
    assert rec.published[0] is not None  # the monitored set still equals every parameter with a gradient


def test_histograms_reach_an_offline_wandb_run(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="bpkit-test")
    logged = []
    original = wandb.sdk.wandb_run.Run.log

    def spy(self, data, *args, **kwargs):
        logged.append(dict(data))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    _trainer([GradientMonitor(log_every_n_steps=2, histogram_every_n_steps=2)], steps=4, logger=logger).fit(Net())
    wandb.finish()
    hists = [d for d in logged if any(isinstance(v, wandb.Histogram) for v in d.values())]
    assert len(hists) == 2
    h = hists[0]["grad/hist/head.weight"]
    assert sum(h.histogram) == 3 * 16  # every element of head.weight, none zero or NaN here
    summary = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "wandb-summary.json"))
    if summary:  # written by the offline writer; its histogram entry names the type
        assert json.load(open(summary[0]))["grad/hist/head.weight"]["_type"] == "histogram"
    assert os.path.isdir(tmp_path / "wandb")


@pytest.mark.parametrize("kwargs,match", [
    ({"on_nonfinite": "ignore"}, "on_nonfinite='ignore' is invalid: expected one of warn, skip, stop, raise"),
    ({"log_every_n_steps": -1}, "log_every_n_steps=-1 is invalid: expected an integer >= 0"),
    ({"group_by": "layer"}, "group_by='layer' is invalid"),
    ({"vanishing": {"patience": 0}}, "vanishing.patience=0 is invalid"),
    ({"exploding": {"factr": 3}}, "exploding.factr=3 is invalid: expected an option among factor"),
    ({"histogram_range": (4, -12)}, r"histogram_range\[1\]=-12 is invalid"),
    ({"exploding": False, "on_exploding": "skip"}, "on_exploding='skip' is invalid"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(BpkitConfigError, match=match):
        GradientMonitor(**kwargs)


def test_a_glob_matching_nothing_fails_at_train_start():
    with pytest.raises(BpkitConfigError, match=r"include='blocks\.\*' is invalid: expected a glob matching"):
        _trainer([GradientMonitor(include="blocks.*")], steps=1).fit(Net())


class _Blowup(Callback):
    """Before the monitor: multiplies every gradient by a growing factor from step ``start`` on, and
    keeps float64 copies of what the monitor will see (the reference for the detectors)."""

    def __init__(self, start):
        self.start, self.rows, self.losses = start, [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        if step >= self.start:
            for p in pl_module.parameters():
                p.grad.mul_(10.0 ** min(step - self.start + 1, 6))
        norms = [torch.linalg.vector_norm(p.grad.double()).item() for p in pl_module.parameters()]
        self.rows.append((step, norms, math.sqrt(sum(n * n for n in norms))))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def _reference_alerts(blowup, names):
    """The same detectors fed step by step, directly, with float64 statistics."""
    from bpkit.detect import ExplodingDetector, NonFiniteDetector, SpikeDetector

    exploding, nonfinite, spike = ExplodingDetector(), NonFiniteDetector(), SpikeDetector(("loss", "grad_norm_total"))
    for (step, norms, total), loss in zip(blowup.rows, blowup.losses):
        nonfinite.update([not math.isfinite(n) for n in norms], step)
        exploding.update(total, norms, step)
        spike.update([loss, total], step)
    return exploding.alerts(names) + nonfinite.alerts(names) + spike.alerts()


@pytest.mark.parametrize("max_rows", [None, 7])
def test_buffered_rules_equal_the_detectors_fed_step_by_step(monkeypatch, max_rows):
    """The monitor buffers each step's norms on the device and replays them at log time (or whenever the
    buffer is full: ``max_rows``); its alerts are those of the detectors fed directly every step."""
    if max_rows is not None:
        monkeypatch.setattr("bpkit.stats.step_rows.MAX_ROWS", max_rows)
    blowup = _Blowup(start=70)
    mon = GradientMonitor(log_every_n_steps=40, on_nonfinite="warn", vanishing=False)
    net = Net(lr=1e-4)
    _trainer([blowup, mon], steps=80).fit(net)
    names = [n for n, _ in net.named_parameters()]
    got = sorted((a.kind, a.step, a.where) for a in mon.alerts)
    want = sorted((a.kind, a.step, a.where) for a in _reference_alerts(blowup, names))
    # x1000 from step 72 on: the third step in a row above 100x the running median (the calibrated default) is 74
    assert ("exploding", 74) in [(k, s) for k, s, _ in want]
    assert got == want
    assert mon.probe._plans[0].rows.capacity == (42 if max_rows is None else max_rows)


def test_a_checkpoint_holds_the_steps_not_yet_replayed():
    mon = GradientMonitor(log_every_n_steps=50)
    _trainer([mon], steps=5).fit(Net())
    state = mon.state_dict()  # steps 0-4 were buffered after the last log step
    assert state["plans"][0]["detectors"]["exploding"]["seen"].item() == 5
    assert state["loss_spike"]["seen"].tolist() == [5, 5]


class _HistSteps(Callback):
    """Records the steps at which the monitor prepared histograms (they are logged in the same step)."""

    def __init__(self, monitor):
        self.monitor, self.steps = monitor, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pending = self.monitor.probe._plans[0].pending if self.monitor.probe._plans else None
        if pending is not None and "grad_hist" in pending:
            self.steps.append(trainer.global_step - 1)


@pytest.mark.parametrize("kw,want", [
    # 40 steps, log every 2: 20 log steps; at least 8 snapshots -> the first log step, then every 2nd log step
    ({}, [1] + list(range(3, 40, 4))),
    ({"histogram_every_n_steps": 6}, [5, 11, 17, 23, 29, 35]),
    ({"histograms": False}, [])])
def test_histograms_come_at_the_first_log_step_then_scaled_to_the_run(kw, want):
    mon = GradientMonitor(log_every_n_steps=2, **kw)
    spy = _HistSteps(mon)
    logger = MemoryLogger()
    _trainer([spy, mon], steps=40, logger=logger).fit(Net())  # the spy looks before the monitor flushes
    assert spy.steps == want
    assert len(logger.series("grad/norm_total")) >= 20  # the scalars still come every log interval


@pytest.mark.parametrize("length", [{"max_steps": 50}, {"max_epochs": 3}])  # 50 steps; 3 x 16 batches = 48 steps
def test_a_short_run_gets_histograms_at_every_log_step(length):
    """Issue 17: a 50-step run with log_every_n_steps=10 used to get none (the default was every 100 steps)."""
    mon = GradientMonitor()  # every default: the Trainer's log_every_n_steps=10
    spy = _HistSteps(mon)
    trainer = pl.Trainer(callbacks=[spy, mon], logger=False, log_every_n_steps=10, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, **length)
    trainer.fit(Net())
    last = trainer.global_step - 1
    assert spy.steps == list(range(9, last + 1, 10))  # the first log step (9) and each one after it
    assert len(spy.steps) >= 4


def test_a_long_run_keeps_histograms_to_one_in_ten_log_steps():
    mon = GradientMonitor(log_every_n_steps=2)
    spy = _HistSteps(mon)
    _trainer([spy, mon], steps=400).fit(Net())  # 200 log steps: 200 // 8 > 10, so the long-run cadence
    assert spy.steps == [1] + list(range(19, 400, 20))  # the first log step, then every 10th log step
