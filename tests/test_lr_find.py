import functools

import lightning.pytorch as pl
import pytest
import torch

from bpkit.data import DigitsDataModule
from bpkit.errors import BpkitConfigError
from bpkit.lr_find import find_lr, suggest
from bpkit.models import MLP
from bpkit.task import BackpropTask

# measured (5 epochs, Adam, the default MLP on digits): val acc 0.885 @3e-4, 0.926 @1e-3, 0.959 @3e-3,
# 0.948 @1e-2, 0.963 @3e-2: the good range is 3e-3..3e-2, centred on 1e-2
KNOWN_GOOD_LR = 1e-2


def _setup(tmp_path, seed=0):
    pl.seed_everything(seed, verbose=False)
    task = BackpropTask(MLP(64, 10, depth=3, width=128), "cross_entropy",
                        functools.partial(torch.optim.Adam, lr=1e-3), num_classes=10)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=10, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    return task, trainer


def test_range_test_restores_weights_plots_and_suggests_a_good_lr(tmp_path):
    task, trainer = _setup(tmp_path)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    result = find_lr(trainer, task, DigitsDataModule(), num_steps=100, out_dir=tmp_path, apply=True)
    after = task.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    png = tmp_path / "lr_find.png"
    assert result.plot_path == str(png) and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert KNOWN_GOOD_LR / 3 <= result.suggestion <= KNOWN_GOOD_LR * 3, result.explain()
    assert KNOWN_GOOD_LR / 3 <= result.others["steepest"] <= KNOWN_GOOD_LR * 3
    assert "min_div10" in result.explain() and "suggested lr=" in result.explain()
    assert task.optimizer_factory.keywords["lr"] == result.suggestion  # applied
    assert not list(tmp_path.glob(".lr_find_*.ckpt"))  # the temporary checkpoint is gone
    trainer.fit(task, datamodule=DigitsDataModule())  # training afterwards works and uses the new LR
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(result.suggestion)


def test_suggestion_rules_on_a_synthetic_curve():
    lrs = [10 ** (-6 + 6 * i / 99) for i in range(100)]
    # loss flat, falls fastest at 1e-3, minimum at 1e-2, then diverges
    import math

    losses = [2.0 - math.tanh((math.log10(lr) + 3) * 2) + (50 * (lr - 1e-2) if lr > 1e-2 else 0) for lr in lrs]
    assert suggest(lrs, losses, "steepest") == pytest.approx(1e-3, rel=0.15)
    assert suggest(lrs, losses, "min_div10") == pytest.approx(1e-3, rel=0.2)
    assert suggest(lrs[:5], losses[:5], "steepest") is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_lr=1e-2, max_lr=1e-3), r"lr_finder\.max_lr=0\.001.*above lr_finder\.min_lr=0\.01"),
    (dict(min_lr=0.0), r"lr_finder\.min_lr=0\.0"),
    (dict(num_steps=1), r"lr_finder\.num_steps=1"),
    (dict(rule="valley"), r"lr_finder\.rule='valley'.*min_div10, steepest"),
])
def test_bad_options_fail_clearly(kwargs, match, tmp_path):
    task, trainer = _setup(tmp_path)
    with pytest.raises(BpkitConfigError, match=match):
        find_lr(trainer, task, DigitsDataModule(), **kwargs)
