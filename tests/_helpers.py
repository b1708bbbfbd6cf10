"""Small test doubles shared by the test files."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers.logger import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils._python_dispatch import TorchDispatchMode


def step_if_manual(module, loss) -> None:
    """Under manual optimization, the zero_grad / backward / step that Lightning would do automatically."""
    if not module.automatic_optimization:
        opt = module.optimizers()
        opt.zero_grad()
        module.manual_backward(loss)
        opt.step()


def spy_on_shared_norms(monkeypatch) -> list[bool]:
    """Record every time GradientClipping asks GradientMonitor for this step's norms: ``True`` for a hit."""
    from bpkit.callbacks.gradient_monitor import GradientMonitor

    original, hits = GradientMonitor.step_norms, []

    def spy(self, *args, **kwargs):
        entry = original(self, *args, **kwargs)
        hits.append(entry is not None)
        return entry

    monkeypatch.setattr(GradientMonitor, "step_norms", spy)
    return hits


def sgd_or_adam(module, name: str, lr: float) -> torch.optim.Optimizer:
    """``Adam(lr)`` for ``name="adam"``, else ``SGD(lr, momentum=0.9)``: the test models' optimizers."""
    if name == "adam":
        return torch.optim.Adam(module.parameters(), lr=lr)
    return torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)


class MemoryLogger(Logger):
    """A Lightning logger that keeps every logged scalar: ``metrics[step][key] = value``."""

    def __init__(self):
        super().__init__()
        self.metrics = {}

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.setdefault(step, {}).update({k: float(v) for k, v in metrics.items()})

    def keys(self):
        return {k for m in self.metrics.values() for k in m}

    def series(self, key):
        """``{step: value}`` of one key."""
        return {step: m[key] for step, m in self.metrics.items() if key in m}


class OpRecorder(TorchDispatchMode):
    """Records every aten op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    def kernels(self):
        """Ops that launch work (views only change metadata)."""
        return [str(f) for f in self.ops if not f.is_view]


class TwoOptimizerGAN(LightningModule):
    """Lightning's basic GAN example in miniature: manual optimization, two optimizers stepped every batch,
    ``g_loss`` and ``d_loss`` logged; ``n`` samples of 8 features in batches of ``batch``."""

    def __init__(self, n: int = 48, batch: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.n, self.batch = n, batch
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 4)
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self.generator(z)), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        fake = self.generator(z).detach()
        d_loss = (F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
                  + F.binary_cross_entropy_with_logits(self.discriminator(fake), zeros)) / 2
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss})

    def configure_optimizers(self):
        return (torch.optim.Adam(self.generator.parameters(), lr=1e-3),
                torch.optim.Adam(self.discriminator.parameters(), lr=1e-3))

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        return DataLoader(TensorDataset(torch.randn(self.n, 8, generator=g), torch.zeros(self.n)),
                          batch_size=self.batch)
