"""GPU tests (`pytest -m gpu`; skipped without CUDA). Run on a device by benchmarks/gpu_check.sh."""

import functools
import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bpkit.callbacks import ActivationMonitor, GradientClipping, GradientMonitor
from bpkit.models import MLP
from bpkit.task import BackpropTask
from tests._helpers import MemoryLogger

pytestmark = pytest.mark.gpu


def _data(n=512, device="cuda"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=64)


def _task(depth=6):
    torch.manual_seed(0)
    return BackpropTask(MLP(64, 10, depth=depth, width=256), "cross_entropy",
                        functools.partial(torch.optim.Adam, lr=1e-3), metrics=(), num_classes=10)


def _trainer(callbacks, **kw):
    kw.setdefault("logger", MemoryLogger())
    return pl.Trainer(accelerator="gpu", devices=1, callbacks=callbacks, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, **kw)


class SyncFree(pl.Callback):
    """Runs the given callbacks' hooks with CUDA sync debug mode "error": any host sync raises."""

    HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
             "on_before_zero_grad", "on_train_batch_end")

    def __init__(self, watched, skip_steps):
        self.skip_steps = skip_steps
        for cb in watched:
            for hook in self.HOOKS:
                original = getattr(cb, hook)
                setattr(cb, hook, self._wrap(original))

    def _wrap(self, fn):
        def wrapped(trainer, *args, **kwargs):
            strict = trainer.global_step not in self.skip_steps
            torch.cuda.set_sync_debug_mode("error" if strict else "default")
            try:
                return fn(trainer, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return wrapped


def test_monitoring_steps_do_not_synchronise():
    """GradientMonitor + ActivationMonitor + GradientClipping add no host sync on a step that does not log."""
    log_every = 10
    monitors = [GradientMonitor(log_every_n_steps=log_every, on_nonfinite="warn"),
                ActivationMonitor(log_every_n_steps=log_every), GradientClipping("zclip")]
    task = _task()
    model = task.model

    def strict_forward(module, args):
        torch.cuda.set_sync_debug_mode("error")

    def relax_forward(module, args, out):
        torch.cuda.set_sync_debug_mode("default")

    # the forward (where activation hooks run) is checked too, apart from Lightning's own code
    model.register_forward_pre_hook(strict_forward)
    model.register_forward_hook(relax_forward)
    log_steps = {s for s in range(40) if (s + 1) % log_every == 0} | {s + 1 for s in range(40) if (s + 1) % log_every == 0}
    trainer = _trainer(monitors + [SyncFree(monitors, log_steps)], max_steps=40, log_every_n_steps=log_every,
                       limit_val_batches=0)
    # forward hooks run on every step; only the logging steps may read back
    trainer.fit(task, _data())
    assert trainer.global_step == 40


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_statistics_are_unscaled(precision):
    seen = []

    class Reference(pl.Callback):  # runs after the monitor, on the same unscaled gradients
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad.double() for p in pl_module.parameters() if p.grad is not None]
            seen.append((trainer.global_step, torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads])).item()))

    logger = MemoryLogger()
    trainer = _trainer([GradientMonitor(log_every_n_steps=1), Reference()], max_steps=8, precision=precision,
                       log_every_n_steps=1, logger=logger, limit_val_batches=0)
    trainer.fit(_task(), _data())
    logged = logger.series("grad/norm_total")
    reference = dict(seen)
    common = sorted(set(logged) & set(reference))
    assert len(common) >= 5
    for step in common:
        assert logged[step] == pytest.approx(reference[step], rel=1e-3), step
    # a 16-mixed loss scale of 65536 would make a scaled norm ~1e4x too large
    assert max(logged.values()) < 100


def test_norm_clipping_on_gpu_matches_torch():
    torch.manual_seed(0)
    task_a, task_b = _task(), _task()
    task_b.load_state_dict(task_a.state_dict())
    pl.seed_everything(0)
    _trainer([GradientClipping("norm", max_norm=0.5)], max_steps=5, limit_val_batches=0).fit(task_a, _data())

    class TorchClip(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            torch.nn.utils.clip_grad_norm_(pl_module.parameters(), 0.5)

    pl.seed_everything(0)
    _trainer([TorchClip()], max_steps=5, limit_val_batches=0).fit(task_b, _data())
    for a, b in zip(task_a.parameters(), task_b.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_default_job_on_gpu(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-m", "bpkit.train", "trainer=gpu", "trainer.max_epochs=5",
                           "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("bpkit: ")][-1]
    acc = float(line.split("val/acc=")[1].split()[0])
    assert acc > 0.85, line
