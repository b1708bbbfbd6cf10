import functools
import math

import lightning.pytorch as pl
import pytest
import torch

from bpkit.errors import BpkitConfigError
from bpkit.schedules import build_scheduler, check_schedule_spec

LR = 0.1


def _trace(name, steps, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR, momentum=0.9)
    sched = build_scheduler(opt, name, **kw)
    lrs, moms = [], []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    return lrs, moms


def _cos(t, n, lo, hi):
    return lo + (hi - lo) * (1 + math.cos(math.pi * t / n)) / 2


def _restarts(t):  # cycles of 10, 20, 40 steps
    start, n = (0, 10) if t < 10 else ((10, 20) if t < 30 else (30, 40))
    return _cos(t - start, n, 0, LR)


CASES = {
    "constant": (dict(), lambda t: LR),
    "step": (dict(step_size=7, gamma=0.5), lambda t: LR * 0.5 ** (t // 7)),
    "multistep": (dict(milestones=[10, 25], gamma=0.1), lambda t: LR * 0.1 ** ((t >= 10) + (t >= 25))),
    "exponential": (dict(gamma=0.97), lambda t: LR * 0.97**t),
    "cosine": (dict(total_steps=40, min_lr_ratio=0.1), lambda t: _cos(t, 40, 0.1 * LR, LR)),
    "cosine_restarts": (dict(restart_steps=10, restart_mult=2), _restarts),
    "warmup_cosine": (dict(total_steps=40, warmup_steps=8, warmup_start_factor=0.01, min_lr_ratio=0.05),
                      lambda t: LR * (0.01 + 0.99 * t / 8) if t < 8 else _cos(t - 8, 32, 0.05 * LR, LR)),
    "polynomial": (dict(total_steps=40, power=2.0), lambda t: LR * (1 - min(t, 40) / 40) ** 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_schedule_matches_closed_form(name):
    kw, ref = CASES[name]
    lrs, _ = _trace(name, 40, **kw)
    for t, lr in enumerate(lrs):
        assert lr == pytest.approx(ref(t), rel=1e-9, abs=1e-12), (name, t)


def test_warmup_cosine_peaks_at_end_of_warmup_and_reaches_minimum():
    lrs, _ = _trace("warmup_cosine", 101, total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.01)
    assert max(range(101), key=lrs.__getitem__) == 10
    assert lrs[10] == pytest.approx(LR)
    assert lrs[100] == pytest.approx(0.01 * LR)


@pytest.mark.parametrize("decay", ["linear", "cosine", "1-sqrt"])
def test_wsd_three_phases(decay):
    total, warm, cool, floor = 100, 10, 20, 0.1
    lrs, _ = _trace("wsd", total + 1, total_steps=total, warmup_steps=warm, warmup_start_factor=0.01,
                    decay=decay, decay_steps=cool, min_lr_ratio=floor)
    for t in range(total + 1):
        if t < warm:
            ref = LR * (0.01 + 0.99 * t / warm)
        elif t < total - cool:
            ref = LR
        else:
            u = (t - (total - cool)) / cool
            shape = {"linear": 1 - u, "cosine": (1 + math.cos(math.pi * u)) / 2, "1-sqrt": 1 - math.sqrt(u)}[decay]
            ref = LR * (floor + (1 - floor) * shape)
        assert lrs[t] == pytest.approx(ref, rel=1e-9, abs=1e-12), (decay, t)


def test_onecycle_momentum_moves_opposite_to_lr():
    lrs, moms = _trace("onecycle", 100, total_steps=100, pct_start=0.3)
    peak = max(range(100), key=lrs.__getitem__)
    assert 25 <= peak <= 31
    assert moms[peak] == pytest.approx(0.85) and moms[0] == pytest.approx(0.95)
    for t in range(1, 100):
        dl, dm = lrs[t] - lrs[t - 1], moms[t] - moms[t - 1]
        assert dl * dm <= 1e-15, t


def test_plateau_reduces_on_stalled_metric():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = build_scheduler(opt, "plateau", factor=0.5, patience=1)
    for _ in range(4):
        sched.step(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * 0.5)


@pytest.mark.parametrize("spec, total, match", [
    ({"name": "triangle"}, 10, r"scheduler\.name='triangle'.*warmup_cosine"),
    ({"name": "warmup_cosine", "warmup_steps": 50}, 40, r"scheduler\.warmup_steps=50.*fewer warm-up steps than the 40"),
    ({"name": "warmup_cosine", "min_lr_ratio": 1.5}, 40, r"scheduler\.min_lr_ratio=1\.5.*<= 1"),
    ({"name": "cosine", "min_lr_ratio": -0.1}, 40, r"scheduler\.min_lr_ratio=-0\.1"),
    ({"name": "wsd", "warmup_ratio": 1.2}, 40, r"scheduler\.warmup_ratio=1\.2"),
    ({"name": "step", "step_size": 0}, 40, r"scheduler\.step_size=0"),
    ({"name": "warmup_cosine", "warmup_start_factor": 0.0}, 40, r"scheduler\.warmup_start_factor=0\.0"),
    ({"name": "cosine", "bogus": 1}, 40, r"scheduler\.bogus=1.*options"),
    ({"name": "cosine", "interval": "batch"}, 40, r"scheduler\.interval='batch'"),
])
def test_bad_schedules_fail_clearly(spec, total, match):
    with pytest.raises(BpkitConfigError, match=match):
        check_schedule_spec(spec, total_steps=total)


def _task(scheduler):
    from bpkit.models import MLP
    from bpkit.task import BackpropTask

    return BackpropTask(MLP(64, 10, depth=2, width=16), "cross_entropy",
                        functools.partial(torch.optim.SGD, lr=LR, momentum=0.9), scheduler=scheduler, num_classes=10)


def _trainer(tmp_path, **kw):
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, limit_val_batches=0, **kw)


def test_total_steps_come_from_the_trainer_and_lr_resumes_exactly(tmp_path):
    from bpkit.data import DigitsDataModule

    spec = {"name": "warmup_cosine", "warmup_steps": 5, "min_lr_ratio": 0.0}
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))

    pl.seed_everything(0)
    full = _trainer(tmp_path / "a", max_steps=30, callbacks=[Record()], limit_train_batches=10)
    full.fit(_task(spec), datamodule=DigitsDataModule())
    reference = dict(seen)
    assert full.lr_scheduler_configs[0].scheduler._schedulers[1].T_max == 25  # 30 total - 5 warm-up
    assert reference[29] == pytest.approx(_cos(24, 25, 0.0, LR))

    seen.clear()
    pl.seed_everything(0)
    class KillAt12(pl.Callback):  # the run is interrupted at step 12 of 30
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 12:
                trainer.should_stop = True

    first = _trainer(tmp_path / "b", max_steps=30, limit_train_batches=10, callbacks=[Record(), KillAt12()])
    first.fit(_task(spec), datamodule=DigitsDataModule())
    assert first.global_step == 12
    ckpt = tmp_path / "k.ckpt"
    first.save_checkpoint(ckpt)
    seen.clear()
    second = _trainer(tmp_path / "c", max_steps=30, limit_train_batches=10, callbacks=[Record()])
    second.fit(_task(spec), datamodule=DigitsDataModule(), ckpt_path=ckpt)
    resumed = dict(seen)
    assert min(resumed) == 12
    for step, lr in resumed.items():
        assert lr == pytest.approx(reference[step], rel=1e-12), step


def test_lr_and_momentum_logged_under_lr_prefix(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    from bpkit.data import DigitsDataModule

    logger = CSVLogger(tmp_path)
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, logger=logger, log_every_n_steps=1, limit_val_batches=0,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[LearningRateMonitor(logging_interval="step", log_momentum=True)])
    trainer.fit(_task("onecycle"), datamodule=DigitsDataModule())
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "lr/sgd" in header and "lr/sgd-momentum" in header
