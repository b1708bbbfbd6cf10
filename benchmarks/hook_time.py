"""Time spent in GradientMonitor's hooks per step on the default job's MLP (30k parameters, 500 steps, Lightning's
log_every_n_steps=50), best of 3, with histograms off and at their default cadence.

Compare two versions side by side by running it with each on the path, interleaved, e.g.::

    git worktree add /tmp/old <rev>
    (cd /tmp/old && PYTHONPATH=/tmp/old python benchmarks/hook_time.py); python benchmarks/hook_time.py
"""
import time, torch, warnings, sys
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset
from bpkit.callbacks import GradientMonitor
from bpkit.models import MLP
from bpkit.task import BackpropTask
import bpkit
x = torch.randn(64*500, 64); y = torch.randint(0, 10, (64*500,))
dl = DataLoader(TensorDataset(x, y), batch_size=64)
res = {}
for hist in (False, True):
    best = None
    for rep in range(3):
        mon = GradientMonitor(histograms=hist)
        spent = [0.0]
        for name in ("on_before_optimizer_step", "on_train_batch_start", "on_train_batch_end", "on_train_end"):
            f = getattr(mon, name)
            def wrap(*a, _f=f, **k):
                t = time.perf_counter()
                try:
                    return _f(*a, **k)
                finally:
                    spent[0] += time.perf_counter() - t
            setattr(mon, name, wrap)
        tr = pl.Trainer(max_steps=500, callbacks=[mon], logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", log_every_n_steps=50)
        torch.manual_seed(0)
        tr.fit(BackpropTask(MLP(64, 10, depth=3, width=128), num_classes=10), dl)
        v = spent[0] / 500 * 1e3
        best = v if best is None else min(best, v)
    res[hist] = best
print(bpkit.__version__, f"hooks ms/step: histograms off {res[False]:.3f}, defaults {res[True]:.3f}")
